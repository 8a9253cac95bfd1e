"""Baseline masks at the functional-network method's ratio and protected layers.

Every baseline reuses the calibration statistics of the extraction pass (no forward pass of
its own) and returns the mask record of :func:`fnprune.mask.mask_record`:

- ``random``: seeded uniformly random neurons, the same number from every prunable layer.
- ``magnitude`` (mag-sp): neuron ``j`` scores ``||W_down[:, j]||_2``; uniform per layer.
- ``wanda_sp``: ``mean_i |W_down[i, j]| * ||x_j||_2`` over the calibration inputs of
  ``down_proj``; uniform per layer.
- ``flap`` (An et al., AAAI 2024, structure AL-AM, metric WIFV): neuron ``j`` scores
  ``Var(x_j) * ||W_down[:, j]||^2``; an ``o_proj`` input channel ``c`` scores
  ``(Var(x_c) * ||W_o[:, c]||^2)^2``. Scores are standardised within each layer and module
  (channels before they are averaged over a head, as FLAP's code does; under grouped-query
  attention over a key/value head group). One threshold over all neurons and head groups of
  the prunable layers removes the lowest scores until the removed block parameters are
  closest to the request, a head group counting its own parameters. Bias compensation on.
- ``flap_mlp``: the same neuron scores, one global threshold over MLP neurons only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from . import adapters as A
from . import heads as H
from .mask import mask_record, n_to_drop, prunable_layers, round_kept, select, standardise, threshold_between

METHODS = ("random", "magnitude", "wanda_sp", "flap", "flap_mlp")


def column_reduction(
    model, which: Literal["down", "o"], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> list[np.ndarray]:
    """``reduce`` over the input columns of every layer's ``down`` or ``o`` projection, in float64.

    One layer's weight at a time is widened, on its own device, so memory stays bounded.
    """
    ad = A.adapter_for(model)
    out = []
    for block in A.layers(model, ad):
        lin = A.mlp_linears(block, ad)["down"] if which == "down" else A._get(A.attn_of(block, ad), ad.o)
        out.append(reduce(lin.weight.detach().double()).cpu().numpy())
    return out


def column_sqnorm(w: torch.Tensor) -> torch.Tensor:
    return w.pow(2).sum(dim=0)


def column_abs_mean(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean(dim=0)


def stat(stats: Mapping[str, np.ndarray] | None, key: str, widths: Sequence[int], method: str) -> list[np.ndarray]:
    """One calibration statistic per layer, checked against the model's layer widths."""
    if stats is None or key not in stats:
        raise ValueError(f"baseline {method!r} needs the calibration statistic {key!r} (fnprune.extract.load_stats)")
    rows = [np.asarray(s, dtype=np.float64) for s in stats[key]]
    if [len(r) for r in rows] != list(widths):
        raise ValueError(
            f"calibration statistic {key!r} has widths {[len(r) for r in rows]} but the "
            f"model's layers have {list(widths)}: statistics of another model?"
        )
    return rows


def random_scores(sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(n) for n in sizes]


def magnitude_scores(model) -> list[np.ndarray]:
    """mag-sp: ``||W_down[:, j]||_2``."""
    return [np.sqrt(sq) for sq in column_reduction(model, "down", column_sqnorm)]


def wanda_sp_scores(model, down_sqnorm: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Wanda-sp: ``mean_i |W_down[i, j]| * ||x_j||_2`` over the calibration inputs of ``down_proj``."""
    return [a * np.sqrt(sq) for a, sq in zip(column_reduction(model, "down", column_abs_mean), down_sqnorm)]


def wifv_scores(model, which: Literal["down", "o"], input_var: Sequence[np.ndarray]) -> list[np.ndarray]:
    """FLAP's weighted input feature variance of every input column: ``Var(x_j) * ||W[:, j]||^2``."""
    return [v * sq for sq, v in zip(column_reduction(model, which, column_sqnorm), input_var)]


def flap_group_scores(channel_wifv: np.ndarray, n_groups: int) -> np.ndarray:
    """Head-group scores of one layer: channel WIFV squared, standardised, averaged per group."""
    return standardise(channel_wifv**2).reshape(n_groups, -1).mean(axis=1)


def _candidates(
    scores: Sequence[np.ndarray], prunable: Sequence[bool], min_keep: int, unit_params: Sequence[int]
) -> dict[str, np.ndarray]:
    """Layer, index, parameters and score of every unit that may go; each layer's best stay."""
    none = np.empty(0, dtype=np.int64)
    parts = [(none, none, none, np.empty(0))]
    for i, (s, p) in enumerate(zip(scores, prunable)):
        if p:
            rest = np.argsort(-s, kind="stable")[min_keep:]
            parts.append((np.full(len(rest), i), rest, np.full(len(rest), unit_params[i]), s[rest]))
    layer, index, params, score = (np.concatenate(col) for col in zip(*parts))
    return {"layer": layer, "index": index, "params": params, "score": score}


def select_weighted(
    units: Sequence[tuple[Sequence[np.ndarray], Sequence[int], int]],
    prunable: Sequence[bool],
    target_params: float,
    ratio: float,
) -> tuple[list[list[np.ndarray]], float]:
    """One threshold over units of several kinds that own different parameter counts.

    ``units[k]`` is (scores per layer, parameters of one unit per layer, units always kept per
    layer) of kind ``k``. The lowest-scoring units go, in score order, up to the prefix whose
    removed parameters are closest to ``target_params`` (so within half the largest unit).
    Returns the kept indices per kind and layer, and the threshold.
    """
    cands = [_candidates(s, prunable, keep, params) for s, params, keep in units]
    kind = np.concatenate([np.full(len(c["score"]), k) for k, c in enumerate(cands)])
    layer, index, params, score = (np.concatenate([c[f] for c in cands]) for f in ("layer", "index", "params", "score"))
    order = np.argsort(score, kind="stable")
    removed = np.concatenate([[0], np.cumsum(params[order])])
    if target_params - removed[-1] > (params.max() if len(params) else 0) / 2:
        raise ValueError(
            f"ratio {ratio} needs {target_params:.0f} block parameters removed but the "
            f"prunable layers hold only {removed[-1]} removable ones; lower the ratio or "
            f"protect fewer layers (protect_first / protect_last)"
        )
    n = int(np.argmin(np.abs(removed - target_params)))
    gone = np.zeros(len(score), dtype=bool)
    gone[order[:n]] = True
    kept = [
        [np.setdiff1d(np.arange(len(s)), index[gone & (kind == k) & (layer == i)]) for i, s in enumerate(scores)]
        for k, (scores, _, _) in enumerate(units)
    ]
    return kept, threshold_between(score[order], n)


def _flap(
    model,
    stats,
    prunable: list[bool],
    target: float,
    ratio: float,
    neuron_scores: list[np.ndarray],
    neuron_params: int,
    min_keep: int,
) -> tuple[list[np.ndarray], dict]:
    geo = H.head_geometry(model)
    if all(n == 1 for n, p in zip(geo["n_kv_heads"], prunable) if p):
        # a layer keeps at least one group: flap would prune the MLP alone, under flap's name
        raise ValueError(
            "flap removes whole key/value head groups, and every prunable layer of this model has one "
            "key/value head; use flap_mlp"
        )
    o_var = stat(stats, "o_var", [n * geo["head_dim"] for n in geo["n_heads"]], "flap")
    channel = wifv_scores(model, "o", o_var)
    groups = [flap_group_scores(c, g) for c, g in zip(channel, geo["n_kv_heads"])]
    (kept, kept_groups), threshold = select_weighted(
        [(neuron_scores, [neuron_params] * len(prunable), min_keep), (groups, geo["group_params"], 1)],
        prunable,
        target,
        ratio,
    )
    removed_groups = sum((n - len(k)) * p for n, k, p in zip(geo["n_kv_heads"], kept_groups, geo["group_params"]))
    fields = {
        "threshold": threshold,
        "kept_heads": [k.tolist() for k in kept_groups],
        "kv_head_counts": geo["n_kv_heads"],
        "kept_head_counts": [len(k) for k in kept_groups],
        "head_group_params": geo["group_params"],
        "removed_other_params": int(removed_groups),
    }
    return kept, fields


def baseline_mask(
    method: str,
    model,
    stats: Mapping[str, np.ndarray] | None,
    ratio: float,
    protect_first: int,
    protect_last: int,
    seed: int = 0,
    min_keep: int = 1,
    multiple: int | None = None,
) -> dict:
    """The mask record of baseline ``method`` for ``model`` at ``ratio`` of its block parameters.

    ``stats`` is :func:`fnprune.extract.load_stats` of the extraction pass (``random`` and
    ``magnitude`` need none). ``multiple`` rounds each prunable layer's kept MLP neurons to a
    multiple of it (:func:`fnprune.mask.round_kept`). Every prunable layer keeps its ``min_keep``
    best neurons and, for ``flap``, its best key/value head group. FLAP's targets prune with bias
    compensation (``fnprune.config.parse_method``'s ``bias``), from ``down_mean`` and, with
    ``kept_heads``, ``o_mean``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of: {', '.join(METHODS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1); got {ratio}")
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    sizes = [A.intermediate_size(b, ad) for b in blocks]
    prunable = prunable_layers(len(blocks), protect_first, protect_last)
    block_params = A.block_parameter_count(model)
    neuron_params = A.mlp_neuron_params(blocks[0], ad)
    n_drop = n_to_drop(ratio, block_params, neuron_params)
    selection = "uniform" if method in ("random", "magnitude", "wanda_sp") else "global"
    fields: dict = {
        "method": method,
        "kind": "baseline",
        "ratio_requested": ratio,
        "prunable": prunable,
        "n_drop": n_drop,
        "min_keep": min_keep,
        "selection": selection,
        "seed": seed,
    }
    if method == "random":
        scores = random_scores(sizes, seed)
    elif method == "magnitude":
        scores = magnitude_scores(model)
    elif method == "wanda_sp":
        scores = wanda_sp_scores(model, stat(stats, "down_sqnorm", sizes, method))
    else:
        raw = wifv_scores(model, "down", stat(stats, "down_var", sizes, method))
        scores = [standardise(s) for s in raw]
    if method == "flap":
        kept, extra = _flap(model, stats, prunable, ratio * block_params, ratio, scores, neuron_params, min_keep)
        fields.update(extra)
        if multiple:
            kept = round_kept(kept, scores, prunable, multiple)
    else:
        chosen = select(scores, selection, prunable, n_drop, ratio, min_keep, multiple=multiple)
        kept, fields["threshold"] = chosen["kept"], chosen["threshold"]
    if multiple:
        fields.update(method=f"{method}_m{multiple}", multiple=multiple)
    total_params = sum(p.numel() for p in model.parameters())
    return mask_record(kept, sizes, block_params, total_params, neuron_params, **fields)
