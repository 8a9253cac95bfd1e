"""From scores to kept neurons: the union over batches, protected layers and the ratio search.

The pruning ratio is FLAP's: the fraction of transformer-block parameters removed. A mask is one
plain dict (:func:`mask_record`, written as JSON) holding the kept neuron indices of every layer,
how they were chosen and the achieved ratios; ICA masks and baselines write it, pruning, metrics
and reports read it (:func:`read_mask`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .io import load_npz, read_json, versions

# What a mask reads from an ICA score file (stages.ica); "?" marks keys older files may lack.
SCORE_KEYS = (
    "scores",
    "converged",
    "n_iter",
    "wall_s",
    "skipped?",
    "n_tokens?",
    "extract_wall_s?",
    "solver?",
    "extract_dtype?",
)

log = logging.getLogger(__name__)


def neuron_scores(signal_scores: np.ndarray) -> np.ndarray:
    """Neuron scores of (layers x 2*intermediate) signal scores: the larger of a neuron's gate and up.

    A score file holds one score per signal, the gate signals of a layer first, then its up
    signals (fnprune.extract's shard layout); a neuron belongs to a network if either does.
    """
    half = signal_scores.shape[-1] // 2
    return np.maximum(signal_scores[..., :half], signal_scores[..., half:])


def union_neuron_scores(score_files: list[str | Path]) -> tuple[list[np.ndarray], dict]:
    """Neuron scores of the union mask: max over batches, and over a neuron's gate and up signals.

    A neuron kept by any batch (score > T in any batch) is kept by the union, so thresholding
    these maxima at ``T`` is exactly the OR of the per-batch masks. A (batch, layer) whose ICA
    was skipped for non-convergence does not vote; a layer no batch voted for is an error.
    """
    best: np.ndarray | None = None
    voted: np.ndarray | None = None
    converged, n_iter, skipped, wall, tokens, ext_wall, solvers, ext_dtypes = [], [], [], 0.0, [], [], [], []
    for path in score_files:
        z = load_npz(path, "ICA scores", SCORE_KEYS, "delete it and rerun its ICA job")
        s, conv, it, w = z["scores"], z["converged"], z["n_iter"], float(z["wall_s"].sum())
        skip = z.get("skipped", np.zeros(len(s), bool))
        tokens.append(int(z.get("n_tokens", -1)))
        ext_wall.append(float(z.get("extract_wall_s", np.nan)))
        solvers.append(str(z["solver"]) if "solver" in z else None)
        ext_dtypes.append(str(z["extract_dtype"]) if "extract_dtype" in z else None)
        if np.isnan(s).any() or np.isneginf(s).any():
            raise ValueError(f"{path}: ICA scores hold NaN or -inf")
        neuron = neuron_scores(s)
        neuron[skip] = -np.inf
        best = neuron if best is None else np.maximum(best, neuron)
        voted = ~skip if voted is None else voted | ~skip
        converged.append(conv.tolist())
        n_iter.append(it.tolist())
        skipped.append(np.flatnonzero(skip).tolist())
        wall += w
    if best is None:
        raise ValueError("no ICA score files to build a mask from")
    if not voted.all():
        raise ValueError(
            f"layers {np.flatnonzero(~voted).tolist()}: the ICA was skipped in every batch "
            f"(ica.on_nonconvergence: skip); raise ica.max_iter or use retry/keep"
        )
    n_skipped = sum(len(x) for x in skipped)
    info = {
        "batches_used": list(range(len(score_files))),
        "converged": converged,
        "n_iter": n_iter,
        "skipped_layers_per_batch": skipped,
        "ica_wall_s": wall,
        # the shard pass of the batches used (recorded by the ICA jobs; None when a score file predates it)
        "tokens": sum(tokens) if min(tokens) >= 0 else None,
        "extract_wall_s": sum(ext_wall) if np.isfinite(ext_wall).all() else None,
        "nonconverged_fraction": float(1 - np.mean(np.array(converged, dtype=float))),
        "complete": n_skipped == 0,
        # what iterated the ICA of the batches (ica.solver for the torch backend; None: predates the record)
        "solver": "+".join(dict.fromkeys(x for x in solvers if x)) or None,
        # the dtype the shard passes ran in (None: predates the record)
        "extract_dtype": "+".join(dict.fromkeys(x for x in ext_dtypes if x)) or None,
    }
    return list(best), info


def n_to_drop(ratio: float, block_params: int, neuron_params: int) -> int:
    """Neurons to remove so that ``ratio`` of the block parameters go (nearest whole neuron)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1); got {ratio}")
    return int(round(ratio * block_params / neuron_params))


def prunable_layers(n_layers: int, protect_first: int, protect_last: int) -> list[bool]:
    if protect_first + protect_last >= n_layers:
        raise ValueError(
            f"protect_first={protect_first} + protect_last={protect_last} leaves no prunable layer of {n_layers}"
        )
    return [protect_first <= i < n_layers - protect_last for i in range(n_layers)]


def _check_reachable(n_drop: int, sizes: list[int], prunable: list[bool], min_keep: int, ratio: float) -> None:
    available = sum(s - min_keep for s, p in zip(sizes, prunable) if p)
    if n_drop > available:
        raise ValueError(
            f"ratio {ratio} needs {n_drop} MLP neurons removed but the prunable layers "
            f"hold only {available} removable ones (min_keep_per_layer={min_keep}); lower "
            f"the ratio or protect fewer layers (protect_first / protect_last)"
        )


def threshold_between(ascending: np.ndarray, n_drop: int) -> float:
    """The threshold ``T`` that drops the ``n_drop`` lowest of ``ascending`` scores: midway between
    the last dropped and the first kept (the one that exists when either end is reached)."""
    lo = float(ascending[n_drop - 1]) if n_drop > 0 else float("-inf")
    hi = float(ascending[n_drop]) if n_drop < len(ascending) else float("inf")
    if np.isfinite(lo) and np.isfinite(hi):
        return (lo + hi) / 2
    return lo if np.isfinite(lo) else hi


def select_global(
    scores: list[np.ndarray], prunable: list[bool], n_drop: int, ratio: float, min_keep: int = 1
) -> tuple[list[np.ndarray], float]:
    """Drop the ``n_drop`` lowest-scoring neurons over all prunable layers (one threshold ``T``).

    Returns the kept indices per layer and ``T``: every kept prunable neuron scores above it,
    every dropped one at or below. Searching ``T`` over sorted scores hits the requested count
    exactly. The ``min_keep`` best neurons of each layer are always kept, so no layer is emptied.
    """
    sizes = [len(s) for s in scores]
    _check_reachable(n_drop, sizes, prunable, min_keep, ratio)
    cand_layer, cand_idx, cand_score = [], [], []
    for layer, (s, p) in enumerate(zip(scores, prunable)):
        if not p:
            continue
        order = np.argsort(-s, kind="stable")
        rest = order[min_keep:]
        cand_layer.append(np.full(len(rest), layer))
        cand_idx.append(rest)
        cand_score.append(s[rest])
    cl, ci, cs = map(np.concatenate, (cand_layer, cand_idx, cand_score))
    if n_drop > np.isfinite(cs).sum():
        raise ValueError(
            f"ratio {ratio} needs {n_drop} MLP neurons removed but only {int(np.isfinite(cs).sum())} "
            f"are removable (layers kept whole for constant activations are not)"
        )
    order = np.argsort(cs, kind="stable")
    drop = order[:n_drop]
    dropped = [set() for _ in scores]
    for layer, idx in zip(cl[drop], ci[drop]):
        dropped[layer].add(int(idx))
    kept = [np.array(sorted(set(range(n)) - d), dtype=np.int64) for n, d in zip(sizes, dropped)]
    return kept, threshold_between(cs[order], n_drop)


def select_uniform(
    scores: list[np.ndarray], prunable: list[bool], n_drop: int, ratio: float, min_keep: int = 1
) -> list[np.ndarray]:
    """Drop the same number of lowest-scoring neurons from every prunable layer."""
    sizes = [len(s) for s in scores]
    _check_reachable(n_drop, sizes, prunable, min_keep, ratio)
    layers = [i for i, p in enumerate(prunable) if p]
    per = [n_drop // len(layers) + (1 if j < n_drop % len(layers) else 0) for j in range(len(layers))]
    kept = [np.arange(n, dtype=np.int64) for n in sizes]
    for layer, d in zip(layers, per):
        if d > sizes[layer] - min_keep:
            raise ValueError(
                f"layer {layer}: uniform pruning would leave fewer than "
                f"min_keep_per_layer={min_keep} neurons; lower the ratio"
            )
        order = np.argsort(scores[layer], kind="stable")
        kept[layer] = np.sort(order[d:])
    return kept


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit sample standard deviation (ddof 1, as FLAP's code) over the finite values;
    a constant vector becomes zeros, and non-finite values (a layer kept whole: +inf) stay."""
    z = np.asarray(x, dtype=np.float64).copy()
    fin = np.isfinite(z)
    if fin.sum() > 1:
        sd = float(z[fin].std(ddof=1))
        z[fin] = (z[fin] - z[fin].mean()) / (sd if sd > 0 else 1.0)
    elif fin.any():
        z[fin] = 0.0
    return z


def standardise_layers(scores: list[np.ndarray]) -> list[np.ndarray]:
    """Each layer's scores standardised on their own (:func:`standardise`)."""
    return [standardise(s) for s in scores]


def hybrid_scores(network: list[np.ndarray], fluctuation: list[np.ndarray]) -> list[np.ndarray]:
    """Network membership and importance together: per-layer z(network score) + z(log fluctuation).

    ``network`` is the union ICA score (max |z| over maps and batches), ``fluctuation`` FLAP's
    WIFV of ``down_proj`` (variance of its input x squared column norm). Neither dominates by
    scale: both are standardised within the layer, so a neuron is kept for being in a network,
    for carrying fluctuation, or for both.
    """
    logf = [np.log(np.maximum(np.asarray(f, dtype=np.float64), 1e-30)) for f in fluctuation]
    return [a + b for a, b in zip(standardise_layers(network), standardise_layers(logf))]


def protect_core(importance: list[np.ndarray], network: list[np.ndarray], percent: int) -> list[np.ndarray]:
    """``importance`` with each layer's network core kept: the ``percent``% of a layer's neurons
    (rounded to the nearest whole neuron) with the highest network score score ``+inf``, which no
    selection removes; the rest keep their importance and compete as before."""
    if not 0 < percent < 100:
        raise ValueError(f"core percent must be in 1..99, got {percent}")
    out = []
    for imp, net in zip(importance, network):
        s = np.asarray(imp, dtype=np.float64).copy()
        n_core = int(round(percent / 100 * len(s)))
        s[np.argsort(-np.asarray(net), kind="stable")[:n_core]] = np.inf
        out.append(s)
    return out


def importance_budgets(
    importance: list[float], sizes: list[int], prunable: list[bool], n_drop: int, min_keep: int = 1
) -> list[int]:
    """Neurons to drop per layer, inversely to layer importance, summing to ``n_drop``.

    Layer ``l``'s share is proportional to ``size_l / importance_l`` (a layer half as important
    as another of the same width loses twice as many neurons), capped at ``size_l - min_keep``;
    capped layers' excess goes to the others (water-filling), rounding by largest remainder.
    """
    layers = [i for i, p in enumerate(prunable) if p]
    imp = np.array([float(importance[i]) for i in layers])
    if not np.isfinite(imp).all() or (imp <= 0).any():
        raise ValueError(f"layer importances must be finite and positive, got {imp.tolist()}")
    cap = np.array([sizes[i] - min_keep for i in layers], dtype=np.float64)
    if n_drop > cap.sum():
        raise ValueError(
            f"{n_drop} neurons to drop but the prunable layers hold only {int(cap.sum())} "
            f"removable ones (min_keep_per_layer={min_keep})"
        )
    weight = np.array([sizes[i] for i in layers]) / imp
    share = np.zeros(len(layers))
    free = np.ones(len(layers), dtype=bool)
    left = float(n_drop)
    while left > 1e-9 and free.any():
        want = left * weight * free / (weight * free).sum()
        over = free & (share + want > cap)
        if not over.any():
            share += want
            break
        left -= (cap[over] - share[over]).sum()
        share[over] = cap[over]
        free &= ~over
    drops = np.floor(share).astype(int)
    order = np.argsort(-(share - drops), kind="stable")
    for j in order[: n_drop - int(drops.sum())]:
        drops[j] += 1
    out = [0] * len(sizes)
    for i, d in zip(layers, drops):
        out[i] = int(d)
    return out


def select_budgets(scores: list[np.ndarray], drops: list[int]) -> list[np.ndarray]:
    """Drop ``drops[l]`` lowest-scoring neurons of layer ``l``."""
    return [np.sort(np.argsort(np.asarray(s), kind="stable")[d:]).astype(np.int64) for s, d in zip(scores, drops)]


def round_kept(
    kept: list[np.ndarray], scores: list[np.ndarray], prunable: list[bool], multiple: int
) -> list[np.ndarray]:
    """Round each prunable layer's kept count to a multiple of ``multiple`` (GEMM-friendly widths).

    Every count goes down to a multiple (at least ``multiple``), then layers with the largest
    remainders go up one step while that brings the total kept closer to the original total, so
    the achieved ratio stays as close to the request as the rounding allows. A layer keeps its
    best-scoring neurons; layers not wider than ``multiple`` and protected layers are untouched.
    """
    if multiple < 1:
        raise ValueError(f"rounding multiple must be at least 1, got {multiple}")
    counts = [len(k) for k in kept]
    sizes = [len(s) for s in scores]
    layers = [i for i, p in enumerate(prunable) if p and sizes[i] > multiple]
    new = {i: max(multiple, counts[i] // multiple * multiple) for i in layers}
    deficit = sum(counts[i] for i in layers) - sum(new.values())
    for i in sorted(layers, key=lambda i: -(counts[i] - new[i])):
        if deficit <= multiple / 2:
            break
        if new[i] + multiple <= sizes[i]:
            new[i] += multiple
            deficit -= multiple
    out = list(kept)
    for i in layers:
        order = np.argsort(-np.asarray(scores[i]), kind="stable")
        out[i] = np.sort(order[: new[i]]).astype(np.int64)
    return out


# Every mask record holds these (ICA and baseline masks alike); :func:`read_mask` checks them.
MASK_KEYS = (
    "method",
    "kind",
    "ratio_requested",
    "prunable",
    "n_drop",
    "min_keep",
    "selection",
    "multiple",
    "threshold",
    "intermediate_sizes",
    "kept_counts",
    "removed_block_params",
    "block_params",
    "neuron_params",
    "achieved_block_ratio",
    "achieved_total_ratio",
    "kept",
)
MASK_KINDS = ("ica", "baseline")


def mask_record(
    kept: list[np.ndarray],
    sizes: list[int],
    block_params: int,
    total_params: int,
    neuron_params: int,
    *,
    method: str,
    kind: str,
    ratio_requested: float,
    prunable: list[bool],
    n_drop: int,
    min_keep: int,
    selection: str,
    threshold: float | None = None,
    multiple: int | None = None,
    removed_other_params: int = 0,
    **extra,
) -> dict:
    """The one mask record (written as JSON; pruning, metrics and reports read it): kept indices,
    counts and achieved ratios (block and whole model), and how the mask was chosen.

    ``n_drop`` is the number of MLP neurons the ratio asks for when only MLP neurons go
    (:func:`n_to_drop`); ``removed_other_params`` counts what else goes (FLAP's head groups).
    ``extra`` holds the fields of one kind (ICA: ``k``, ``backend``, ``ica``; FLAP: ``kept_heads``).
    Bias compensation is not a property of the mask but of the target that prunes with it
    (``_bias``, and FLAP's methods): the pruned model's sidecar records it.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r}: expected one of {MASK_KINDS}")
    removed = sum(n - len(k) for n, k in zip(sizes, kept)) * neuron_params + removed_other_params
    return {
        "method": method,
        "kind": kind,
        "ratio_requested": ratio_requested,
        "prunable": [bool(p) for p in prunable],
        "n_drop": int(n_drop),
        "min_keep": int(min_keep),
        "selection": selection,
        "multiple": multiple,
        "threshold": threshold,
        **extra,
        "intermediate_sizes": list(sizes),
        "kept_counts": [len(k) for k in kept],
        "removed_block_params": int(removed),
        "block_params": int(block_params),
        "neuron_params": int(neuron_params),
        "achieved_block_ratio": removed / block_params,
        "achieved_total_ratio": removed / total_params,
        "kept": [np.asarray(k).tolist() for k in kept],
        "versions": versions(),
    }


def read_mask(path: str | Path) -> dict:
    """A mask record from its JSON file, checked for every key of :data:`MASK_KEYS` (naming the file)."""
    rec = read_json(path)
    missing = [k for k in MASK_KEYS if k not in rec] if isinstance(rec, dict) else list(MASK_KEYS)
    if missing:
        raise ValueError(
            f"{path}: not a mask record of this fnprune (missing {', '.join(missing)}); "
            f"delete it and rerun its mask job"
        )
    return rec


def kept_vector(kept: list[list[int]] | list[np.ndarray], sizes: list[int], layers: list[int]) -> np.ndarray:
    """The kept neurons of ``layers`` as one boolean vector (layer after layer)."""
    parts = []
    for i in layers:
        v = np.zeros(sizes[i], dtype=bool)
        v[np.asarray(kept[i], dtype=np.int64)] = True
        parts.append(v)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice index ``2|A & B| / (|A| + |B|)`` of two boolean membership vectors (1 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    size = a.sum() + b.sum()
    return float(2 * (a & b).sum() / size) if size else 1.0


def select(
    scores: list[np.ndarray],
    selection: str,
    prunable: list[bool],
    n_drop: int,
    ratio: float,
    min_keep: int = 1,
    fluctuation: list[np.ndarray] | None = None,
    multiple: int | None = None,
) -> dict:
    """Kept neurons of one selection rule (``fnprune.config.SELECTIONS``) and what it decided.

    ``global``: one threshold over the prunable layers; ``zglobal``: the same over per-layer
    z-scores; ``uniform``: the same count from every layer; ``imp``: per-layer budgets inverse to
    layer importance (mean FLAP fluctuation, ``fluctuation``). ``multiple`` then rounds each
    layer's kept count (:func:`round_kept`). Returns ``kept``, ``threshold`` (None without one)
    and ``layer_importance`` (None unless ``imp``).
    """
    threshold, importance = None, None
    if selection == "zglobal":
        scores = standardise_layers(scores)
    if selection in ("global", "zglobal"):
        kept, threshold = select_global(scores, prunable, n_drop, ratio, min_keep)
    elif selection == "uniform":
        kept = select_uniform(scores, prunable, n_drop, ratio, min_keep)
    elif selection == "imp":
        if fluctuation is None:
            raise ValueError("selection 'imp' needs the fluctuation of every layer (calibration statistics)")
        importance = [float(np.mean(f)) for f in fluctuation]
        kept = select_budgets(
            scores, importance_budgets(importance, [len(s) for s in scores], prunable, n_drop, min_keep)
        )
    else:
        raise ValueError(f"mask selection {selection!r}: expected global, zglobal, uniform or imp")
    if multiple:
        kept = round_kept(kept, scores, prunable, multiple)
    return {"kept": kept, "threshold": threshold, "layer_importance": importance}
