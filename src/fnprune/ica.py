"""Spatial CanICA of MLP signals: signals are voxels (samples), tokens are time points.

Three backends compute the same decomposition of a (tokens x signals) matrix ``X``:

- ``torch``: z-score (block by block, no copy), the Gram matrix of the smaller dimension, its
  top-``k`` eigenvectors by subspace iteration run to convergence (principal angles between
  successive iterates) with an exact ``eigh`` fall-back, then FastICA (parallel, ``cube``)
  iterated in float64. CPU or CUDA.
- ``exact``: the authors' way and the correctness reference: full SVD of the signal matrix,
  then scikit-learn's float64 FastICA.
- ``nilearn``: ``nilearn.decomposition.CanICA`` on the signals wrapped as a NIfTI volume of
  shape (N, 1, 1, T), with the brain-imaging defaults overridden (no smoothing, no threshold).

Each returns the ``k`` maps z-scored across signals and, per signal, the maximum ``|z|`` over
maps (the score a key-neuron threshold ``T`` is applied to).
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import BACKENDS  # the list lives with the path grammar, which imports no torch

log = logging.getLogger(__name__)


@dataclass
class ICAResult:
    scores: np.ndarray            # (N,) max |z| over the k maps
    converged: bool
    n_iter: int
    maps: np.ndarray | None = None  # (k, N) z-scored maps, when asked for
    info: dict = field(default_factory=dict)


def zscore_columns(x: torch.Tensor) -> torch.Tensor:
    """Z-score each column over rows (sample std); a constant column keeps std 1."""
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True) if x.shape[0] > 1 else torch.ones_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean) / std


def _zscore_rows(s: torch.Tensor) -> torch.Tensor:
    std = s.std(1, keepdim=True)
    return (s - s.mean(1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def column_moments(x: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and sample std (1 for constant columns), column block by column block."""
    t, n = x.shape
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    std = torch.empty(n, dtype=torch.float32, device=x.device)
    for j in range(0, n, block):
        xb = x[:, j:j + block].to(torch.float32)
        mean[j:j + block] = xb.mean(0)
        std[j:j + block] = xb.std(0) if t > 1 else torch.ones(xb.shape[1], device=x.device)
    std[std <= 0] = 1.0
    return mean, std


def _zblock(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
    return (x[:, j0:j1].to(torch.float32) - mean[j0:j1]) / std[j0:j1]


def exact_subspace(xz: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k spatial components (N x k) of an already z-scored matrix, by eigh of its Gram matrix."""
    ones = torch.ones(xz.shape[1], dtype=torch.float32, device=xz.device)
    zeros = torch.zeros_like(ones)
    g, tall = _gram(xz, zeros, ones)
    evals, evecs = torch.linalg.eigh(g.double())
    u = evecs[:, -k:].flip(1).to(torch.float32)
    return u if tall else _spatial_from_temporal(xz, zeros, ones, u)


def _gram(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the z-scored data in its smaller dimension; ``tall`` when that is signals."""
    t, n = x.shape
    tall = t > n
    m = n if tall else t
    dtype = torch.float64 if x.is_cuda else torch.float32
    g = torch.zeros(m, m, dtype=dtype, device=x.device)
    if tall:
        for i in range(0, t, block):
            zb = ((x[i:i + block].to(torch.float32) - mean) / std).to(dtype)
            g.addmm_(zb.T, zb)
    else:
        for j in range(0, n, block):
            zb = _zblock(x, mean, std, j, j + block).to(dtype)
            g.addmm_(zb, zb.T)
    return g, tall


def _spatial_from_temporal(x, mean, std, u: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Spatial singular vectors ``Z^T u / ||Z^T u||`` from temporal ones, column block by block."""
    n = x.shape[1]
    v = torch.empty(n, u.shape[1], dtype=torch.float32, device=x.device)
    for j in range(0, n, block):
        v[j:j + block] = _zblock(x, mean, std, j, j + block).T @ u
    return v / torch.linalg.norm(v, dim=0, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def top_eigvecs(g: torch.Tensor, k: int, seed: int, oversample: int | None = None,
                max_iter: int = 100, tol: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Top-k eigenvectors of a symmetric PSD matrix by block subspace iteration.

    Iterations cost ``m^2 l`` (cheap next to forming ``g``), so they run until the Ritz subspace
    stops moving: ``1 - mean cos(principal angles)`` between successive iterates below ``tol``.
    If it has not settled after ``max_iter`` steps (a spectrum flat around ``k``), a float64
    ``eigh`` gives the exact answer instead.
    """
    m = g.shape[0]
    l = min(m, k + (oversample if oversample is not None else max(16, k // 2)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, l, generator=gen).to(g))
    prev = None
    for it in range(1, max_iter + 1):
        q, _ = torch.linalg.qr(g @ q)
        if it % 2 and it > 1:
            continue
        h = q.T @ g @ q
        w, s = torch.linalg.eigh(h.double())
        cur = q @ s[:, -k:].flip(1).to(q.dtype)
        if prev is not None:
            gap = 1.0 - float(torch.linalg.svdvals(prev.T @ cur).clamp(max=1.0).mean())
            if gap < tol:
                return cur, {"subspace": "gram-subspace-iteration", "power_iter": it, "subspace_gap": gap}
        prev = cur
    log.info("subspace iteration did not settle in %d steps; exact eigh", max_iter)
    evals, evecs = torch.linalg.eigh(g.double())
    return evecs[:, -k:].flip(1).to(g.dtype), {"subspace": "gram-eigh", "power_iter": max_iter}


def spatial_subspace(x: torch.Tensor, k: int, seed: int, mean: torch.Tensor | None = None,
                     std: torch.Tensor | None = None, **kw) -> tuple[torch.Tensor, dict]:
    """Top-k spatial subspace (N x k, orthonormal columns) of the z-scored (T x N) matrix.

    ``x`` is z-scored on the fly, block by block (``mean``/``std`` per column, computed when
    not given), so no z-scored copy of the signal matrix is ever held. The Gram matrix of the
    smaller dimension is formed once (float32 on the CPU, float64 on CUDA, where float32
    products may run at reduced precision); its top-k eigenvectors come from
    :func:`top_eigvecs`.
    """
    if mean is None or std is None:
        mean, std = column_moments(x)
    g, tall = _gram(x, mean, std)
    u, info = top_eigvecs(g, k, seed, **kw)
    del g
    u = u.to(torch.float32)
    return (u if tall else _spatial_from_temporal(x, mean, std, u)), info


def _polar_newton_schulz(w: torch.Tensor, max_iter: int = 60, tol: float = 1e-12) -> torch.Tensor | None:
    """``(W W^T)^{-1/2} W`` by Newton-Schulz iterations (matrix products only), or None."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    x = w / torch.linalg.matrix_norm(w, ord="fro", keepdim=True)
    for _ in range(max_iter):
        a = x @ x.transpose(-1, -2)
        if float((a - eye).abs().amax()) < tol:
            return x
        x = 1.5 * x - 0.5 * a @ x
    return None


def _sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """``(W W^T)^{-1/2} W`` for one (k x k) or a batch (L x k x k) of unmixing matrices.

    On the CPU by an eigendecomposition of ``W W^T``. On CUDA by Newton-Schulz iterations:
    the CUDA eigensolver fails on the nearly repeated eigenvalues of ``W W^T`` once FastICA
    settles, and small eigendecompositions would cost a host round trip per step; if the
    iterations do not settle the CPU route is taken.
    """
    if w.is_cuda:
        polar = _polar_newton_schulz(w)
        if polar is not None:
            return polar
    s, u = torch.linalg.eigh((w @ w.transpose(-1, -2)).cpu())
    s, u = s.to(w.device), u.to(w.device)
    s = s.clamp(min=torch.finfo(w.dtype).tiny)
    return (u * s.rsqrt().unsqueeze(-2)) @ u.transpose(-1, -2) @ w


def fastica_cube(x: torch.Tensor, seed: int | list[int], max_iter: int = 300, tol: float = 1e-4
                 ) -> tuple[torch.Tensor, bool | list[bool], int | list[int]]:
    """Parallel FastICA with the ``cube`` non-linearity, in float64 (scikit-learn's ``_ica_par``).

    ``x`` is (k x N): k mixtures, N samples; or a batch (L x k x N) of independent problems
    (one per layer) with one seed each, iterated together so a GPU runs one kernel per step for
    all of them. A problem that reached ``tol`` stops changing while the others go on. Returns
    the sources, whether each reached ``tol`` and its number of iterations.
    """
    single = x.dim() == 2
    x = (x.unsqueeze(0) if single else x).double()
    seeds = [seed] if isinstance(seed, int) else list(seed)
    n_prob, k, n = x.shape
    xc = x - x.mean(-1, keepdim=True)
    d, e = torch.linalg.eigh(xc @ xc.transpose(-1, -2) / n)
    d = d.clamp(min=torch.finfo(torch.float64).eps * float(d.max()))
    xw = ((e * d.rsqrt().unsqueeze(-2)).transpose(-1, -2) @ xc).contiguous()   # whitened
    w0 = np.stack([np.random.RandomState(sd).standard_normal((k, k)) for sd in seeds])
    w = _sym_decorrelation(torch.from_numpy(w0).to(xw))
    active = torch.ones(n_prob, dtype=torch.bool, device=xw.device)
    n_iter = torch.full((n_prob,), max_iter, dtype=torch.long, device=xw.device)
    for it in range(1, max_iter + 1):
        wx = w @ xw
        g = wx * wx * wx
        g_prime_mean = 3.0 * (wx * wx).mean(-1)
        w1 = _sym_decorrelation(g @ xw.transpose(-1, -2) / n - g_prime_mean.unsqueeze(-1) * w)
        lim = (torch.einsum("lij,lij->li", w1, w).abs() - 1).abs().amax(-1)
        w = torch.where(active[:, None, None], w1, w)
        done = active & (lim < tol)
        n_iter[done] = it
        active &= ~done
        if not bool(active.any()):
            break
    sources = w @ xw
    converged = (~active).tolist()
    iters = n_iter.tolist()
    if single:
        return sources[0], converged[0], iters[0]
    return sources, converged, iters


def _finish(sources: torch.Tensor | np.ndarray, keep_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
    s = torch.as_tensor(sources).double()
    z = _zscore_rows(s)
    scores = z.abs().amax(0).float().cpu().numpy()
    return scores, (z.float().cpu().numpy() if keep_maps else None)


def canica_torch_layers(xs, k: int, seeds: list[int], max_iter: int = 300, tol: float = 1e-4,
                        device: str = "cpu", keep_maps: bool = False) -> list[ICAResult]:
    """The torch backend on several layers: subspaces one by one, FastICA of all of them at once.

    ``xs`` is an iterable of (tokens x signals) matrices (arrays, tensors, or callables that
    load one), consumed one at a time so only one signal matrix is held.
    """
    t0 = time.time()
    vs, infos = [], []
    for x, seed in zip(xs, seeds):
        x = x() if callable(x) else x
        ts = time.time()
        v, info = spatial_subspace(torch.as_tensor(x).to(device=device), k, seed)
        del x
        vs.append(v.T.contiguous())
        info["subspace_s"] = time.time() - ts
        infos.append(info)
    ti = time.time()
    sources, converged, n_iter = fastica_cube(torch.stack(vs), seeds, max_iter=max_iter, tol=tol)
    ica_s = (time.time() - ti) / len(vs)
    out = []
    for src, conv, it, info in zip(sources, converged, n_iter, infos):
        scores, maps = _finish(src, keep_maps)
        info["wall_s"] = info["subspace_s"] + ica_s
        out.append(ICAResult(scores, conv, it, maps, info))
    log.debug("torch CanICA of %d layers in %.2f s", len(out), time.time() - t0)
    return out


def canica_torch(x: np.ndarray | torch.Tensor, k: int, seed: int = 0, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "cpu", keep_maps: bool = False) -> ICAResult:
    return canica_torch_layers([x], k, [seed], max_iter, tol, device, keep_maps)[0]


def canica_exact(x: np.ndarray | torch.Tensor, k: int, seed: int = 0, max_iter: int = 300,
                 tol: float = 1e-4, keep_maps: bool = False) -> ICAResult:
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.time()
    xz = zscore_columns(torch.as_tensor(x, dtype=torch.float32)).numpy()
    _, _, vt = np.linalg.svd(xz, full_matrices=False)           # full float32 SVD
    ica = FastICA(n_components=k, algorithm="parallel", whiten="unit-variance", fun="cube",
                  tol=tol, max_iter=max_iter, whiten_solver="svd", random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(vt[:k].T.astype(np.float64)).T
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    scores, maps = _finish(sources, keep_maps)
    return ICAResult(scores, converged, int(ica.n_iter_), maps,
                     {"subspace": "full-svd", "wall_s": time.time() - t0})


def canica_nilearn(x: np.ndarray | torch.Tensor, k: int, seed: int = 0, keep_maps: bool = False
                   ) -> ICAResult:
    import nibabel as nib
    from nilearn.decomposition import CanICA
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.time()
    x = np.asarray(x, dtype=np.float32)
    t, n = x.shape
    img = nib.Nifti1Image(np.ascontiguousarray(x.T).reshape(n, 1, 1, t), affine=np.eye(4))
    mask = nib.Nifti1Image(np.ones((n, 1, 1), dtype=np.int8), affine=np.eye(4))
    canica = CanICA(mask=mask, n_components=k, smoothing_fwhm=None, threshold=None,
                    detrend=False, standardize="zscore_sample", n_init=1, random_state=seed,
                    verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        canica.fit(img)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    scores, maps = _finish(canica.components_, keep_maps)
    # nilearn runs scikit-learn's fastica with max_iter=200 and does not expose n_iter.
    return ICAResult(scores, converged, -1, maps, {"subspace": "nilearn-multipca", "wall_s": time.time() - t0})


def _check_k(x, k: int) -> None:
    t, n = x.shape
    if not 1 <= k <= min(t, n):
        raise ValueError(f"components k={k} must be between 1 and min(tokens, signals) = min({t}, {n})")


def canica(x, k: int, backend: str = "torch", seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
           device: str = "cpu", keep_maps: bool = False) -> ICAResult:
    """Decompose one (tokens x signals) matrix with the chosen backend."""
    _check_k(x, k)
    if backend == "torch":
        return canica_torch(x, k, seed, max_iter, tol, device, keep_maps)
    if backend == "exact":
        return canica_exact(x, k, seed, max_iter, tol, keep_maps)
    if backend == "nilearn":
        return canica_nilearn(x, k, seed, keep_maps)
    raise ValueError(f"ica backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def canica_runs(x, k: int, backend: str, seeds: list[int], max_iter: int = 300, tol: float = 1e-4,
                device: str = "cpu") -> list[ICAResult]:
    """``len(seeds)`` CanICA runs of one matrix with their maps. The torch backend computes the
    subspace once (it does not depend on the FastICA start) and iterates every run's FastICA as
    one batched problem; the other backends run one after another."""
    if backend != "torch":
        return [canica(x, k, backend, seed=sd, max_iter=max_iter, tol=tol, device=device, keep_maps=True)
                for sd in seeds]
    _check_k(x, k)
    t0 = time.time()
    v, info = spatial_subspace(torch.as_tensor(x).to(device=device), k, seeds[0])
    vt = v.T.contiguous()
    sources, converged, n_iter = fastica_cube(vt.unsqueeze(0).expand(len(seeds), -1, -1), seeds, max_iter, tol)
    wall = (time.time() - t0) / len(seeds)
    out = []
    for src, conv, it in zip(sources, converged, n_iter):
        scores, maps = _finish(src, keep_maps=True)
        out.append(ICAResult(scores, conv, it, maps, {**info, "wall_s": wall}))
    return out


def consensus_scores(runs: list[ICAResult], min_runs: int | None = None, min_similarity: float = 0.5
                     ) -> tuple[np.ndarray, dict]:
    """Scores from the networks that recur across FastICA runs (ICASSO-style consensus).

    The ``R x k`` maps of all runs are clustered by average-linkage agglomeration on
    ``1 - |corr|``, cut where clusters stop being alike (average ``|corr|`` between merged
    groups below ``min_similarity``), so unrelated maps are never forced together. A cluster is
    a recurring network when maps of at least ``min_runs`` (default: half the runs, rounded up)
    different runs fall in it; its
    representative is the centrotype (the member most similar to the rest). A signal's score is
    its maximum ``|z|`` over the representatives. ICASSO's quality index of a cluster (mean
    similarity inside minus mean similarity to the other maps) is recorded. When no cluster
    recurs, the cluster spanning the most runs is kept, so the layer still has a network.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n_runs = len(runs)
    if n_runs < 2 or any(r.maps is None for r in runs):
        raise ValueError("consensus ICA needs at least two runs with their maps")
    k = runs[0].maps.shape[0]
    maps = np.concatenate([r.maps for r in runs]).astype(np.float64)
    maps = (maps - maps.mean(1, keepdims=True)) / np.maximum(maps.std(1, keepdims=True), 1e-12)
    run_of = np.repeat(np.arange(n_runs), k)
    sim = np.clip(np.abs(maps @ maps.T) / maps.shape[1], 0.0, 1.0)
    dist = 1.0 - sim
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), "average"), t=1.0 - min_similarity,
                      criterion="distance")
    need = min_runs if min_runs is not None else -(-n_runs // 2)
    clusters = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        others = np.flatnonzero(labels != c)
        inside = sim[np.ix_(idx, idx)]
        alike = (inside.sum() - len(idx)) / (len(idx) * (len(idx) - 1)) if len(idx) > 1 else 0.0
        iq = alike - (sim[np.ix_(idx, others)].mean() if len(others) else 0.0)
        recurs = len(set(run_of[idx].tolist())) >= need
        clusters.append((recurs, len(set(run_of[idx].tolist())), float(iq), int(idx[np.argmax(inside.sum(1))])))
    kept = [c for c in clusters if c[0]] or [max(clusters, key=lambda c: (c[1], c[2]))]
    scores = np.abs(maps[[c[3] for c in kept]]).max(0).astype(np.float32)
    info = {"clusters": len(clusters), "recurring": len(kept), "min_runs": need,
            "quality_index": float(np.mean([c[2] for c in kept]))}
    return scores, info


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map an activation shard, or an error naming it and how to recover.

    A batch's shards are one output (a temporary folder): the folder, not the one file, is what
    to delete, and the next run extracts the batch again.
    """
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: missing or unreadable activation shard ({type(e).__name__}: {e}); "
                         f"delete its folder {Path(path).parent} and rerun (the batch is extracted again)") from None


def load_shard(path: str | Path, n_signals: int | None = None) -> np.ndarray:
    """Read an activation shard, refusing truncated, mis-shaped or non-finite ones."""
    x = open_shard(path)
    if x.ndim != 2 or (n_signals is not None and x.shape[1] != n_signals):
        raise ValueError(f"{path}: activation shard of shape {x.shape}; expected (tokens, "
                         f"{n_signals if n_signals is not None else '2*intermediate'})")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: activation shard holds NaN or inf (fp16 overflow?); extract "
                         f"with dtype float32 or bfloat16")
    return x


NONCONVERGENCE_POLICIES = ("keep", "retry", "skip", "fail")
CONSTANT_LAYER_POLICIES = ("keep_whole", "fail")


def _constant_layers(shard_paths: list[str | Path], policy: str) -> np.ndarray:
    """Layers whose every signal is constant over the batch: no networks to find there."""
    if policy not in CONSTANT_LAYER_POLICIES:
        raise ValueError(f"ica.on_constant_layer: expected one of {', '.join(CONSTANT_LAYER_POLICIES)}, "
                         f"got {policy!r}")
    constant = np.zeros(len(shard_paths), dtype=bool)
    for layer, path in enumerate(shard_paths):
        x = open_shard(path)
        # Two rows that differ settle it without reading the shard; only a layer whose first two
        # rows agree is scanned in full (the ICA reads every shard once more anyway).
        constant[layer] = x.shape[0] < 2 or (np.array_equal(x[0], x[1]) and bool((np.asarray(x[:1]) == x).all()))
        if constant[layer]:
            if policy == "fail":
                raise ValueError(f"{path}: every signal of this layer is constant over the batch; "
                                 f"ica.on_constant_layer is 'fail' (keep_whole keeps the layer unpruned)")
            log.warning("%s: constant activations; the layer is kept whole (ica.on_constant_layer)", path)
    return constant


def ica_batch(shard_paths: list[str | Path], k: int, backend: str, seed: int, max_iter: int = 300,
              tol: float = 1e-4, device: str = "cpu", on_nonconvergence: str = "keep",
              retries: int = 2, on_constant_layer: str = "keep_whole", runs: int = 1) -> dict[str, np.ndarray]:
    """CanICA of every layer shard of one calibration batch; per-layer scores and convergence.

    Layer ``l`` uses seed ``seed + 1000 * l``. On CUDA the torch backend iterates the FastICA
    of all layers together (one batched problem); elsewhere layer by layer, bounding memory.
    A layer whose FastICA does not reach ``tol`` is handled by ``on_nonconvergence``: ``keep``
    its maps (recorded; what the authors' code does), ``retry`` with new seeds up to
    ``retries`` times, ``skip`` it (this batch then does not vote for that layer's neurons), or
    ``fail``. A layer whose signals are all constant has no networks: ``on_constant_layer``
    keeps it whole (scores +inf, never pruned) or fails.

    With ``runs`` > 1 (consensus ICA) every layer is decomposed ``runs`` times (seeds
    ``seed + 1000 * l + 7919 * r``) and scored by :func:`consensus_scores`. A run that did not
    converge leaves the ensemble unless the policy is ``keep`` (``fail`` still fails); the layer
    counts as converged when at least two runs converged.
    """
    from tqdm import tqdm

    constant = _constant_layers(shard_paths, on_constant_layer)
    if constant.any():
        live = [p for p, c in zip(shard_paths, constant) if not c]
        res = ica_batch(live, k, backend, seed, max_iter, tol, device, on_nonconvergence, retries,
                        on_constant_layer, runs) if live else None
        n_signals = open_shard(shard_paths[0]).shape[1]
        out = {"scores": np.full((len(shard_paths), n_signals), np.inf, dtype=np.float32),
               "converged": np.ones(len(shard_paths), bool), "n_iter": np.zeros(len(shard_paths), np.int64),
               "wall_s": np.zeros(len(shard_paths)), "attempts": np.zeros(len(shard_paths), np.int64),
               "skipped": np.zeros(len(shard_paths), bool)}
        if runs > 1:
            out.update(recurring=np.zeros(len(shard_paths), np.int64), quality_index=np.full(len(shard_paths), np.nan))
        if res is not None:
            for key in out:
                out[key][~constant] = res[key]
        out["constant"] = constant
        return out
    if on_nonconvergence not in NONCONVERGENCE_POLICIES:
        raise ValueError(f"ica.on_nonconvergence: expected one of {', '.join(NONCONVERGENCE_POLICIES)}, "
                         f"got {on_nonconvergence!r}")
    seeds = [seed + 1000 * layer for layer in range(len(shard_paths))]
    if runs > 1:
        return _consensus_batch(shard_paths, k, backend, seeds, runs, max_iter, tol, device, on_nonconvergence)
    if backend == "torch" and str(device).startswith("cuda"):
        results = canica_torch_layers([functools.partial(load_shard, p) for p in shard_paths], k, seeds,
                                      max_iter, tol, device)
    else:
        results = []
        for p, sd in zip(tqdm(shard_paths, desc=f"ica {backend} k={k}", mininterval=5), seeds):
            x = load_shard(p)
            try:
                results.append(canica(x, k, backend, seed=sd, max_iter=max_iter, tol=tol, device=device))
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from None
    attempts = np.ones(len(results), dtype=np.int64)
    skipped = np.zeros(len(results), dtype=bool)
    for layer, (path, res) in enumerate(zip(shard_paths, results)):
        if not res.converged and on_nonconvergence == "retry":
            for attempt in range(1, retries + 1):
                res = canica(load_shard(path), k, backend, seed=seeds[layer] + 100 * attempt,
                             max_iter=max_iter, tol=tol, device=device)
                attempts[layer] += 1
                if res.converged:
                    break
            results[layer] = res
        if not res.converged:
            msg = f"{path}: FastICA did not converge in {max_iter} iterations (tol {tol})"
            if on_nonconvergence == "fail":
                raise RuntimeError(f"{msg}; ica.on_nonconvergence is 'fail' (use keep, retry or skip, "
                                   f"or raise ica.max_iter)")
            skipped[layer] = on_nonconvergence == "skip"
            log.warning("%s; %s", msg, "this batch is skipped for the layer" if skipped[layer] else "kept")
        log.info("layer %d: k=%d, %s, iterations %d, attempts %d, %.2f s", layer, k, res.info.get("subspace"),
                 res.n_iter, attempts[layer], res.info["wall_s"])
    return {"scores": np.stack([r.scores for r in results]),
            "converged": np.array([r.converged for r in results]),
            "n_iter": np.array([r.n_iter for r in results]),
            "wall_s": np.array([r.info["wall_s"] for r in results]),
            "attempts": attempts, "skipped": skipped, "constant": np.zeros(len(results), bool)}


def _consensus_batch(shard_paths, k: int, backend: str, seeds: list[int], runs: int, max_iter: int, tol: float,
                     device: str, on_nonconvergence: str) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    out = {key: [] for key in ("scores", "converged", "n_iter", "wall_s", "attempts", "skipped", "constant",
                               "recurring", "quality_index")}
    for path, sd in zip(tqdm(shard_paths, desc=f"consensus ica {backend} k={k} x{runs}", mininterval=5), seeds):
        t0 = time.time()
        try:
            res = canica_runs(load_shard(path), k, backend, [sd + 7919 * r for r in range(runs)], max_iter, tol,
                              device)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        good = [r for r in res if r.converged]
        if len(good) < len(res):
            msg = f"{path}: {len(res) - len(good)} of {runs} FastICA runs did not converge in {max_iter} iterations"
            if on_nonconvergence == "fail":
                raise RuntimeError(f"{msg}; ica.on_nonconvergence is 'fail'")
            log.warning("%s; %s", msg, "kept" if on_nonconvergence == "keep" or len(good) < 2 else "left out")
        ensemble = res if on_nonconvergence == "keep" or len(good) < 2 else good
        scores, info = consensus_scores(ensemble)
        log.info("layer %s: k=%d, %d runs, %d of %d clusters recur (quality %.3f), %.2f s", Path(path).stem, k,
                 len(ensemble), info["recurring"], info["clusters"], info["quality_index"], time.time() - t0)
        for key, val in (("scores", scores), ("converged", len(good) >= 2), ("n_iter", max(r.n_iter for r in res)),
                         ("wall_s", time.time() - t0), ("attempts", runs), ("skipped", False), ("constant", False),
                         ("recurring", info["recurring"]), ("quality_index", info["quality_index"])):
            out[key].append(val)
    return {key: np.stack(v) if key == "scores" else np.array(v) for key, v in out.items()}
