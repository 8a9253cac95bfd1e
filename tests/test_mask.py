"""Union over batches, threshold search for a ratio, protected layers."""

import numpy as np
import pytest

from fnprune.io import save_npz
from fnprune.mask import n_to_drop, prunable_layers, select_global, select_uniform, union_neuron_scores


def scores(seed=0, layers=6, inter=50):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0, size=inter) for _ in range(layers)]


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.3])
def test_threshold_search_hits_ratio_and_protects_layers(ratio):
    s = scores()
    prunable = prunable_layers(6, 1, 1)
    block, neuron = 6 * 1000, 12
    n_drop = n_to_drop(ratio, block, neuron)
    kept, t = select_global(s, prunable, n_drop, ratio)
    removed = sum(50 - len(k) for k in kept)
    assert removed == n_drop
    assert abs(removed * neuron / block - ratio) <= neuron / block
    assert len(kept[0]) == 50 and len(kept[-1]) == 50
    for layer in range(1, 5):
        keep = np.zeros(50, bool)
        keep[kept[layer]] = True
        assert (s[layer][keep] > t).all() or keep.sum() == 1
        assert (s[layer][~keep] <= t).all()


def test_union_is_or_of_batch_masks(tmp_path):
    files = []
    per_batch = []
    for b in range(3):
        rng = np.random.default_rng(b)
        sc = rng.gamma(2.0, 1.0, size=(4, 40)).astype(np.float32)
        per_batch.append(sc)
        save_npz(tmp_path / f"b{b}.npz", scores=sc, converged=np.ones(4, bool), n_iter=np.full(4, 7),
                 wall_s=np.zeros(4))
        files.append(tmp_path / f"b{b}.npz")
    union, info = union_neuron_scores(files)
    t = 3.0
    for layer in range(4):
        or_mask = np.zeros(20, bool)
        for sc in per_batch:
            or_mask |= (sc[layer, :20] > t) | (sc[layer, 20:] > t)
        np.testing.assert_array_equal(union[layer] > t, or_mask)
    assert info["batches_used"] == [0, 1, 2] and info["nonconverged_fraction"] == 0.0


def test_uniform_drops_same_count_per_layer():
    s = scores()
    kept = select_uniform(s, prunable_layers(6, 1, 1), 40, 0.1)
    assert [50 - len(k) for k in kept] == [0, 10, 10, 10, 10, 0]


def test_unreachable_ratio_is_explained():
    with pytest.raises(ValueError, match="protect"):
        select_global(scores(), prunable_layers(6, 2, 2), 150, 0.9)
    with pytest.raises(ValueError, match="ratio must be in"):
        n_to_drop(1.5, 100, 1)
    with pytest.raises(ValueError, match="leaves no prunable layer"):
        prunable_layers(4, 2, 2)


def test_no_layer_is_emptied():
    s = scores(layers=3, inter=10)
    kept, _ = select_global(s, [True, True, True], 27, 0.9, min_keep=1)
    assert all(len(k) >= 1 for k in kept)
