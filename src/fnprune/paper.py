"""The paper's tables and ablation figures (``snakemake paper``): grids, mask analyses, stages.

A grid (``paper.grids.{name}`` in the configuration) names the models, ratios and methods of the
main table and the two ablations of its ICA method (``ablation_method``): the number of
components ``k`` (every calibration batch) and the calibration size (the union of the first
``n`` batches, the ``_b{n}`` targets, at the method's ``k``). Tables and figures are built only
from ``metrics.json`` files; the overlap and stability figures also read mask JSONs and the
per-batch ICA scores.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import ICA_METHOD, head_pruning_problems, method_name, method_problems, parse_method, raise_problems
from .io import load_npz, read_json, write_json, write_text
from .mask import dice, kept_vector, neuron_scores, read_mask, select_global


@dataclass(frozen=True)
class FigureSpec:
    """One figure of every grid's model: ``results/paper/{grid}/{model}/{name}.{png,pdf}``.

    ``fnprune.plots.{name}_figure`` draws it; a figure ``from_metrics`` reads only metrics files
    (:func:`figure_targets`), and one rule per such figure is generated from this list
    (workflow/rules/paper.smk). ``title`` heads its section of the report, ``label`` and
    ``category`` place it in Snakemake's HTML report.
    """

    name: str
    title: str
    label: str
    category: str
    from_metrics: bool = False
    needs_k: bool = False  # drawn with the ablation method's k


FIGURES = (
    FigureSpec("components", "Number of ICA components", "number of components", "Ablations", from_metrics=True),
    FigureSpec("calibration", "Calibration size", "calibration size", "Ablations", from_metrics=True),
    FigureSpec(
        "threshold",
        "Threshold T and achieved pruning ratio",
        "threshold vs ratio",
        "Ablations",
        from_metrics=True,
        needs_k=True,
    ),
    FigureSpec("kept_per_layer", "Kept neurons per layer", "kept neurons per layer", "Masks", from_metrics=True),
    FigureSpec("overlap", "Mask overlap between methods", "mask overlap", "Masks"),
    FigureSpec(
        "stability", "Stability of the ICA mask across calibration batches", "mask stability across batches", "Masks"
    ),
    FigureSpec("seeds", "Network stability: FastICA seeds vs calibration data", "seeds vs data", "Masks"),
)
FIGURE = {f.name: f for f in FIGURES}
METRIC_FIGURES = tuple(f.name for f in FIGURES if f.from_metrics)
SEEDS_FIGURE = "seeds"  # only for grids with stability_seeds


class Target(NamedTuple):
    """One ``metrics.json`` target: ``ratio`` is None for the dense model."""

    model: str
    ratio: int | None
    method: str


def grid_spec(config: dict, grid: str) -> dict:
    grids = config.get("paper", {}).get("grids", {})
    if grid not in grids:
        raise ValueError(f"paper.grids: no grid {grid!r} (configured: {', '.join(grids) or 'none'})")
    return grids[grid]


def variant(method: str, k: int | None = None, batches: int | None = None) -> str:
    """The ICA method ``method`` with another ``k`` or from the first ``batches`` batches.

    ``variant("c16_bias", k=8) == "c8_bias"``; ``variant("c16", batches=2) == "c16_b2"``.
    """
    m = ICA_METHOD.fullmatch(method)
    if not m or m["batches"]:
        raise ValueError(f"ablation method {method!r}: expected an ICA method without _b<n>")
    return method_name(m, k=k or m["k"], batches=batches)


def _dense(model: str) -> Target:
    return Target(model, None, "dense")


def _unique(targets: Sequence[Target]) -> list[Target]:
    return list(dict.fromkeys(targets))


def _runs(g: dict, model: str, method: str) -> bool:
    """Whether ``model`` runs ``method`` in grid ``g`` (not listed under ``exclude``)."""
    return method not in g.get("exclude", {}).get(model, [])


def main_targets(config: dict, grid: str) -> list[Target]:
    """Dense and every ratio x method of every model of the grid (less its exclusions)."""
    g = grid_spec(config, grid)
    return [
        t
        for m in g["models"]
        for t in [_dense(m)] + [Target(m, r, meth) for r in g["ratios"] for meth in g["methods"] if _runs(g, m, meth)]
    ]


def component_targets(config: dict, grid: str, model: str) -> list[Target]:
    """Dense and the ablation method at every ratio and number of components (all batches)."""
    g = grid_spec(config, grid)
    return [_dense(model)] + [
        Target(model, r, variant(g["ablation_method"], k=k)) for r in g["ratios"] for k in g["components"]
    ]


def calibration_targets(config: dict, grid: str, model: str) -> list[Target]:
    """Dense and the ablation method at every calibration size and every ratio of the ablation
    (``calibration_ratios``, else every ratio of the grid).

    The union of all batches is the plain method (no ``_b{n}``), so it shares the main targets.
    """
    g = grid_spec(config, grid)
    n_all = config["models"][model]["calibration"]["n_batches"]
    return [_dense(model)] + [
        Target(model, r, variant(g["ablation_method"], batches=n if n < n_all else None))
        for r in calibration_ratios(g)
        for n in g["calibration_batches"]
    ]


def calibration_ratios(g: dict) -> list[int]:
    """The ratios of a grid's calibration-size ablation, in the grid's order."""
    chosen = g.get("calibration_ratios")
    return [r for r in g["ratios"] if chosen is None or r in chosen]


def threshold_targets(config: dict, grid: str, model: str) -> list[Target]:
    """Every ICA target of both ablations: the threshold each needed at each ratio."""
    both = component_targets(config, grid, model) + calibration_targets(config, grid, model)
    return _unique([t for t in both if t.method != "dense"])


def kept_targets(config: dict, grid: str, model: str) -> list[Target]:
    """Dense and every method of the grid at its focus ratio."""
    g = grid_spec(config, grid)
    return [_dense(model)] + [Target(model, g["focus_ratio"], meth) for meth in g["methods"] if _runs(g, model, meth)]


def ablation_targets(config: dict, grid: str) -> list[Target]:
    g = grid_spec(config, grid)
    return _unique(
        [t for m in g["models"] for t in component_targets(config, grid, m) + calibration_targets(config, grid, m)]
    )


def figure_targets(config: dict, grid: str, model: str, figure: str) -> list[Target]:
    """The targets whose metrics one figure of ``model`` reads (``figure`` in METRIC_FIGURES)."""
    parts = {
        "components": component_targets,
        "calibration": calibration_targets,
        "threshold": threshold_targets,
        "kept_per_layer": kept_targets,
    }
    return parts[figure](config, grid, model)


def overlap_masks(config: dict, grid: str, model: str) -> list[Target]:
    """One target per distinct mask among the grid's methods at its focus ratio (``_bias`` shares one)."""
    g = grid_spec(config, grid)
    backend = config["ica"]["backend"]
    first = {}
    for meth in (x for x in g["methods"] if _runs(g, model, x)):
        first.setdefault(parse_method(meth, backend)["selector"], meth)
    return [Target(model, g["focus_ratio"], meth) for meth in first.values()]


def stability_target(config: dict, grid: str, model: str) -> tuple[Target, int, str]:
    """The ablation method's mask at the focus ratio, its ``k`` and backend (for its ICA scores)."""
    g = grid_spec(config, grid)
    info = parse_method(g["ablation_method"], config["ica"]["backend"])
    return Target(model, g["focus_ratio"], g["ablation_method"]), info["k"], info["backend"]


def stability_seeds(config: dict, grid: str) -> list[int]:
    """The grid's ``stability_seeds`` other than the config's own ``seed`` (the reference every other
    seed is compared with: listing it adds nothing, and it does not make the config invalid)."""
    return [s for s in grid_spec(config, grid).get("stability_seeds", []) if s != config.get("seed", 0)]


def figures_of(config: dict, grid: str) -> tuple[str, ...]:
    """The figures each model of a grid gets (the seeds figure needs stability seeds)."""
    seeds = bool(stability_seeds(config, grid))
    return tuple(f.name for f in FIGURES if f.name != SEEDS_FIGURE or seeds)


def study_targets(config: dict, grid: str, study: str) -> list[Target]:
    """Dense and every method of one of the grid's studies at every ratio, for every model."""
    g = grid_spec(config, grid)
    return [
        t
        for m in g["models"]
        for t in [_dense(m)]
        + [Target(m, r, meth) for r in g["ratios"] for meth in g["studies"][study] if _runs(g, m, meth)]
    ]


def seeds_ica_dirs(config: dict, grid: str) -> tuple[str, list[str]]:
    """ICA directories of the ablation method: its own and one per stability seed (``_s<seed>``)."""
    g = grid_spec(config, grid)
    m = ICA_METHOD.fullmatch(g["ablation_method"])
    backend = config["ica"]["backend"]
    own = parse_method(g["ablation_method"], backend)["ica_dir"]
    return own, [parse_method(method_name(m, seed=s), backend)["ica_dir"] for s in stability_seeds(config, grid)]


def check_grids(config: dict) -> None:
    """Checks of every grid that the schema cannot express; each names the key at fault."""
    from .config import block_removal_problems

    problems = []
    for name, g in config.get("paper", {}).get("grids", {}).items():
        key = f"paper.grids.{name}"
        problems += [f"{key}.models: {m!r} is not a key of models" for m in g["models"] if m not in config["models"]]
        problems += method_problems(g["methods"], f"{key}.methods")
        try:
            variant(g["ablation_method"])
        except ValueError as e:
            problems.append(f"{key}.ablation_method: {e}")
        for meth in set(g["methods"]).union(*g.get("studies", {}).values()):
            for m in g["models"]:
                if _runs(g, m, meth):
                    problems += [
                        f"{key}.methods: {e} (or list it under {key}.exclude.{m})"
                        for e in head_pruning_problems(config, [m], meth) + block_removal_problems(config, [m], meth)
                    ]
        problems += [
            f"{key}.exclude: {m!r} is not a model of the grid" for m in g.get("exclude", {}) if m not in g["models"]
        ]
        for study, methods in g.get("studies", {}).items():
            problems += method_problems(methods, f"{key}.studies.{study}")
        if (
            stability_seeds(config, name)
            and ICA_METHOD.fullmatch(g["ablation_method"])
            and ICA_METHOD.fullmatch(g["ablation_method"])["seed"] is not None
        ):
            problems.append(f"{key}.stability_seeds: the ablation method {g['ablation_method']!r} fixes its own seed")
        if g["focus_ratio"] not in g["ratios"]:
            problems.append(f"{key}.focus_ratio: {g['focus_ratio']} is not one of ratios {g['ratios']}")
        problems += [
            f"{key}.calibration_ratios: {r} is not one of ratios {g['ratios']}"
            for r in g.get("calibration_ratios", [])
            if r not in g["ratios"]
        ]
        for m in (m for m in g["models"] if m in config["models"]):
            n_all = config["models"][m]["calibration"]["n_batches"]
            problems += [
                f"{key}.calibration_batches: {n} exceeds models.{m}.calibration.n_batches ({n_all})"
                for n in g["calibration_batches"]
                if n > n_all
            ]
    raise_problems(problems)


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def overlap_by_layer(masks: list[dict]) -> tuple[list[tuple[str, str]], list[int], np.ndarray]:
    """Jaccard index of the kept neurons of every pair of masks in every prunable layer.

    Returns the method pairs, the layers and a (pairs x layers) array.
    """
    layers = [i for i in range(len(masks[0]["kept"])) if any(m["prunable"][i] for m in masks)]
    pairs = list(itertools.combinations(range(len(masks)), 2))
    values = np.array([[jaccard(masks[a]["kept"][i], masks[b]["kept"][i]) for i in layers] for a, b in pairs])
    return [(masks[a]["method"], masks[b]["method"]) for a, b in pairs], layers, values.reshape(len(pairs), len(layers))


def batch_keep_counts(scores: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """How many batches keep each neuron: (layers x neurons) counts of batch scores above ``threshold``.

    ``scores`` holds one (layers x 2*intermediate) array of max |z| per signal for each batch
    (:func:`fnprune.mask.neuron_scores` makes them neuron scores).
    """
    if not scores:
        raise ValueError("no ICA score files to count kept neurons from")
    return sum((neuron_scores(s) > threshold).astype(np.int64) for s in scores)


def _kept_vectors(scores: Sequence[np.ndarray], mask: dict, layers: Sequence[int]) -> list[np.ndarray]:
    """Per layer of ``layers``: the boolean kept vector of ``scores`` thresholded at the mask's ratio."""
    kept, _ = select_global(list(scores), mask["prunable"], mask["n_drop"], mask["ratio_requested"], mask["min_keep"])
    return [kept_vector(kept, mask["intermediate_sizes"], [i]) for i in layers]


def _dice(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return dice(np.concatenate(a), np.concatenate(b))


def seed_stability(
    mask: dict, batch_scores: Sequence[np.ndarray], seed_scores: Sequence[np.ndarray], seeds: Sequence[int]
) -> dict:
    """How much of the mask is the calibration data and how much the FastICA start.

    Every kept set is thresholded at the mask's ratio (same neuron count, one global threshold).
    ``batch_scores``: every batch with the config's seed, in order; ``seed_scores``: batch 0 with
    each of ``seeds``. Returns Dice to the final union as batches accumulate (1, 2, 4, ..., all),
    each single batch's Dice to the final union, and per prunable layer the mean pairwise Dice
    between seeds (batch 0, config seed included) and between batches (config seed).
    """
    layers = [i for i, p in enumerate(mask["prunable"]) if p]
    per_batch = [list(neuron_scores(s)) for s in batch_scores]
    union = per_batch[0]
    unions = []
    for b in per_batch:
        union = [np.maximum(u, x) for u, x in zip(union, b)]
        unions.append(union)
    final = _kept_vectors(unions[-1], mask, layers)
    n_all = len(per_batch)
    ns = sorted({n for n in (2**i for i in range(n_all.bit_length())) if n <= n_all} | {n_all})
    singles = [_kept_vectors(b, mask, layers) for b in per_batch]
    seed_sets = [singles[0]] + [_kept_vectors(neuron_scores(s), mask, layers) for s in seed_scores]

    def pairwise(sets: list[list[np.ndarray]]) -> list[float]:
        pairs = list(itertools.combinations(range(len(sets)), 2))
        return (
            [float(np.mean([dice(sets[a][j], sets[b][j]) for a, b in pairs])) for j in range(len(layers))]
            if pairs
            else []
        )

    kept = sum(int(v.sum()) for v in final)
    total = sum(len(v) for v in final)
    seed_layer, batch_layer = pairwise(seed_sets), pairwise(singles)
    return {
        "layers": layers,
        "seeds": list(seeds),
        "n_batches_total": n_all,
        "keep_fraction": kept / total,
        "accumulation": {
            "n_batches": ns,
            "dice_to_final": [_dice(_kept_vectors(unions[n - 1], mask, layers), final) for n in ns],
        },
        "single_batch_dice_to_final": [_dice(s, final) for s in singles],
        "seed_dice_per_layer": seed_layer,
        "batch_dice_per_layer": batch_layer,
        "seed_dice_mean": float(np.mean(seed_layer)) if seed_layer else None,
        "batch_dice_mean": float(np.mean(batch_layer)) if batch_layer else None,
    }


def seeds(
    mask_file: str,
    score_files: Sequence[str],
    seed_files: Sequence[str],
    stability_seeds: Sequence[int],
    model: str,
    png: str,
    pdf: str,
    out_json: str,
) -> None:
    """The seeds figure and its numbers (JSON)."""
    from . import plots

    mask = read_mask(mask_file)
    res = seed_stability(mask, load_scores(score_files), load_scores(seed_files), stability_seeds)
    res.update(method=mask["method"], ratio=mask["ratio_requested"], model=model)
    write_json(out_json, res)
    title = (
        f"{model}, {plots.method_label(mask['method'])}, {round(100 * mask['ratio_requested'])}% removed: "
        f"seed-to-seed Dice {res['seed_dice_mean']:.3f}"
        + (f", batch-to-batch {res['batch_dice_mean']:.3f}" if res["batch_dice_mean"] is not None else "")
    )
    plots.save(plots.seeds_figure(res, title), png, pdf)


def studies(files: dict[str, Sequence[str]], task_metrics: Sequence[str], out_md: str, out_csv: str) -> None:
    """One table per study (dense + its methods at every ratio), Markdown and CSV with a study column."""
    from .tables import main_table

    md, csv = ["# Studies beyond the paper", ""], []
    for study, fs in files.items():
        t = main_table([read_json(f) for f in fs], task_metrics)
        md += [f"## {study}", "", t["md"], ""]
        rows = t["csv"].splitlines()
        csv += ([f"study,{rows[0]}"] if not csv else []) + [f"{study},{r}" for r in rows[1:]]
    write_text(out_md, "\n".join(md))
    write_text(out_csv, "\n".join(csv) + "\n")


def load_scores(files: Sequence[str | Path]) -> list[np.ndarray]:
    out = []
    for f in files:
        out.append(load_npz(f, "ICA scores", ("scores",), "delete it and rerun its ICA job")["scores"])
    return out


def tables(
    main_files: Sequence[str], ablation_files: Sequence[str], task_metrics: Sequence[str], out: dict[str, str]
) -> None:
    """Write the main and ablation tables; ``out`` maps ``main_{csv,md,tex}``, ``ablation_{csv,md}`` to paths."""
    from .tables import ablation_table, main_table

    main = main_table([read_json(f) for f in main_files], task_metrics)
    ablation = ablation_table([read_json(f) for f in ablation_files], task_metrics)
    for fmt, text in main.items():
        write_text(out[f"main_{fmt}"], text)
    for fmt, text in ablation.items():
        write_text(out[f"ablation_{fmt}"], text)


def metrics_figure(figure: str, metrics_files: Sequence[str], png: str, pdf: str, ablation_method: str) -> None:
    """One figure of METRIC_FIGURES from metrics files (some are drawn with the ablation method's k)."""
    from . import plots

    records = [read_json(f) for f in metrics_files]
    draw = getattr(plots, f"{figure}_figure")
    fig = draw(records, parse_method(ablation_method)["k"]) if FIGURE[figure].needs_k else draw(records)
    plots.save(fig, png, pdf)


def overlap(mask_files: Sequence[str], model: str, png: str, pdf: str) -> None:
    from . import plots

    masks = [read_mask(f) for f in mask_files]
    pairs, layers, values = overlap_by_layer(masks)
    ratio = round(100 * masks[0]["ratio_requested"])
    title = f"{model}: overlap of kept neurons, {ratio}% of block parameters removed"
    plots.save(plots.overlap_figure(pairs, layers, values, title), png, pdf)


def stability(mask_file: str, score_files: Sequence[str], model: str, png: str, pdf: str) -> None:
    """How many calibration batches keep each neuron, at the union mask's threshold."""
    from . import plots

    mask = read_mask(mask_file)
    counts = batch_keep_counts(load_scores(score_files), mask["threshold"])
    title = (
        f"{model}, {round(100 * mask['ratio_requested'])}% removed, T = {mask['threshold']:.2f}, "
        f"{len(score_files)} batches"
    )
    plots.save(plots.stability_figure(counts, mask["prunable"], len(score_files), mask["method"], title), png, pdf)


def summary(
    grid: str,
    main_md: str,
    ablation_md: str,
    figures: Sequence[str],
    out: str,
    studies_md: str | None = None,
    domains_md: Sequence[str] = (),
) -> None:
    """A Markdown report of the grid: both tables and every PNG figure (linked relative to ``out``)."""
    base = Path(out).parent
    lines = [
        f"# fnprune paper results: grid `{grid}`",
        "",
        "Built only from `metrics.json` files (and mask JSONs and ICA scores for overlap and stability).",
        "",
        "## Main table",
        "",
        Path(main_md).read_text(),
        "## Ablations",
        "",
        Path(ablation_md).read_text(),
    ]
    if studies_md:
        lines += ["", Path(studies_md).read_text().replace("# Studies", "## Studies", 1).replace("\n## ", "\n### ")]
    for md in domains_md:
        title, _, body = Path(md).read_text().partition("\n")
        lines += ["", "#" + title, body.replace("\n## ", "\n### ")]
        png = Path(md).with_suffix(".png")
        if png.exists():
            lines += ["", f"![{png.stem}]({Path(os.path.relpath(png, base)).as_posix()})", ""]
    for model, figs in itertools.groupby(figures, key=lambda f: Path(f).parent.name):
        lines += [f"## Figures: {model}", ""]
        for f in figs:
            rel = Path(f).relative_to(base)
            lines += [f"### {FIGURE[Path(f).stem].title}", "", f"![{Path(f).stem}]({rel.as_posix()})", ""]
    write_text(out, "\n".join(lines))
