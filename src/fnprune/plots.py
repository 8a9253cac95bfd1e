"""Figures of the paper's ablations and masks (matplotlib's object API: no pyplot state, Agg).

Each ``*_figure`` function takes records or arrays and returns a :class:`Figure`; :func:`save`
writes it as PNG and PDF. Metric records are ``metrics.json`` dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from .config import parse_method
from .io import atomic_path
from .tables import calibration_texts, full_calibration, method_label, metric_value, nonconverged_fraction, ratio_pct

Getter = Callable[[dict], float | None]
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
STYLES = ("-", "--", "-.", ":")


def save(fig: Figure, png: str | Path, pdf: str | Path) -> None:
    """Write ``fig`` as PNG (150 dpi) and PDF, each atomically; the PDF carries no creation date."""
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
    with atomic_path(pdf, suffix=".pdf") as tmp:
        fig.savefig(tmp, bbox_inches="tight", metadata={"CreationDate": None})


def _metric_keys(records: Sequence[dict]) -> list[str]:
    keys = [f"ppl:{k}" for k in dict.fromkeys(k for r in records for k in r.get("perplexity") or {})]
    return keys + (["mean_acc"] if any(r.get("lm_eval_mean_acc") is not None for r in records) else [])


def _ylabel(key: str) -> str:
    if key == "mean_acc":
        return "mean zero-shot accuracy (%)"
    protocol, _, seqlen = key.removeprefix("ppl:").partition("@")
    return f"perplexity ({seqlen}-token windows)" if protocol == "flap_token_ppl" else f"perplexity ({protocol})"


def _metric(key: str) -> Getter:
    def get(record: dict) -> float | None:
        v = metric_value(record, key)
        return 100 * v if key == "mean_acc" and v is not None else v

    return get


def _lines(ax: Axes, groups: dict[str, list[tuple[float, float]]]) -> None:
    for i, (label, pts) in enumerate(groups.items()):
        if pts:
            xs, ys = zip(*sorted(set(pts)))
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)


def _by_ratio(records: Sequence[dict], x_of: Getter, y_of: Getter) -> dict[str, list[tuple[float, float]]]:
    return {
        f"{ratio}% removed": [
            (x_of(r), y_of(r)) for r in records if ratio_pct(r) == ratio and y_of(r) is not None and x_of(r) is not None
        ]
        for ratio in sorted({ratio_pct(r) for r in records})
    }


def _log2_ticks(ax: Axes, xs: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def _ablation_figure(
    records: Sequence[dict],
    x_of: Getter,
    xlabel: str,
    extra_of: Getter,
    extra_label: str,
    title: str,
    extra_percent: bool = False,
) -> Figure:
    """One panel per metric (a line per ratio, dense dashed) and one for ``extra_of``, against ``x_of``."""
    dense = next((r for r in records if r["method"] == "dense"), None)
    pruned = [r for r in records if r["method"] != "dense"]
    keys = _metric_keys(records)
    fig = Figure(figsize=(4.2 * (len(keys) + 1), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys) + 1, squeeze=False)[0]
    for ax, key in zip(axes, keys):
        _lines(ax, _by_ratio(pruned, x_of, _metric(key)))
        if dense is not None and _metric(key)(dense) is not None:
            ax.axhline(_metric(key)(dense), color="k", ls="--", lw=1, label="dense")
        ax.set_ylabel(_ylabel(key))
    _lines(axes[-1], _by_ratio(pruned, x_of, extra_of))
    axes[-1].set_ylabel(extra_label)
    if extra_percent:
        axes[-1].set_ylim(0, max(5.0, axes[-1].get_ylim()[1]))
    xs = sorted({x_of(r) for r in pruned if x_of(r) is not None})
    for ax in axes:
        _log2_ticks(ax, xs)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def _model(records: Sequence[dict]) -> str:
    return records[0]["model"]


def _percent(get: Getter) -> Getter:
    def pct(record: dict) -> float | None:
        v = get(record)
        return None if v is None else 100 * v

    return pct


def components_figure(records: Sequence[dict]) -> Figure:
    """Metrics and non-converged FastICA runs against the number of components k (all batches)."""
    return _ablation_figure(
        records,
        lambda r: r.get("k"),
        "ICA components per layer and batch, k (log scale)",
        _percent(nonconverged_fraction),
        "non-converged FastICA runs (%)",
        f"{_model(records)}: number of ICA components (every calibration batch)",
        extra_percent=True,
    )


def calibration_figure(records: Sequence[dict]) -> Figure:
    """Metrics and the threshold T against the calibration texts behind the union mask."""
    ks = sorted({r["k"] for r in records if r.get("k")})
    return _ablation_figure(
        records,
        calibration_texts,
        "calibration texts (log scale)",
        lambda r: r.get("threshold"),
        "threshold T (max |z| over maps)",
        f"{_model(records)}: calibration size (k = {', '.join(map(str, ks))})",
    )


def _threshold_groups(records: Sequence[dict], group_of: Callable[[dict], int], label: str) -> dict:
    groups: dict[str, list[tuple[float, float]]] = {}
    for g in sorted({group_of(r) for r in records}):
        groups[label.format(g)] = [
            (r["threshold"], 100 * r["achieved_block_ratio"]) for r in records if group_of(r) == g
        ]
    return groups


def threshold_figure(records: Sequence[dict], k: int) -> Figure:
    """Achieved block ratio against the threshold T: per k (every batch) and per calibration size (at ``k``)."""
    ica = [r for r in records if r.get("threshold") is not None and r.get("k")]
    fig = Figure(figsize=(10, 4), layout="constrained")
    by_k, by_size = fig.subplots(1, 2, sharey=True)
    _lines(by_k, _threshold_groups([r for r in ica if full_calibration(r)], lambda r: r["k"], "k = {}"))
    _lines(by_size, _threshold_groups([r for r in ica if r["k"] == k], calibration_texts, "{} texts"))
    by_k.set_title("per number of components (every batch)")
    by_size.set_title(f"per calibration size (k = {k})")
    by_k.set_ylabel("achieved ratio (% of block parameters removed)")
    for ax in (by_k, by_size):
        for ratio in sorted({ratio_pct(r) for r in ica}):
            ax.axhline(ratio, color="0.6", ls=":", lw=1)
        ax.set_xlabel("threshold T (max |z| over maps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{_model(records)}: threshold T found for each requested ratio (dotted)")
    return fig


def kept_per_layer_figure(records: Sequence[dict]) -> Figure:
    """Kept MLP neurons per layer (% of the layer) of every distinct mask at one ratio; dense at 100%."""
    pruned = [r for r in records if r["method"] != "dense"]
    first: dict[str, dict] = {}
    for r in pruned:
        first.setdefault(parse_method(r["method"])["selector"], r)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(first.values()):
        kept, sizes = np.array(r["kept_neurons_per_layer"]), np.array(r["intermediate_sizes"])
        ax.plot(
            np.arange(len(kept)),
            100 * kept / sizes,
            marker=MARKERS[i % len(MARKERS)],
            ls=STYLES[i % len(STYLES)],
            color=f"C{i}",
            label=method_label(r["method"]),
        )
    ax.axhline(100, color="k", ls="--", lw=1, label="dense")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("transformer block (layer index)")
    ax.set_ylabel("kept MLP neurons (% of the layer)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ratios = sorted({ratio_pct(r) for r in pruned})
    ax.set_title(f"{_model(records)}: {', '.join(map(str, ratios))}% of block parameters removed")
    return fig


def overlap_figure(pairs: Sequence[tuple[str, str]], layers: Sequence[int], values: np.ndarray, title: str) -> Figure:
    """Heatmap of the Jaccard index of kept neurons: a row per pair of methods, a column per layer."""
    fig = Figure(figsize=(max(7.0, 4.0 + 0.45 * len(layers)), max(3.0, 1.5 + 0.35 * len(pairs))), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title)
    if not pairs:
        ax.text(0.5, 0.5, "a single method: no pair to compare", ha="center", va="center")
        ax.set_axis_off()
        return fig
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(pairs)), [f"{method_label(a)} vs {method_label(b)}" for a, b in pairs])
    ax.set_xlabel("transformer block (layer index)")
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="Jaccard index of kept neurons")
    return fig


def stability_figure(counts: np.ndarray, prunable: Sequence[bool], n_batches: int, method: str, title: str) -> Figure:
    """How many calibration batches keep each neuron: per prunable layer (heatmap) and overall (bars)."""
    layers = [i for i, p in enumerate(prunable) if p]
    per_layer = np.array([np.bincount(counts[i], minlength=n_batches + 1) for i in layers], dtype=float)
    shares = 100 * per_layer / counts.shape[1]
    overall = 100 * per_layer.sum(axis=0) / per_layer.sum()
    fig = Figure(figsize=(11, max(3.5, 1.5 + 0.3 * len(layers))), layout="constrained")
    heat, bars = fig.subplots(1, 2, width_ratios=[3, 2])
    im = heat.imshow(shares, aspect="auto", cmap="magma_r", origin="lower")
    heat.set_yticks(range(len(layers)), [str(i) for i in layers])
    heat.set_ylabel("transformer block (layer index)")
    fig.colorbar(im, ax=heat, label="neurons of the layer (%)")
    x = np.arange(n_batches + 1)
    bars.bar(x[:1], overall[:1], color="0.6", label="dropped by the union (no batch)")
    bars.bar(x[1:], overall[1:], color="C0", label="kept by the union")
    bars.set_ylabel("neurons of the prunable layers (%)")
    bars.legend(fontsize="small")
    for ax in (heat, bars):
        ax.set_xlabel(f"calibration batches keeping the neuron (of {n_batches})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{method_label(method)}: {title}")
    return fig


def seeds_figure(result: dict, title: str) -> Figure:
    """Left: Dice of the union of the first n batches to the final union (and each single batch).
    Right: per layer, Dice between masks of one batch under different FastICA seeds, against
    Dice between masks of different batches (same seed); chance is the keep fraction."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    acc, per = fig.subplots(1, 2)
    n = result["accumulation"]["n_batches"]
    acc.plot(n, result["accumulation"]["dice_to_final"], "o-", label="union of the first n batches")
    acc.plot(
        [1] * len(result["single_batch_dice_to_final"]),
        result["single_batch_dice_to_final"],
        "x",
        color="C3",
        label="each single batch",
    )
    acc.axhline(result["keep_fraction"], color="0.5", ls=":", label="chance (keep fraction)")
    acc.set_xlabel("calibration batches in the union")
    acc.set_ylabel("Dice of kept neurons to the final union")
    acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc.legend(fontsize="small")
    layers = result["layers"]
    per.plot(layers, result["seed_dice_per_layer"], "o-", label=f"seeds on batch 0 ({len(result['seeds'])} seeds)")
    if result["batch_dice_per_layer"]:
        per.plot(layers, result["batch_dice_per_layer"], "s--", label="batches, same seed")
    per.axhline(result["keep_fraction"], color="0.5", ls=":", label="chance")
    per.set_xlabel("transformer block (layer index)")
    per.set_ylabel("mean pairwise Dice of kept neurons")
    per.xaxis.set_major_locator(MaxNLocator(integer=True))
    per.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def domain_figure(grids: Sequence, titles: Sequence[str], title: str) -> Figure:
    """Heatmaps of cross-domain perplexity (fnprune.domains.Grid): a panel per grid, a row per
    calibration source (the dense model first), a column per evaluation corpus; the colour is the
    change from the dense model on that corpus, each cell is annotated with its perplexity."""
    n = len(grids)
    width = max(4.5, 1.6 + 1.3 * max(len(g.corpora) for g in grids)) if grids else 4.5
    height = max(2.8, 1.4 + 0.5 * max(len(g.rows) for g in grids)) if grids else 2.8
    fig = Figure(figsize=(width * max(n, 1), height), layout="constrained")
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    for ax, g, sub in zip(axes, grids, titles):
        change = g.change
        top = max(1.0, float(np.nanmax(np.abs(change)))) if np.isfinite(change).any() else 1.0
        im = ax.imshow(change, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
        ax.set_xticks(range(len(g.corpora)), g.corpora)
        ax.set_yticks(
            range(len(g.rows)), [r if c is None else f"{r}\n(calib. {c})" for r, c in zip(g.rows, g.calibration)]
        )
        ax.set_xlabel("evaluation domain (test split)")
        for (i, j), v in np.ndenumerate(g.ppl):
            dark = np.isfinite(change[i, j]) and abs(change[i, j]) > 0.6 * top
            ax.text(
                j,
                i,
                "-" if np.isnan(v) else f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="w" if dark else "k",
            )
        ax.set_title(sub, fontsize="small")
        fig.colorbar(im, ax=ax, label="perplexity change from dense (%)")
    fig.suptitle(title)
    return fig
