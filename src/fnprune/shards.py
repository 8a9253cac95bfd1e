"""Activation shards on disk and the ICA of one calibration batch over them.

A calibration batch's shard pass (:mod:`fnprune.extract`) leaves one ``.npy`` shard per layer,
(tokens x signals). :func:`ica_batch` decomposes every shard of a batch with
:mod:`fnprune.ica` and applies the batch-level policies: per-layer seeds, FastICA runs that do
not converge, layers whose signals are all constant, and consensus over several runs.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from .ica import canica, canica_runs, canica_torch_layers, consensus_scores

log = logging.getLogger(__name__)

# Per-layer, per-retry and per-run seeds derived from one batch seed (the values fix every result).
LAYER_SEED_STRIDE = 1000  # layer l starts from seed + 1000 * l: separates the layers of a batch
RETRY_SEED_STRIDE = 100  # retry a of a layer adds 100 * a: separates retries from the first attempt
RUN_SEED_STRIDE = 7919  # consensus run r adds 7919 * r (a prime): separates the runs of a layer


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map an activation shard, or an error naming it and how to recover.

    A batch's shards are one output (a temporary folder): the folder, not the one file, is what
    to delete, and the next run extracts the batch again.
    """
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"{path}: missing or unreadable activation shard ({type(e).__name__}: {e}); "
            f"delete its folder {Path(path).parent} and rerun (the batch is extracted again)"
        ) from None


def load_shard(path: str | Path, n_signals: int | None = None) -> np.ndarray:
    """Read an activation shard, refusing truncated, mis-shaped or non-finite ones."""
    x = open_shard(path)
    if x.ndim != 2 or (n_signals is not None and x.shape[1] != n_signals):
        raise ValueError(
            f"{path}: activation shard of shape {x.shape}; expected (tokens, "
            f"{n_signals if n_signals is not None else '2*intermediate'})"
        )
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(
            f"{path}: activation shard holds NaN or inf (fp16 overflow?); extract with dtype float32 or bfloat16"
        )
    return x


NONCONVERGENCE_POLICIES = ("keep", "retry", "skip", "fail")
CONSTANT_LAYER_POLICIES = ("keep_whole", "fail")


def _constant_layers(shard_paths: list[str | Path], policy: str) -> np.ndarray:
    """Layers whose every signal is constant over the batch: no networks to find there."""
    if policy not in CONSTANT_LAYER_POLICIES:
        raise ValueError(f"ica.on_constant_layer: expected one of {', '.join(CONSTANT_LAYER_POLICIES)}, got {policy!r}")
    constant = np.zeros(len(shard_paths), dtype=bool)
    for layer, path in enumerate(shard_paths):
        x = open_shard(path)
        # Two rows that differ settle it without reading the shard; only a layer whose first two
        # rows agree is scanned in full (the ICA reads every shard once more anyway).
        constant[layer] = x.shape[0] < 2 or (np.array_equal(x[0], x[1]) and bool((np.asarray(x[:1]) == x).all()))
        if constant[layer]:
            if policy == "fail":
                raise ValueError(
                    f"{path}: every signal of this layer is constant over the batch; "
                    f"ica.on_constant_layer is 'fail' (keep_whole keeps the layer unpruned)"
                )
            log.warning("%s: constant activations; the layer is kept whole (ica.on_constant_layer)", path)
    return constant


def ica_batch(
    shard_paths: list[str | Path],
    k: int,
    backend: str,
    seed: int,
    max_iter: int = 300,
    tol: float = 1e-4,
    device: str = "cpu",
    on_nonconvergence: str = "keep",
    retries: int = 2,
    on_constant_layer: str = "keep_whole",
    runs: int = 1,
    solver: str = "fastica",
) -> dict[str, np.ndarray]:
    """CanICA of every layer shard of one calibration batch; per-layer scores and convergence.

    Layer ``l`` uses seed ``seed + 1000 * l`` (:data:`LAYER_SEED_STRIDE`). On CUDA the torch
    backend iterates the ICA (``solver``: Picard-O or FastICA, :data:`fnprune.ica.SOLVERS`) of all
    layers together (one batched problem); elsewhere layer by layer, bounding memory. A layer
    whose ICA does not reach ``tol`` (FastICA's test, for both solvers) is handled by
    ``on_nonconvergence``: ``keep`` its maps (recorded; what the authors' code does), ``retry``
    with new seeds (``+ 100 * a`` for retry ``a``, :data:`RETRY_SEED_STRIDE`) up to ``retries``
    times, ``skip`` it (this batch then does not vote for that layer's neurons), or ``fail``. A
    layer whose signals are all constant has no networks: ``on_constant_layer`` keeps it whole
    (scores +inf, never pruned) or fails.

    With ``runs`` > 1 (consensus ICA) every layer is decomposed ``runs`` times (seeds
    ``seed + 1000 * l + 7919 * r``, :data:`RUN_SEED_STRIDE`) and scored by
    :func:`~fnprune.ica.consensus_scores`. A run that did not converge leaves the ensemble unless
    the policy is ``keep`` (``fail`` still fails); the layer counts as converged when at least two
    runs converged.
    """
    from tqdm import tqdm

    constant = _constant_layers(shard_paths, on_constant_layer)
    if constant.any():
        live = [p for p, c in zip(shard_paths, constant) if not c]
        res = (
            ica_batch(
                live,
                k,
                backend,
                seed,
                max_iter,
                tol,
                device,
                on_nonconvergence,
                retries,
                on_constant_layer,
                runs,
                solver,
            )
            if live
            else None
        )
        n_signals = open_shard(shard_paths[0]).shape[1]
        out = {
            "scores": np.full((len(shard_paths), n_signals), np.inf, dtype=np.float32),
            "converged": np.ones(len(shard_paths), bool),
            "n_iter": np.zeros(len(shard_paths), np.int64),
            "wall_s": np.zeros(len(shard_paths)),
            "attempts": np.zeros(len(shard_paths), np.int64),
            "skipped": np.zeros(len(shard_paths), bool),
        }
        if runs > 1:
            out.update(recurring=np.zeros(len(shard_paths), np.int64), quality_index=np.full(len(shard_paths), np.nan))
        if res is not None:
            for key in out:
                out[key][~constant] = res[key]
        out["constant"] = constant
        return out
    if on_nonconvergence not in NONCONVERGENCE_POLICIES:
        raise ValueError(
            f"ica.on_nonconvergence: expected one of {', '.join(NONCONVERGENCE_POLICIES)}, got {on_nonconvergence!r}"
        )
    seeds = [seed + LAYER_SEED_STRIDE * layer for layer in range(len(shard_paths))]
    if runs > 1:
        return _consensus_batch(shard_paths, k, backend, seeds, runs, max_iter, tol, device, on_nonconvergence, solver)
    if backend == "torch" and str(device).startswith("cuda"):
        results = canica_torch_layers(
            [functools.partial(load_shard, p) for p in shard_paths], k, seeds, max_iter, tol, device, solver=solver
        )
    else:
        results = []
        for p, sd in zip(tqdm(shard_paths, desc=f"ica {backend} k={k}", mininterval=5), seeds):
            x = load_shard(p)
            try:
                results.append(canica(x, k, backend, seed=sd, max_iter=max_iter, tol=tol, device=device, solver=solver))
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from None
    attempts = np.ones(len(results), dtype=np.int64)
    skipped = np.zeros(len(results), dtype=bool)
    for layer, (path, res) in enumerate(zip(shard_paths, results)):
        if not res.converged and on_nonconvergence == "retry":
            for attempt in range(1, retries + 1):
                res = canica(
                    load_shard(path),
                    k,
                    backend,
                    seed=seeds[layer] + RETRY_SEED_STRIDE * attempt,
                    max_iter=max_iter,
                    tol=tol,
                    device=device,
                    solver=solver,
                )
                attempts[layer] += 1
                if res.converged:
                    break
            results[layer] = res
        if not res.converged:
            msg = f"{path}: the ICA ({solver if backend == 'torch' else backend}) did not reach FastICA's tol {tol} in {max_iter} iterations"
            if on_nonconvergence == "fail":
                raise RuntimeError(
                    f"{msg}; ica.on_nonconvergence is 'fail' (use keep, retry or skip, or raise ica.max_iter)"
                )
            skipped[layer] = on_nonconvergence == "skip"
            log.warning("%s; %s", msg, "this batch is skipped for the layer" if skipped[layer] else "kept")
        log.info(
            "layer %d: k=%d, %s, iterations %d, attempts %d, %.2f s",
            layer,
            k,
            res.info.get("subspace"),
            res.n_iter,
            attempts[layer],
            res.info["wall_s"],
        )
    return {
        "scores": np.stack([r.scores for r in results]),
        "converged": np.array([r.converged for r in results]),
        "n_iter": np.array([r.n_iter for r in results]),
        "wall_s": np.array([r.info["wall_s"] for r in results]),
        "attempts": attempts,
        "skipped": skipped,
        "constant": np.zeros(len(results), bool),
    }


def _consensus_batch(
    shard_paths,
    k: int,
    backend: str,
    seeds: list[int],
    runs: int,
    max_iter: int,
    tol: float,
    device: str,
    on_nonconvergence: str,
    solver: str = "fastica",
) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    out = {
        key: []
        for key in (
            "scores",
            "converged",
            "n_iter",
            "wall_s",
            "attempts",
            "skipped",
            "constant",
            "recurring",
            "quality_index",
        )
    }
    for path, sd in zip(tqdm(shard_paths, desc=f"consensus ica {backend} k={k} x{runs}", mininterval=5), seeds):
        t0 = time.time()
        try:
            res = canica_runs(
                load_shard(path),
                k,
                backend,
                [sd + RUN_SEED_STRIDE * r for r in range(runs)],
                max_iter,
                tol,
                device,
                solver,
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        good = [r for r in res if r.converged]
        if len(good) < len(res):
            msg = f"{path}: {len(res) - len(good)} of {runs} ICA runs did not converge in {max_iter} iterations"
            if on_nonconvergence == "fail":
                raise RuntimeError(f"{msg}; ica.on_nonconvergence is 'fail'")
            log.warning("%s; %s", msg, "kept" if on_nonconvergence == "keep" or len(good) < 2 else "left out")
        ensemble = res if on_nonconvergence == "keep" or len(good) < 2 else good
        scores, info = consensus_scores(ensemble)
        log.info(
            "layer %s: k=%d, %d runs, %d of %d clusters recur (quality %.3f), %.2f s",
            Path(path).stem,
            k,
            len(ensemble),
            info["recurring"],
            info["clusters"],
            info["quality_index"],
            time.time() - t0,
        )
        for key, val in (
            ("scores", scores),
            ("converged", len(good) >= 2),
            ("n_iter", max(r.n_iter for r in res)),
            ("wall_s", time.time() - t0),
            ("attempts", runs),
            ("skipped", False),
            ("constant", False),
            ("recurring", info["recurring"]),
            ("quality_index", info["quality_index"]),
        ):
            out[key].append(val)
    return {key: np.stack(v) if key == "scores" else np.array(v) for key, v in out.items()}
