"""Union over batches, threshold search for a ratio, protected layers, per-layer budgets, rounding, z-scores."""

import numpy as np
import pytest

from fnprune.io import save_npz
from fnprune.mask import (
    hybrid_scores,
    importance_budgets,
    n_to_drop,
    prunable_layers,
    round_kept,
    select_budgets,
    select_global,
    select_uniform,
    standardise_layers,
    union_neuron_scores,
)


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
        save_npz(
            tmp_path / f"b{b}.npz", scores=sc, converged=np.ones(4, bool), n_iter=np.full(4, 7), wall_s=np.zeros(4)
        )
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


def layer_scores(seed=0, layers=6, inter=64):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0 + i, size=inter) for i in range(layers)]


def test_round_kept_gives_multiples_close_to_the_total_and_keeps_the_best():
    s = layer_scores()
    prunable = [False, True, True, True, True, False]
    kept, _ = select_global(s, prunable, 100, 0.3)
    rounded = round_kept(kept, s, prunable, 16)
    counts = [len(k) for k in rounded]
    assert all(c % 16 == 0 for c, p in zip(counts, prunable) if p)
    assert counts[0] == counts[-1] == 64
    assert abs(sum(counts) - sum(len(k) for k in kept)) <= 8 * sum(prunable)
    for layer in range(1, 5):
        best = np.argsort(-s[layer], kind="stable")[: counts[layer]]
        assert set(rounded[layer].tolist()) == set(best.tolist())


def test_importance_budgets_follow_importance_and_sum_to_the_request():
    sizes = [64] * 6
    prunable = [False, True, True, True, True, False]
    drops = importance_budgets([1.0, 1.0, 2.0, 4.0, 4.0, 1.0], sizes, prunable, 90, min_keep=1)
    assert sum(drops) == 90 and drops[0] == drops[-1] == 0
    assert drops[1] > drops[2] > drops[3] == drops[4]
    capped = importance_budgets([1.0, 0.01, 1.0, 1.0, 1.0, 1.0], sizes, prunable, 150, min_keep=4)
    assert sum(capped) == 150 and capped[1] == 60  # capped at size - min_keep, rest spread
    with pytest.raises(ValueError, match="removable"):
        importance_budgets([1.0] * 6, sizes, prunable, 4 * 63 + 1)
    kept = select_budgets(layer_scores(), drops)
    assert [len(k) for k in kept] == [64 - d for d in drops]


def test_standardised_and_hybrid_scores():
    s = layer_scores()
    s[2][5] = np.inf
    z = standardise_layers(s)
    fin = np.isfinite(z[2])
    assert np.isinf(z[2][5]) and abs(z[2][fin].mean()) < 1e-9 and abs(z[1].std(ddof=1) - 1) < 1e-9
    h = hybrid_scores(layer_scores(1), layer_scores(2))
    assert all(abs(x.mean()) < 1e-9 for x in h)
    net, flu = layer_scores(3), layer_scores(4)
    # A neuron top-ranked by both parents is top-ranked by the hybrid.
    net[1][7], flu[1][7] = 1e3, 1e6
    assert int(np.argmax(hybrid_scores(net, flu)[1])) == 7


def test_core_variant_keeps_each_layers_network_core_and_lets_importance_choose_the_rest():
    """``_core<p>``: the p% of a layer with the highest network score are never removed; every
    other neuron goes in importance order, under Wanda-sp's uniform budgets."""
    from fnprune.mask import protect_core

    imp, net = scores(5, layers=4, inter=40), scores(6, layers=4, inter=40)
    # layer 1's least important neuron is its strongest network member: the core keeps it
    low = int(np.argmin(imp[1]))
    net[1][low] = 1e3
    s = protect_core(imp, net, 10)
    for layer in range(4):
        core = set(np.argsort(-net[layer], kind="stable")[:4].tolist())  # 10% of 40
        assert set(np.flatnonzero(np.isinf(s[layer])).tolist()) == core
        rest = np.setdiff1d(np.arange(40), list(core))
        assert np.array_equal(s[layer][rest], imp[layer][rest])  # the others keep their importance
    prunable = [False, True, True, False]
    kept = select_uniform(s, prunable, 20, 0.2)
    assert low in kept[1]
    for layer in (1, 2):  # 10 of each prunable layer go: the 10 least important outside the core
        outside = [i for i in np.argsort(imp[layer], kind="stable") if not np.isinf(s[layer][i])]
        assert set(range(40)) - set(kept[layer].tolist()) == set(int(i) for i in outside[:10])
    with pytest.raises(ValueError, match="1..99"):
        protect_core(imp, net, 100)


def test_variant_methods_parse_to_their_own_mask_rule_and_leave_other_selectors_unchanged():
    """``_hwanda`` and ``_core<p>`` name masks of rule mask_fnv (FNV_SELECTOR), never of mask_ica;
    only their parsed dicts carry ``within``, so no other mask job's params (its cache key) move."""
    import re

    from fnprune.config import FNV_SELECTOR, ICA_SELECTOR, METHOD_PATTERN, parse_method
    from fnprune.tables import method_label

    for method, within, core in (("c64_hwanda_uniform", "hwanda", None), ("c64_core10_uniform_bias", "core", 10)):
        d = parse_method(method)
        assert (d["within"], d["core_pct"], d["needs_stats"], d["selection"]) == (within, core, True, "uniform")
        assert re.fullmatch(FNV_SELECTOR, d["selector"]) and not re.fullmatch(ICA_SELECTOR, d["selector"])
        assert re.fullmatch(METHOD_PATTERN, method)
    assert parse_method("c64_core10_uniform_bias")["bias"]
    for method in ("c64", "c64_hybrid_uniform_bias", "c16_b2_zglobal"):
        d = parse_method(method)
        assert "within" not in d and not re.fullmatch(FNV_SELECTOR, d["selector"]), method
    assert method_label("c64_core10_uniform") == "Wanda-sp, ICA k=64 cores (10%) kept, uniform"
    assert method_label("c64_hwanda_uniform") == "Hybrid ICA+Wanda-sp k=64, uniform"
    for bad in ("c64_core0", "c64_core100", "c64_hybrid_hwanda"):
        with pytest.raises(ValueError, match=bad):
            parse_method(bad)
