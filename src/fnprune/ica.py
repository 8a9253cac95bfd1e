"""Spatial CanICA of MLP signals: signals are voxels (samples), tokens are time points.

Three backends compute the same decomposition of a (tokens x signals) matrix ``X``:

- ``torch``: z-score, top-``k`` spatial subspace by randomized subspace iteration whose
  convergence is checked (principal angles between successive iterates) with an exact
  fall-back, then FastICA (parallel, ``cube``) iterated in float64. CPU or CUDA.
- ``exact``: the authors' way and the correctness reference: full SVD of the signal matrix,
  then scikit-learn's float64 FastICA.
- ``nilearn``: ``nilearn.decomposition.CanICA`` on the signals wrapped as a NIfTI volume of
  shape (N, 1, 1, T), with the brain-imaging defaults overridden (no smoothing, no threshold).

Each returns the ``k`` maps z-scored across signals and, per signal, the maximum ``|z|`` over
maps (the score a key-neuron threshold ``T`` is applied to).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "exact", "nilearn")


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


def _ritz(a: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of ``a`` (N x T) within the range of ``q`` (N x l)."""
    b = q.T @ a
    ub, _, _ = torch.linalg.svd(b, full_matrices=False)
    return q @ ub[:, :k]


def exact_subspace(xz: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k spatial components (N x k) through the smaller Gram matrix, exactly."""
    t, n = xz.shape
    xd = xz.double()
    if t <= n:
        evals, evecs = torch.linalg.eigh(xd @ xd.T)            # (T x T)
        u = evecs[:, -k:].flip(1)
        v = xd.T @ u
        v = v / torch.linalg.norm(v, dim=0, keepdim=True)
    else:
        evals, evecs = torch.linalg.eigh(xd.T @ xd)            # (N x N)
        v = evecs[:, -k:].flip(1)
    return v.to(xz.dtype)


def spatial_subspace(xz: torch.Tensor, k: int, seed: int, oversample: int | None = None,
                     max_power_iter: int = 8, tol: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """Top-k spatial subspace (N x k, orthonormal columns) of the (T x N) matrix ``xz``.

    Randomized subspace iteration on ``A = xz.T``; after each power step the Ritz subspace is
    compared with the previous one (mean cosine of the principal angles). It is accepted once
    ``1 - mean cos < tol``; if it has not settled after ``max_power_iter`` steps (a spectrum
    flat around ``k``), the exact Gram-matrix route is taken instead.
    """
    t, n = xz.shape
    l = min(k + (oversample if oversample is not None else max(10, k // 2)), t, n)
    a = xz.T                                                    # (N x T) view
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(t, l, generator=gen, dtype=xz.dtype).to(xz.device)
    q, _ = torch.linalg.qr(a @ omega)
    prev = None
    for it in range(1, max_power_iter + 1):
        q, _ = torch.linalg.qr(a @ (a.T @ q))
        cur = _ritz(a, q, k)
        if prev is not None:
            cos = torch.linalg.svdvals(prev.T @ cur).clamp(max=1.0)
            gap = 1.0 - float(cos.mean())
            if gap < tol:
                return cur, {"subspace": "randomized", "power_iter": it, "subspace_gap": gap}
        prev = cur
    log.info("randomized subspace did not settle in %d power steps; exact fall-back", max_power_iter)
    return exact_subspace(xz, k), {"subspace": "exact-fallback", "power_iter": max_power_iter}


def _sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    s, u = torch.linalg.eigh(w @ w.T)
    s = s.clamp(min=torch.finfo(w.dtype).tiny)
    return (u * s.rsqrt()) @ u.T @ w


def fastica_cube(x: torch.Tensor, seed: int, max_iter: int = 300, tol: float = 1e-4
                 ) -> tuple[torch.Tensor, bool, int]:
    """Parallel FastICA with the ``cube`` non-linearity, in float64.

    ``x`` is (k x N): k mixtures, N samples. Returns the (k x N) sources, whether the update
    reached ``tol`` and the number of iterations. The algorithm is scikit-learn's ``_ica_par``.
    """
    x = x.double()
    k, n = x.shape
    xc = x - x.mean(1, keepdim=True)
    d, e = torch.linalg.eigh(xc @ xc.T / n)
    d = d.clamp(min=torch.finfo(torch.float64).eps * float(d.max()))
    xw = ((e * d.rsqrt()).T @ xc).contiguous()                  # whitened, (k x N)
    w0 = np.random.RandomState(seed).standard_normal((k, k))
    w = _sym_decorrelation(torch.from_numpy(w0).to(xw))
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        wx = w @ xw
        g = wx * wx * wx
        g_prime_mean = 3.0 * (wx * wx).mean(1)
        w1 = _sym_decorrelation(g @ xw.T / n - g_prime_mean[:, None] * w)
        lim = float((torch.abs(torch.einsum("ij,ij->i", w1, w)) - 1).abs().max())
        w = w1
        if lim < tol:
            converged = True
            break
    return w @ xw, converged, it


def _finish(sources: torch.Tensor | np.ndarray, keep_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
    s = torch.as_tensor(sources).double()
    z = _zscore_rows(s)
    scores = z.abs().amax(0).float().cpu().numpy()
    return scores, (z.float().cpu().numpy() if keep_maps else None)


def canica_torch(x: np.ndarray | torch.Tensor, k: int, seed: int = 0, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "cpu", keep_maps: bool = False) -> ICAResult:
    t0 = time.time()
    xz = zscore_columns(torch.as_tensor(x).to(device=device, dtype=torch.float32))
    v, info = spatial_subspace(xz, k, seed)
    sources, converged, n_iter = fastica_cube(v.T, seed, max_iter=max_iter, tol=tol)
    scores, maps = _finish(sources, keep_maps)
    info["wall_s"] = time.time() - t0
    return ICAResult(scores, converged, n_iter, maps, info)


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


def canica(x, k: int, backend: str = "torch", seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
           device: str = "cpu", keep_maps: bool = False) -> ICAResult:
    """Decompose one (tokens x signals) matrix with the chosen backend."""
    t, n = x.shape
    if not 1 <= k <= min(t, n):
        raise ValueError(f"components k={k} must be between 1 and min(tokens, signals) = "
                         f"min({t}, {n})")
    if backend == "torch":
        return canica_torch(x, k, seed, max_iter, tol, device, keep_maps)
    if backend == "exact":
        return canica_exact(x, k, seed, max_iter, tol, keep_maps)
    if backend == "nilearn":
        return canica_nilearn(x, k, seed, keep_maps)
    raise ValueError(f"ica backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def load_shard(path: str | Path, n_signals: int | None = None) -> np.ndarray:
    """Read an activation shard, refusing truncated, mis-shaped or non-finite ones."""
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: unreadable activation shard ({e}); delete it and rerun the "
                         f"extraction of its batch") from None
    if x.ndim != 2 or (n_signals is not None and x.shape[1] != n_signals):
        raise ValueError(f"{path}: activation shard of shape {x.shape}; expected (tokens, "
                         f"{n_signals if n_signals is not None else '2*intermediate'})")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: activation shard holds NaN or inf (fp16 overflow?); extract "
                         f"with dtype float32 or bfloat16")
    return x


def ica_batch(shard_paths: list[str | Path], k: int, backend: str, seed: int, max_iter: int = 300,
              tol: float = 1e-4, device: str = "cpu") -> dict[str, np.ndarray]:
    """CanICA of every layer shard of one calibration batch; per-layer scores and convergence."""
    from tqdm import tqdm

    scores, converged, n_iter, wall = [], [], [], []
    for layer, path in enumerate(tqdm(shard_paths, desc=f"ica {backend} k={k}", mininterval=5)):
        x = load_shard(path)
        res = canica(x, k, backend, seed=seed + 1000 * layer, max_iter=max_iter, tol=tol, device=device)
        if not res.converged:
            log.warning("%s: FastICA did not converge in %d iterations (tol %g)", path, max_iter, tol)
        log.info("layer %d: %d tokens x %d signals, k=%d, %s, iterations %d, %.2f s", layer,
                 x.shape[0], x.shape[1], k, res.info.get("subspace"), res.n_iter, res.info["wall_s"])
        scores.append(res.scores)
        converged.append(res.converged)
        n_iter.append(res.n_iter)
        wall.append(res.info["wall_s"])
    return {"scores": np.stack(scores), "converged": np.array(converged),
            "n_iter": np.array(n_iter), "wall_s": np.array(wall)}
