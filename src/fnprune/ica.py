"""Spatial CanICA of MLP signals: signals are voxels (samples), tokens are time points.

Three backends compute the same decomposition of a (tokens x signals) matrix ``X``:

- ``torch``: z-score (block by block, no copy), the Gram matrix of the smaller dimension, its
  top-``k`` eigenvectors by subspace iteration run to convergence (principal angles between
  successive iterates) with an exact ``eigh`` fall-back, then the ICA of the ``k`` components
  in float64: parallel FastICA (``solver="fastica"``, the default) or Picard-O (``"picard"``),
  one ``cube`` objective with the same fixed points and FastICA's stopping test. CPU or CUDA.
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

import numpy as np
import torch

from .config import BACKENDS  # the list lives with the path grammar, which imports no torch

log = logging.getLogger(__name__)


@dataclass
class ICAResult:
    scores: np.ndarray  # (N,) max |z| over the k maps
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
        xb = x[:, j : j + block].to(torch.float32)
        mean[j : j + block] = xb.mean(0)
        std[j : j + block] = xb.std(0) if t > 1 else torch.ones(xb.shape[1], device=x.device)
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


def _syrk_lower_(g: torch.Tensor, a: torch.Tensor, block: int) -> None:
    """``g += a a^T`` (``a``: m x b) on the blocks of the lower triangle only (a blocked syrk).

    The diagonal blocks are full products; the blocks above the diagonal are left untouched
    (:func:`_mirror_lower` fills them). With ``nb`` row blocks this costs ``(nb + 1) / (2 nb)``
    of the full product's FLOPs.
    """
    m = a.shape[0]
    for i in range(0, m, block):
        g[i : i + block, : i + block].addmm_(a[i : i + block], a[: i + block].T)


def _mirror_lower(g: torch.Tensor, block: int) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is ``g``'s (blocks above the diagonal filled)."""
    m = g.shape[0]
    for i in range(0, m, block):
        d = g[i : i + block, i : i + block]
        d.copy_(d.tril() + d.tril(-1).T)  # exactly symmetric diagonal blocks
        g[:i, i : i + block] = g[i : i + block, :i].T
    return g


def _syrk_block(m: int, n_blocks: int = 8, align: int = 64) -> int:
    """Row-block size for :func:`_syrk_lower_`: about ``m / n_blocks``, a multiple of ``align``."""
    per_block = -(-m // n_blocks)
    return max(align, -(-per_block // align) * align)


def _gram(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the z-scored data in its smaller dimension; ``tall`` when that is signals.

    Symmetric, so only the lower triangle of row blocks is multiplied (:func:`_syrk_lower_`,
    about 56% of a full product's FLOPs at 8 row blocks) and then mirrored.
    """
    t, n = x.shape
    tall = t > n
    m = n if tall else t
    dtype = torch.float64 if x.is_cuda else torch.float32
    g = torch.zeros(m, m, dtype=dtype, device=x.device)
    rows = _syrk_block(m)
    if tall:
        for i in range(0, t, block):
            zb = ((x[i : i + block].to(torch.float32) - mean) / std).to(dtype)
            _syrk_lower_(g, zb.T, rows)
    else:
        for j in range(0, n, block):
            zb = _zblock(x, mean, std, j, j + block).to(dtype)
            _syrk_lower_(g, zb, rows)
    return _mirror_lower(g, rows), tall


def _spatial_from_temporal(x, mean, std, u: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Spatial singular vectors ``Z^T u / ||Z^T u||`` from temporal ones, column block by block."""
    n = x.shape[1]
    v = torch.empty(n, u.shape[1], dtype=torch.float32, device=x.device)
    for j in range(0, n, block):
        v[j : j + block] = _zblock(x, mean, std, j, j + block).T @ u
    return v / torch.linalg.norm(v, dim=0, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def top_eigvecs(
    g: torch.Tensor, k: int, seed: int, oversample: int | None = None, max_iter: int = 100, tol: float = 1e-6
) -> tuple[torch.Tensor, dict]:
    """Top-k eigenvectors of a symmetric PSD matrix by block subspace iteration.

    Iterations cost ``m^2 width`` (``width``: the sketch, ``k`` plus oversampling; cheap next to
    forming ``g``; one product ``g q`` a step, which also serves that step's Rayleigh-Ritz
    check), so they run until the Ritz subspace stops moving: ``1 - mean cos(principal
    angles)`` between successive iterates below ``tol``. If it has not settled after ``max_iter`` steps (a spectrum flat around ``k``), a float64
    ``eigh`` gives the exact answer instead.
    """
    m = g.shape[0]
    width = min(m, k + (oversample if oversample is not None else max(16, k // 2)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, width, generator=gen).to(g))
    gq = g @ q
    prev = None
    for it in range(1, max_iter + 1):
        q, _ = torch.linalg.qr(gq)
        gq = g @ q  # the next step's product, and the Rayleigh-Ritz product of this one
        if it % 2 and it > 1:
            continue
        h = q.T @ gq
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


def spatial_subspace(
    x: torch.Tensor, k: int, seed: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None, **kw
) -> tuple[torch.Tensor, dict]:
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


def _whiten(x: torch.Tensor) -> torch.Tensor:
    """Centre and whiten every (k x N) problem of a batch (L x k x N), in float64."""
    n = x.shape[-1]
    xc = x - x.mean(-1, keepdim=True)
    d, e = torch.linalg.eigh(xc @ xc.transpose(-1, -2) / n)
    d = d.clamp(min=torch.finfo(torch.float64).eps * float(d.max()))
    return ((e * d.rsqrt().unsqueeze(-2)).transpose(-1, -2) @ xc).contiguous()


def _start(seeds: list[int], k: int, like: torch.Tensor) -> torch.Tensor:
    """The random orthogonal start of every problem (scikit-learn's: a seeded normal matrix,
    symmetrically decorrelated), shared by both solvers so one seed means one start."""
    w0 = np.stack([np.random.RandomState(sd).standard_normal((k, k)) for sd in seeds])
    return _sym_decorrelation(torch.from_numpy(w0).to(like))


def _batch(x: torch.Tensor, seed: int | list[int]) -> tuple[bool, torch.Tensor, list[int]]:
    single = x.dim() == 2
    return single, (x.unsqueeze(0) if single else x).double(), [seed] if isinstance(seed, int) else list(seed)


def _unbatch(single: bool, sources: torch.Tensor, active: torch.Tensor, n_iter: torch.Tensor):
    converged, iters = (~active).tolist(), n_iter.tolist()
    return (sources[0], converged[0], iters[0]) if single else (sources, converged, iters)


def fastica_cube(
    x: torch.Tensor, seed: int | list[int], max_iter: int = 300, tol: float = 1e-4
) -> tuple[torch.Tensor, bool | list[bool], int | list[int]]:
    """Parallel FastICA with the ``cube`` non-linearity, in float64 (scikit-learn's ``_ica_par``).

    ``x`` is (k x N): k mixtures, N samples; or a batch (L x k x N) of independent problems
    (one per layer) with one seed each, iterated together so a GPU runs one kernel per step for
    all of them. A problem that reached ``tol`` stops changing while the others go on. Returns
    the sources, whether each reached ``tol`` and its number of iterations.
    """
    single, x, seeds = _batch(x, seed)
    n_prob, k, n = x.shape
    xw = _whiten(x)
    w = _start(seeds, k, xw)
    active = torch.ones(n_prob, dtype=torch.bool, device=xw.device)
    n_iter = torch.full((n_prob,), max_iter, dtype=torch.long, device=xw.device)
    wx = torch.empty_like(xw)  # buffers reused by every step: no fresh (k x N) temporaries
    g = torch.empty_like(xw)
    xw_t = xw.transpose(-1, -2)
    for it in range(1, max_iter + 1):
        torch.matmul(w, xw, out=wx)
        torch.mul(wx, wx, out=g)  # wx^2, once
        g_prime_mean = 3.0 * g.mean(-1)
        g.mul_(wx)  # wx^3
        w1 = _sym_decorrelation(torch.matmul(g, xw_t) / n - g_prime_mean.unsqueeze(-1) * w)
        lim = (torch.einsum("lij,lij->li", w1, w).abs() - 1).abs().amax(-1)
        w = torch.where(active[:, None, None], w1, w)
        done = active & (lim < tol)
        n_iter[done] = it
        active &= ~done
        if not bool(active.any()):
            break
    return _unbatch(single, w @ xw, active, n_iter)


def _fastica_step_change(g_full: torch.Tensor, gp_mean: torch.Tensor) -> torch.Tensor:
    """FastICA's convergence measure at an orthogonal ``W``, from ``E[y^3 y^T]`` and ``E[3 y^2]``.

    With whitened ``X = W^T Y``, FastICA's next iterate is ``W1 = sym(M W)``, ``M = E[g(y) y^T]
    - diag(E[g'(y)])``, so ``W1 W^T = (M M^T)^{-1/2} M``: its diagonal is FastICA's ``lim``
    (``max |1 - |diag(W1 W^T)||``), computed in k x k without another pass over the samples.
    """
    m = g_full - torch.diag_embed(gp_mean)
    d, e = torch.linalg.eigh(m @ m.transpose(-1, -2))
    inv_sqrt = (e * d.clamp(min=torch.finfo(m.dtype).tiny).rsqrt().unsqueeze(-2)) @ e.transpose(-1, -2)
    return (torch.diagonal(inv_sqrt @ m, dim1=-2, dim2=-1).abs() - 1).abs().amax(-1)


def picard_cube(
    x: torch.Tensor,
    seed: int | list[int],
    max_iter: int = 300,
    tol: float = 1e-4,
    memory: int = 7,
    ls_tries: int = 10,
    lambda_min: float = 0.01,
) -> tuple[torch.Tensor, bool | list[bool], int | list[int]]:
    """Picard-O (Ablin, Cardoso and Gramfort 2018) with the ``cube`` density, in float64: the
    same objective and fixed points as :func:`fastica_cube`, reached in fewer iterations.

    Picard-O minimises the extended (sign-adaptive, so sub- and super-Gaussian sources alike)
    kurtosis contrast over orthogonal unmixing matrices by L-BFGS on the orthogonal group, with a
    Hessian approximation as preconditioner and a backtracking line search along ``expm`` of the
    (antisymmetric) direction; the python-picard package's ``ortho=True, extended=True`` solver,
    batched like :func:`fastica_cube` (one start per problem from the same seeded matrix).
    Stopping is FastICA's own test (:func:`_fastica_step_change` below ``tol``), so
    "converged" means what it means for FastICA: one more FastICA step would not move ``W``.
    """
    single, x, seeds = _batch(x, seed)
    n_prob, k, n = x.shape
    y = _start(seeds, k, x) @ _whiten(x)
    active = torch.ones(n_prob, dtype=torch.bool, device=y.device)
    n_iter = torch.full((n_prob,), max_iter, dtype=torch.long, device=y.device)
    mem: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (step, gradient change, 1 / curvature)
    g_old = step = old_signs = None
    for it in range(1, max_iter + 1):
        y2 = y * y
        g_full = (y2 * y) @ y.transpose(-1, -2) / n  # E[psi(y) y^T], psi = y^3
        gp_mean = 3.0 * y2.mean(-1)  # E[psi'(y)]
        done = active & (_fastica_step_change(g_full, gp_mean) < tol)
        n_iter[done] = it - 1
        active &= ~done
        if not bool(active.any()):
            break
        kurt = torch.diagonal(g_full, dim1=-2, dim2=-1)  # E[y^4]
        signs = torch.where(gp_mean >= kurt, 1.0, -1.0).to(y)  # sub-Gaussian +1, super-Gaussian -1
        loss = (signs * (y2 * y2).mean(-1) / 4).sum(-1)
        grad = g_full * signs.unsqueeze(-1)
        h_off = signs * kurt
        psid = signs * gp_mean
        h = 0.5 * (psid.unsqueeze(-1) + psid.unsqueeze(-2) - h_off.unsqueeze(-1) - h_off.unsqueeze(-2))
        h = h.clamp(min=lambda_min)
        grad = (grad - grad.transpose(-1, -2)) / 2
        # a problem whose signs changed starts its memory afresh (its contrast changed)
        keep = (signs == old_signs).all(-1) if old_signs is not None else torch.ones_like(active)
        old_signs = signs
        if g_old is not None:
            dy = grad - g_old
            curv = (step * dy).sum((-2, -1))
            ok = curv > 0
            mem.append((step * ok[:, None, None], dy * ok[:, None, None], torch.where(ok, 1.0 / curv, 0.0)))
            mem = mem[-memory:]
        mem = _forget(mem, keep)
        g_old = grad
        direction = _lbfgs_direction(grad, h, mem) * active[:, None, None]  # converged problems stay
        y_new, _, step, failed = _line_search(y, loss, signs, direction, ls_tries)
        failed &= active
        if bool(failed.any()):  # no descent along L-BFGS: the gradient from the same point, memory cleared
            y_fb, _, step_fb, _ = _line_search(y, loss, signs, -grad * failed[:, None, None], 10)
            y_new = torch.where(failed[:, None, None], y_fb, y_new)
            step = torch.where(failed[:, None, None], step_fb, step)
            mem = _forget(mem, ~failed)
        y = y_new
    return _unbatch(single, y, active, n_iter)


def _forget(mem: list, keep: torch.Tensor) -> list:
    """The L-BFGS memory with the pairs of the problems not in ``keep`` zeroed (they then add nothing)."""
    k3 = keep[:, None, None]
    return [(s_ * k3, y_ * k3, r_ * keep) for s_, y_, r_ in mem]


def _lbfgs_direction(grad: torch.Tensor, h: torch.Tensor, mem: list) -> torch.Tensor:
    """L-BFGS two-loop recursion with the Hessian approximation ``h`` as initial preconditioner."""
    q = grad.clone()
    alphas = []
    for s_, y_, r_ in reversed(mem):
        a = r_ * (s_ * q).sum((-2, -1))
        alphas.append(a)
        q = q - a[:, None, None] * y_
    z = q / h
    z = (z - z.transpose(-1, -2)) / 2
    for (s_, y_, r_), a in zip(mem, reversed(alphas)):
        b = r_ * (y_ * z).sum((-2, -1))
        z = z + (a - b)[:, None, None] * s_
    return -z


def _line_search(y, loss, signs, direction, tries: int):
    """Backtracking along ``expm(alpha D)`` per problem: the first halving of ``alpha`` that lowers
    the loss is taken; where none does within ``tries``, the last trial is returned, flagged."""
    alpha = torch.ones(y.shape[0], dtype=y.dtype, device=y.device)
    accepted = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    new_y, new_loss, step = y.clone(), loss.clone(), direction.clone()
    for _ in range(tries):
        trial_dir = alpha[:, None, None] * direction
        y_try = torch.linalg.matrix_exp(trial_dir) @ y
        y_sq = y_try * y_try
        l_try = (signs * (y_sq * y_sq).mean(-1) / 4).sum(-1)
        good = ~accepted & torch.isfinite(l_try) & (l_try < loss)
        new_y = torch.where(good[:, None, None], y_try, new_y)
        new_loss = torch.where(good, l_try, new_loss)
        step = torch.where(good[:, None, None], trial_dir, step)
        accepted |= good
        if bool(accepted.all()):
            break
        alpha = torch.where(accepted, alpha, alpha / 2)
    # not accepted: the last trial (python-picard's behaviour), flagged for the gradient fall-back
    last = ~accepted
    new_y = torch.where(last[:, None, None], y_try, new_y)
    new_loss = torch.where(last, l_try, new_loss)
    step = torch.where(last[:, None, None], trial_dir, step)
    return new_y, new_loss, step, ~accepted


# The ICA iterations of the torch backend (``ica.solver``): one objective, two solvers.
SOLVERS = {"picard": picard_cube, "fastica": fastica_cube}


def _solver(name: str):
    if name not in SOLVERS:
        raise ValueError(f"ica.solver {name!r}: expected one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def _finish(sources: torch.Tensor | np.ndarray, keep_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
    s = torch.as_tensor(sources).double()
    z = _zscore_rows(s)
    scores = z.abs().amax(0).float().cpu().numpy()
    return scores, (z.float().cpu().numpy() if keep_maps else None)


def canica_torch_layers(
    xs,
    k: int,
    seeds: list[int],
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    keep_maps: bool = False,
    solver: str = "fastica",
) -> list[ICAResult]:
    """The torch backend on several layers: subspaces one by one, the ICA of all of them at once
    (``solver``: Picard-O or FastICA, :data:`SOLVERS`).

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
    sources, converged, n_iter = _solver(solver)(torch.stack(vs), seeds, max_iter=max_iter, tol=tol)
    ica_s = (time.time() - ti) / len(vs)
    out = []
    for src, conv, it, info in zip(sources, converged, n_iter, infos):
        scores, maps = _finish(src, keep_maps)
        info["wall_s"] = info["subspace_s"] + ica_s
        info["solver"] = solver
        out.append(ICAResult(scores, conv, it, maps, info))
    log.debug("torch CanICA of %d layers in %.2f s", len(out), time.time() - t0)
    return out


def canica_torch(
    x: np.ndarray | torch.Tensor,
    k: int,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    keep_maps: bool = False,
    solver: str = "fastica",
) -> ICAResult:
    return canica_torch_layers([x], k, [seed], max_iter, tol, device, keep_maps, solver)[0]


def canica_exact(
    x: np.ndarray | torch.Tensor, k: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4, keep_maps: bool = False
) -> ICAResult:
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.time()
    xz = zscore_columns(torch.as_tensor(x, dtype=torch.float32)).numpy()
    _, _, vt = np.linalg.svd(xz, full_matrices=False)  # full float32 SVD
    ica = FastICA(
        n_components=k,
        algorithm="parallel",
        whiten="unit-variance",
        fun="cube",
        tol=tol,
        max_iter=max_iter,
        whiten_solver="svd",
        random_state=seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(vt[:k].T.astype(np.float64)).T
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    scores, maps = _finish(sources, keep_maps)
    return ICAResult(scores, converged, int(ica.n_iter_), maps, {"subspace": "full-svd", "wall_s": time.time() - t0})


def canica_nilearn(x: np.ndarray | torch.Tensor, k: int, seed: int = 0, keep_maps: bool = False) -> ICAResult:
    import nibabel as nib
    from nilearn.decomposition import CanICA
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.time()
    x = np.asarray(x, dtype=np.float32)
    t, n = x.shape
    img = nib.Nifti1Image(np.ascontiguousarray(x.T).reshape(n, 1, 1, t), affine=np.eye(4))
    mask = nib.Nifti1Image(np.ones((n, 1, 1), dtype=np.int8), affine=np.eye(4))
    canica = CanICA(
        mask=mask,
        n_components=k,
        smoothing_fwhm=None,
        threshold=None,
        detrend=False,
        standardize="zscore_sample",
        n_init=1,
        random_state=seed,
        verbose=0,
    )
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


def canica(
    x,
    k: int,
    backend: str = "torch",
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    keep_maps: bool = False,
    solver: str = "fastica",
) -> ICAResult:
    """Decompose one (tokens x signals) matrix with the chosen backend (``solver``: the torch
    backend's ICA iterations; the others have their own)."""
    _check_k(x, k)
    if backend == "torch":
        return canica_torch(x, k, seed, max_iter, tol, device, keep_maps, solver)
    if backend == "exact":
        return canica_exact(x, k, seed, max_iter, tol, keep_maps)
    if backend == "nilearn":
        return canica_nilearn(x, k, seed, keep_maps)
    raise ValueError(f"ica backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def canica_runs(
    x,
    k: int,
    backend: str,
    seeds: list[int],
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    solver: str = "fastica",
) -> list[ICAResult]:
    """``len(seeds)`` CanICA runs of one matrix with their maps. The torch backend computes the
    subspace once (it does not depend on the ICA start) and iterates every run's ICA as one
    batched problem; the other backends run one after another."""
    if backend != "torch":
        return [
            canica(x, k, backend, seed=sd, max_iter=max_iter, tol=tol, device=device, keep_maps=True, solver=solver)
            for sd in seeds
        ]
    _check_k(x, k)
    t0 = time.time()
    v, info = spatial_subspace(torch.as_tensor(x).to(device=device), k, seeds[0])
    vt = v.T.contiguous()
    sources, converged, n_iter = _solver(solver)(vt.unsqueeze(0).expand(len(seeds), -1, -1), seeds, max_iter, tol)
    wall = (time.time() - t0) / len(seeds)
    out = []
    for src, conv, it in zip(sources, converged, n_iter):
        scores, maps = _finish(src, keep_maps=True)
        out.append(ICAResult(scores, conv, it, maps, {**info, "wall_s": wall, "solver": solver}))
    return out


def consensus_scores(
    runs: list[ICAResult], min_runs: int | None = None, min_similarity: float = 0.5
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
    labels = fcluster(linkage(squareform(dist, checks=False), "average"), t=1.0 - min_similarity, criterion="distance")
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
    info = {
        "clusters": len(clusters),
        "recurring": len(kept),
        "min_runs": need,
        "quality_index": float(np.mean([c[2] for c in kept])),
    }
    return scores, info
