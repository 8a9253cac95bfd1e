"""CanICA backends and consensus ICA on synthetic data with planted sparse networks."""

import numpy as np
import pytest
import torch

from fnprune.ica import (
    canica,
    canica_runs,
    consensus_scores,
    exact_subspace,
    fastica_cube,
    spatial_subspace,
    zscore_columns,
)
from fnprune.shards import load_shard
from fnprune.synthetic import auroc, planted_networks


@pytest.fixture(scope="module")
def planted():
    return planted_networks(n_tokens=1200, n_signals=800, n_networks=6, network_size=20, noise=1.0, seed=3)


def test_torch_backend_recovers_planted_neurons(planted):
    x, member = planted
    res = canica(x, k=12, backend="torch", seed=0)
    assert res.converged
    keep = res.scores > np.sort(res.scores)[-int(member.sum() * 1.05)]
    recall = (keep & member).sum() / member.sum()
    precision = (keep & member).sum() / keep.sum()
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)


@pytest.mark.parametrize("backend", ["exact", "nilearn"])
def test_reference_backends_see_the_same_networks(planted, backend):
    if backend == "nilearn":
        pytest.importorskip("nibabel")
    x, member = planted
    ours = canica(x, k=12, backend="torch", seed=0)
    ref = canica(x, k=12, backend=backend, seed=0)
    assert auroc(ref.scores, member) > 0.97
    assert abs(auroc(ours.scores, member) - auroc(ref.scores, member)) < 0.01


def test_same_seed_same_scores(planted):
    x, _ = planted
    a = canica(x, k=10, backend="torch", seed=5)
    b = canica(x, k=10, backend="torch", seed=5)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("shape", [(500, 300), (300, 500)], ids=["tall", "wide"])
def test_subspace_iteration_matches_exact(shape):
    rng = np.random.default_rng(0)
    t, n = shape
    low = rng.standard_normal((t, 8)) @ rng.standard_normal((8, n)) * 5
    raw = torch.tensor(low + 0.5 * rng.standard_normal((t, n)) + 3.0, dtype=torch.float32)
    v, info = spatial_subspace(raw, 12, seed=0)
    ve = exact_subspace(zscore_columns(raw), 12)
    cos = torch.linalg.svdvals(v.T.double() @ ve.double())
    assert info["subspace"] == "gram-subspace-iteration"
    assert float(cos.mean()) > 0.9999 and v.shape == (n, 12)


def test_flat_spectrum_falls_back_to_exact():
    x = torch.randn(400, 300, generator=torch.Generator().manual_seed(0))
    v, info = spatial_subspace(x, 20, seed=0, max_iter=3, tol=1e-9)
    assert info["subspace"] == "gram-eigh"
    ve = exact_subspace(zscore_columns(x), 20)
    assert float(torch.linalg.svdvals(v.T.double() @ ve.double()).min()) > 0.999


def test_fastica_reports_non_convergence():
    x = torch.randn(6, 2000, generator=torch.Generator().manual_seed(1))
    _, converged, n_iter = fastica_cube(x, seed=0, max_iter=2, tol=1e-12)
    assert not converged and n_iter == 2


def test_k_larger_than_data_is_refused(planted):
    x, _ = planted
    with pytest.raises(ValueError, match="components k=2000"):
        canica(x[:100], k=2000)


def test_constant_signal_keeps_unit_std():
    x = torch.randn(50, 4)
    x[:, 2] = 3.0
    z = zscore_columns(x)
    assert torch.all(z[:, 2] == 0) and torch.isfinite(z).all()


@pytest.mark.parametrize("corrupt", ["truncated", "nan", "shape"])
def test_bad_shards_are_named(tmp_path, corrupt):
    path = tmp_path / "L0.npy"
    arr = np.ones((10, 8), dtype=np.float16)
    if corrupt == "nan":
        arr[3, 3] = np.nan
    np.save(path, arr)
    if corrupt == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="L0.npy"):
        load_shard(path, n_signals=6 if corrupt == "shape" else 8)


def test_batched_fastica_equals_one_by_one(planted):
    from fnprune.ica import canica_torch_layers

    x, _ = planted
    xs = [x[:, :400], x[:, 400:]]
    together = canica_torch_layers(xs, 8, [0, 1000])
    alone = [canica(xi, 8, "torch", seed=s) for xi, s in zip(xs, [0, 1000])]
    for a, b in zip(together, alone):
        assert a.n_iter == b.n_iter and a.converged == b.converged
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["keep", "retry", "skip", "fail"])
def test_nonconvergence_policy(tmp_path, planted, policy):
    from fnprune.mask import union_neuron_scores
    from fnprune.shards import ica_batch

    x, _ = planted
    paths = []
    for layer in range(2):
        paths.append(tmp_path / f"L{layer}.npy")
        np.save(paths[-1], x[:, layer * 400 : (layer + 1) * 400].astype(np.float16))
    if policy == "fail":
        with pytest.raises(RuntimeError, match=r"L0.npy: the ICA \(fastica\) did not reach FastICA.s tol"):
            ica_batch(paths, 8, "torch", 0, max_iter=2, on_nonconvergence=policy)
        return
    res = ica_batch(paths, 8, "torch", 0, max_iter=2, on_nonconvergence=policy, retries=2)
    assert not res["converged"].any()
    assert res["attempts"].tolist() == ([3, 3] if policy == "retry" else [1, 1])
    assert res["skipped"].tolist() == [policy == "skip"] * 2
    from fnprune.io import save_npz

    save_npz(tmp_path / "b0.npz", **res)
    if policy == "skip":
        with pytest.raises(ValueError, match=r"layers \[0, 1\]: the ICA was skipped in every batch"):
            union_neuron_scores([tmp_path / "b0.npz"])
    else:
        _, info = union_neuron_scores([tmp_path / "b0.npz"])
        assert info["nonconverged_fraction"] == 1.0 and info["complete"]


@pytest.mark.parametrize("cond", [1.0, 1e3])
def test_newton_schulz_polar_factor_equals_eigh_route(cond):
    from fnprune.ica import _polar_newton_schulz

    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 32, 32, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 32, 32, generator=gen, dtype=torch.float64))
    w = u @ torch.diag_embed(torch.logspace(0, -np.log10(cond), 32, dtype=torch.float64)) @ v
    s, e = torch.linalg.eigh(w @ w.transpose(-1, -2))
    expected = (e * s.rsqrt().unsqueeze(-2)) @ e.transpose(-1, -2) @ w
    torch.testing.assert_close(_polar_newton_schulz(w), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("policy", ["keep_whole", "fail"])
def test_constant_layer_policy(tmp_path, planted, policy):
    from fnprune.io import save_npz
    from fnprune.mask import select_global, union_neuron_scores
    from fnprune.shards import ica_batch

    x, _ = planted
    paths = [tmp_path / "L0.npy", tmp_path / "L1.npy"]
    np.save(paths[0], x[:, :400].astype(np.float16))
    np.save(paths[1], np.full((x.shape[0], 400), 0.5, dtype=np.float16))
    if policy == "fail":
        with pytest.raises(ValueError, match="L1.npy: every signal of this layer is constant"):
            ica_batch(paths, 8, "torch", 0, on_constant_layer=policy)
        return
    res = ica_batch(paths, 8, "torch", 0, on_constant_layer=policy)
    assert res["constant"].tolist() == [False, True] and np.isinf(res["scores"][1]).all()
    save_npz(tmp_path / "b0.npz", **res)
    scores, _ = union_neuron_scores([tmp_path / "b0.npz"])
    kept, t = select_global(scores, [True, True], 50, 0.2)
    assert len(kept[1]) == 200 and len(kept[0]) == 150 and np.isfinite(t)
    with pytest.raises(ValueError, match="layers kept whole for constant activations"):
        select_global(scores, [True, True], 250, 0.9)


@pytest.fixture(scope="module")
def planted_background():
    return planted_networks(
        n_tokens=800, n_signals=600, n_networks=8, network_size=15, noise=1.5, seed=5, n_background=6
    )


def test_consensus_recovers_planted_networks_like_a_single_run(planted_background):
    x, member = planted_background
    runs = canica_runs(x, 10, "torch", [0, 1, 2, 3])
    assert len(runs) == 4 and all(r.maps.shape == (10, 600) for r in runs)
    scores, info = consensus_scores(runs)
    assert info["clusters"] >= 10 and 1 <= info["recurring"] <= 10 and info["min_runs"] == 2
    single = canica(x, 10, "torch", seed=0)
    assert auroc(scores, member) > 0.85
    assert auroc(scores, member) >= auroc(single.scores, member) - 0.03


def test_consensus_keeps_only_recurring_networks():
    rng = np.random.default_rng(0)

    class Run:
        def __init__(self, maps):
            self.maps = maps

    shared = rng.standard_normal((2, 500))
    runs = [
        Run(np.vstack([shared + 0.05 * rng.standard_normal((2, 500)), rng.standard_normal((2, 500))])) for _ in range(4)
    ]
    scores, info = consensus_scores(runs)
    # The two shared maps recur in all runs; each run's own random maps recur in none.
    assert info["recurring"] == 2
    assert np.corrcoef(scores, np.abs(shared).max(0))[0, 1] > 0.95
    with pytest.raises(ValueError, match="two runs"):
        consensus_scores(runs[:1])


def test_fastica_test_from_k_by_k_moments_equals_one_fastica_step():
    """Picard-O stops on FastICA's own test, computed from E[y^3 y^T] and E[3 y^2] without a pass
    over the samples; it must equal the change of an explicit FastICA step at the same W."""
    from fnprune.ica import _fastica_step_change, _start, _sym_decorrelation, _whiten

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((6, 6))
    x = torch.from_numpy(mixing @ rng.laplace(size=(1, 6, 3000)) + 0.3 * rng.standard_normal((1, 6, 3000)))
    xw = _whiten(x.double())
    w = _start([3], 6, xw)
    y = w @ xw
    n = xw.shape[-1]
    w1 = _sym_decorrelation((y**3) @ xw.transpose(-1, -2) / n - 3.0 * (y * y).mean(-1).unsqueeze(-1) * w)
    lim = (torch.einsum("lij,lij->li", w1, w).abs() - 1).abs().amax(-1)
    mine = _fastica_step_change((y**3) @ y.transpose(-1, -2) / n, 3.0 * (y * y).mean(-1))
    torch.testing.assert_close(mine, lim, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver", ["picard", "fastica"])
def test_both_solvers_recover_planted_networks(planted_background, solver):
    x, member = planted_background
    res = canica(x, 10, "torch", seed=0, solver=solver)
    assert res.converged and res.info["solver"] == solver
    assert auroc(res.scores, member) > 0.9


def test_picard_reaches_fastica_fixed_points_in_fewer_iterations():
    """Picard-O and FastICA optimise one objective: on a hard planted problem (more sources than
    components) Picard-O passes FastICA's own test where FastICA runs out of iterations, with
    the same planted AUROC, and its maps match FastICA's best maps."""
    from fnprune.ica import fastica_cube, picard_cube

    x, member = planted_networks(
        n_tokens=1000, n_signals=2000, n_networks=40, network_size=15, noise=4.0, seed=1, n_background=30
    )
    v, _ = spatial_subspace(torch.as_tensor(x), 48, 0)
    vt = v.T.contiguous()
    src_p, conv_p, it_p = picard_cube(vt, 0)
    src_f, conv_f, it_f = fastica_cube(vt, 0)
    assert conv_p and it_p < 150 and it_p < it_f
    score = {}
    for name, src in (("picard", src_p), ("fastica", src_f)):
        z = (src - src.mean(1, keepdim=True)) / src.std(1, keepdim=True)
        score[name] = (z.abs().amax(0).numpy(), z)
    assert abs(auroc(score["picard"][0], member) - auroc(score["fastica"][0], member)) < 0.02
    corr = (score["picard"][1] @ score["fastica"][1].T).abs() / vt.shape[1]
    assert float(corr.amax(1).median()) > 0.9  # most Picard maps are one of FastICA's maps


@pytest.mark.parametrize("shape", [(300, 1000), (1000, 300), (700, 2100)])
def test_blocked_symmetric_gram_equals_full_gram(shape):
    """The Gram matrix from the lower block triangle (blocked syrk, mirrored) is the full product
    to float rounding, exactly symmetric, for wide and tall inputs and a ragged last block."""
    from fnprune.ica import _gram, _mirror_lower, _syrk_lower_, column_moments

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
    mean, std = column_moments(x)
    g, tall = _gram(x, mean, std, block=256)
    z = ((x - mean) / std).double()
    full = z.T @ z if tall else z @ z.T
    assert tall == (shape[0] > shape[1]) and bool((g == g.T).all())
    torch.testing.assert_close(g.double(), full, rtol=1e-5, atol=1e-3)
    a = torch.randn(200, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lower = torch.zeros(200, 200, dtype=torch.float64)
    _syrk_lower_(lower, a, 64)  # ragged: 64, 64, 64, 8
    torch.testing.assert_close(_mirror_lower(lower, 64), a @ a.T, rtol=1e-12, atol=1e-12)


def test_fastica_step_with_reused_buffers_equals_the_plain_step(planted):
    """fastica_cube's step (buffers reused, wx^2 computed once) is sklearn's parallel FastICA
    step: the same iterations and sources as the plain formula within float rounding."""
    from fnprune.ica import _start, _sym_decorrelation, _whiten

    x, _ = planted
    v, _ = spatial_subspace(torch.as_tensor(x), 6, seed=0)
    vt = v.T.contiguous().double()
    src, converged, n_iter = fastica_cube(vt, seed=4, max_iter=7, tol=0.0)
    xw = _whiten(vt.unsqueeze(0))
    w = _start([4], 6, xw)
    n = xw.shape[-1]
    for _ in range(7):
        wx = w @ xw
        w = _sym_decorrelation((wx * wx * wx) @ xw.transpose(-1, -2) / n - 3.0 * (wx * wx).mean(-1)[..., None] * w)
    assert not converged and n_iter == 7
    torch.testing.assert_close(src, (w @ xw)[0], rtol=1e-9, atol=1e-9)
