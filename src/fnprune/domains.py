"""Cross-domain calibration (``snakemake domains``): calibration sources x evaluation domains.

A calibration source is a model slug, typically an alias (``models.<slug>.base``) of one model
with another ``calibration.corpus``; the sources of one table share their weights, whose dense
model is the reference row. Every pruned target's perplexity on every domain's test split is a
self-describing ``results/{target}/ppl-{corpus}.json`` (:func:`ppl_fields`); the tables, the
mask overlaps and the figure are built only from those files and the mask JSONs.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import method_problems, parse_target, raise_problems, weights_of
from .io import atomic_path, read_json, write_text
from .mask import dice, kept_vector, read_mask
from .tables import Column, fmt, markdown_table, method_label, paired_ratio

# Corpus keys that decide which split a document's chunks land in (fnprune.corpus).
SPLIT_KEYS = ("fractions", "max_chars", "min_chars", "group_chunks")


def _same_documents(a: dict, b: dict) -> bool:
    """Whether two corpora draw their texts from the same documents (and so could share texts)."""
    if a["source"] != b["source"] or a["source"] not in ("embedded", "text"):
        return False
    return a["source"] == "embedded" or a.get("path") == b.get("path")


def check(config: dict) -> None:
    """Checks of the ``domains`` section that the schema cannot express; each names the key at fault.

    A trained model is evaluated on held-out text only if every corpus cut from the documents it
    was trained on splits them as its training corpus does: a document's split then depends
    only on its title, so each split of a one-part corpus is a subset of the whole corpus's.
    """
    d, models, corpora = config["domains"], config["models"], config["corpora"]
    problems = [f"domains.models: {m!r} is not a key of models" for m in d["models"] if m not in models]
    problems += [f"domains.corpora: {c!r} is not a key of corpora" for c in d["corpora"] if c not in corpora]
    problems += method_problems(d["methods"], "domains.methods")
    sources = [m for m in d["models"] if m in models]
    calibrated_on = {m: models[m].get("calibration", {}).get("corpus", models[m].get("corpus")) for m in models}
    used = list(dict.fromkeys([c for c in d["corpora"] if c in corpora] + [calibrated_on[m] for m in sources]))
    for w in dict.fromkeys(weights_of(config, m) for m in sources):
        trained = models[w]["corpus"]
        if models[w]["source"] != "train" or trained not in corpora:
            continue
        for c in used:
            if c == trained or not _same_documents(corpora[trained], corpora[c]):
                continue
            differ = [k for k in SPLIT_KEYS if corpora[c].get(k) != corpora[trained].get(k)]
            if differ:
                problems.append(
                    f"corpora.{c}: splits the documents of corpora.{trained} (model {w}'s training "
                    f"corpus) with another {', '.join(differ)}, so its test and calib texts could be "
                    f"training text; give it the same {', '.join(differ)}"
                )
    pairs = [(m, calibrated_on[m], c) for m in sources for c in d["corpora"] if c in corpora]
    # every model's own evaluation corpus too (an alias calibrated on another corpus; aliases are
    # expanded by fnprune.config.validate, so each has its base's corpus)
    pairs += [(m, calibrated_on[m], models[m].get("corpus")) for m in models]
    problems += _cross_split_problems(config, pairs)
    raise_problems(problems)


def _cross_split_problems(config: dict, pairs: Sequence[tuple[str, str | None, str | None]]) -> list[str]:
    """No model may calibrate on the held-out text it is evaluated on: for every ``(model,
    calibration corpus, evaluation corpus)`` of ``pairs`` cut from the same documents, both
    corpora must put each document in the same split.

    That needs the same split keys (:data:`SPLIT_KEYS`), whole documents per split where their
    parts differ (``group_chunks: 0``: chunk ``i`` of a file's docstrings is not chunk ``i`` of its
    code), and one way of keying a text: ``modules`` keys a module's docstrings by module name,
    ``docstrings`` and ``code`` by file, so the same docstring could sit in two splits.
    """
    from .corpus import DEFAULT_PARTS, FILE_PARTS

    corpora = config["corpora"]
    problems = []
    for m, cal, ev in dict.fromkeys(pairs):
        if cal is None or ev is None or cal == ev or cal not in corpora or ev not in corpora:
            continue
        a, b = corpora[cal], corpora[ev]
        if not _same_documents(a, b):
            continue
        where = f"corpora.{ev} and corpora.{cal} (model {m} calibrates on {cal} and is evaluated on {ev}'s test split)"
        if differ := [k for k in SPLIT_KEYS if a.get(k) != b.get(k)]:
            problems.append(
                f"{where} split the same documents with a different {', '.join(differ)}, so {m} could "
                f"calibrate on {ev}'s held-out text; give both the same {', '.join(differ)}"
            )
            continue
        if a["source"] != "embedded":
            continue
        pa, pb = set(a.get("parts", DEFAULT_PARTS)), set(b.get("parts", DEFAULT_PARTS))
        files = set(FILE_PARTS)
        if ("modules" in pa and pb & files) or ("modules" in pb and pa & files):
            problems.append(
                f"{where} mix parts 'modules' (split by module) and {sorted((pa | pb) & files)} (split "
                f"by file), so one docstring could be in two splits; use 'docstrings' in both"
            )
        elif pa != pb and (pa | pb) & files and a.get("group_chunks", 4) != 0:
            problems.append(
                f"{where} hold different parts of the same files in chunk groups "
                f"(group_chunks {a.get('group_chunks', 4)}); set group_chunks: 0 in both so a file "
                "stays in one split"
            )
    return problems


def bases(config: dict) -> list[str]:
    """The models whose weights the ``domains`` sources use: one table each."""
    return list(dict.fromkeys(weights_of(config, m) for m in config["domains"]["models"]))


def bases_of(config: dict, models: list[str]) -> list[str]:
    """The domains tables (:func:`bases`) of the models whose weights any of ``models`` uses: a
    grid of the alias ``smol_paper`` reports the table of ``smol``, whose weights it shares."""
    weights = {weights_of(config, m) for m in models if m in config["models"]}
    return [b for b in bases(config) if b in weights]


def pruned_points(config: dict, base: str) -> list[tuple[str, int, str]]:
    """``(source, ratio, method)`` of every pruned model of ``base``'s table, in config order."""
    d = config["domains"]
    sources = [m for m in d["models"] if weights_of(config, m) == base]
    return [(m, r, meth) for m in sources for r in d["ratios"] for meth in d["methods"]]


def ppl_fields(config: dict, target: str, corpus: str, default_backend: str = "torch") -> dict:
    """What a ``ppl-{corpus}.json`` records besides its results: the target and its calibration."""
    t = parse_target(target, list(config["models"]), default_backend)
    model = t["model"]
    return {
        "target": target,
        "model": model,
        "weights": weights_of(config, model),
        "dense": t["dense"],
        "ratio": None if t["dense"] else t["ratio_pct"],
        "method": t["method"],
        "corpus": corpus,
        "calibration_corpus": None if t["dense"] else config["models"][model]["calibration"]["corpus"],
    }


@dataclass
class Grid:
    """One domain x domain table: perplexities of the dense model and every source on every corpus."""

    ratio: int
    method: str
    protocol: str
    rows: list[str]
    calibration: list[str | None]
    corpora: list[str]
    ppl: np.ndarray
    # Per-window mean token NLL of each cell (rows x corpora), None where not recorded.
    window_nll: list[list[list[float] | None]] | None = None

    @property
    def change(self) -> np.ndarray:
        """Percent change of each cell's perplexity from the dense model's on the same corpus."""
        return 100 * (self.ppl / self.ppl[0] - 1)


def _protocol(result: dict) -> str:
    return f"{result['protocol']}@{result['seqlen']}"


def perplexity_grids(records: Sequence[dict]) -> list[Grid]:
    """One :class:`Grid` per ratio x method x perplexity protocol of ``ppl-{corpus}.json`` records.

    Rows are the dense model, then the sources, and columns the corpora, in order of appearance;
    a missing cell is NaN.
    """
    dense = [r for r in records if r["dense"]]
    pruned = [r for r in records if not r["dense"]]
    if len({r["weights"] for r in records}) > 1:
        raise ValueError(f"records of several models' weights: {sorted({r['weights'] for r in records})}")
    if not dense:
        raise ValueError("no dense record: the reference row of every table")
    corpora = list(dict.fromkeys(r["corpus"] for r in records))
    sources = list(dict.fromkeys(r["model"] for r in pruned))
    calibration = {r["model"]: r["calibration_corpus"] for r in pruned}
    protocols = list(dict.fromkeys(_protocol(x) for r in records for x in r["results"]))
    grids = []
    for ratio, method in dict.fromkeys((r["ratio"], r["method"]) for r in pruned):
        for protocol in protocols:
            ppl = np.full((1 + len(sources), len(corpora)), np.nan)
            nll: list[list[list[float] | None]] = [[None] * len(corpora) for _ in range(1 + len(sources))]
            for r in dense + [r for r in pruned if (r["ratio"], r["method"]) == (ratio, method)]:
                i = 0 if r["dense"] else 1 + sources.index(r["model"])
                for x in r["results"]:
                    if _protocol(x) == protocol:
                        ppl[i, corpora.index(r["corpus"])] = x["ppl"]
                        nll[i][corpora.index(r["corpus"])] = x.get("window_nll")
            grids.append(
                Grid(
                    ratio,
                    method,
                    protocol,
                    [f"{dense[0]['weights']} (dense)", *sources],
                    [None, *(calibration[s] for s in sources)],
                    corpora,
                    ppl,
                    nll,
                )
            )
    return grids


def _cell(g: Grid, i: int, k: int, j: int) -> str:
    return f"{g.rows[i]} vs {g.rows[k]} on {g.corpora[j]} ({grid_title(g)})"


def paired_cells(g: Grid) -> list[list[dict | None]]:
    """Per pruned row x corpus: its perplexity ratio to the dense model and to the best source of
    that corpus, each with a 95% interval paired over the same windows
    (:func:`fnprune.tables.paired_ratio`); None where a cell lacks its per-window NLL."""
    out = []
    nll = g.window_nll or [[None] * len(g.corpora) for _ in g.rows]
    for i in range(1, len(g.rows)):
        row = []
        for j in range(len(g.corpora)):
            have = [k for k in range(1, len(g.rows)) if nll[k][j] and not math.isnan(g.ppl[k, j])]
            if i not in have:
                row.append(None)
                continue
            best = min(have, key=lambda k: g.ppl[k, j])
            row.append(
                {
                    "vs_dense": paired_ratio(nll[i][j], nll[0][j], what=_cell(g, i, 0, j)) if nll[0][j] else None,
                    "best": g.rows[best],
                    "vs_best": None if best == i else paired_ratio(nll[i][j], nll[best][j], what=_cell(g, i, best, j)),
                }
            )
        out.append(row)
    return out


def _ci(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def paired_markdown(g: Grid) -> str | None:
    """The paired table of one grid: per source and domain, ``x dense`` and ``x best`` with 95%
    intervals over windows (the best source of the column reads ``best``); an interval against the
    best that excludes 1 is a real difference. None when no cell has per-window NLLs."""
    cells = paired_cells(g)
    if not any(c for row in cells for c in row):
        return None
    body = []
    for i, row in enumerate(cells, start=1):
        out = [g.rows[i], g.calibration[i] or "-"]
        for c in row:
            if c is None:
                out += ["-", "-"]
            else:
                out += [
                    _ci(c["vs_dense"]) if c["vs_dense"] else "-",
                    "best" if c["vs_best"] is None else _ci(c["vs_best"]),
                ]
        body.append(out)
    header = ["calibration source", "calibrated on"]
    for corpus in g.corpora:
        header += [f"{corpus}: x dense", f"{corpus}: x best"]
    return markdown_table(header, body, 2)


def mask_overlap(a: dict, b: dict) -> dict:
    """Dice of two masks' kept neurons over the prunable layers, and its chance level.

    The chance level is the expected Dice of two masks keeping the same numbers of neurons per
    layer at random: ``2 sum_l ka_l kb_l / n_l / (sum_l ka_l + kb_l)``.
    """
    layers = [i for i, (pa, pb) in enumerate(zip(a["prunable"], b["prunable"])) if pa or pb]
    va = kept_vector(a["kept"], a["intermediate_sizes"], layers)
    vb = kept_vector(b["kept"], b["intermediate_sizes"], layers)
    total = va.sum() + vb.sum()
    ka = np.array([len(a["kept"][i]) for i in layers], dtype=float)
    kb = np.array([len(b["kept"][i]) for i in layers], dtype=float)
    n = np.array([a["intermediate_sizes"][i] for i in layers], dtype=float)
    return {
        "dice": dice(va, vb),
        "chance": float(2 * (ka * kb / n).sum() / total) if total else 1.0,
        "kept_a": int(va.sum()),
        "kept_b": int(vb.sum()),
        "neurons": int(len(va)),
    }


def overlap_rows(masks: Sequence[tuple[str, int, str, dict]]) -> list[dict]:
    """Every pair of sources' masks at each ratio x method: ``(source, ratio, method, mask record)`` in."""
    rows = []
    groups: dict[tuple[int, str], list[tuple[str, dict]]] = {}
    for source, ratio, method, mask in masks:
        groups.setdefault((ratio, method), []).append((source, mask))
    for (ratio, method), members in groups.items():
        for (sa, ma), (sb, mb) in itertools.combinations(members, 2):
            rows.append({"ratio": ratio, "method": method, "source_a": sa, "source_b": sb, **mask_overlap(ma, mb)})
    return rows


def grid_title(g: Grid) -> str:
    return f"{g.ratio}% of block parameters removed, {method_label(g.method)} ({g.protocol})"


def grid_markdown(g: Grid) -> str:
    """The perplexity table of one grid; the best displayed pruned value of each column is bold (ties all)."""
    col = Column("ppl", "perplexity", lower_better=True)
    best = [
        min((v for v in (col.shown(x) for x in g.ppl[1:, j]) if v is not None), default=None)
        for j in range(len(g.corpora))
    ]
    rows = []
    for i, row in enumerate(g.rows):
        cells = []
        for j in range(len(g.corpora)):
            v = g.ppl[i, j]
            s = fmt(v) if i == 0 or math.isnan(v) else f"{fmt(v)} ({g.change[i, j]:+.1f}%)"
            bold = i > 0 and len(g.rows) > 2 and best[j] is not None and col.shown(v) == best[j]
            cells.append(f"**{s}**" if bold else s)
        rows.append([row, g.calibration[i] or "-", *cells])
    return markdown_table(["calibration source", "calibrated on", *g.corpora], rows, 2)


def overlap_markdown(rows: Sequence[dict]) -> str:
    body = [
        [
            f"{r['ratio']}%",
            method_label(r["method"]),
            r["source_a"],
            r["source_b"],
            fmt(r["dice"], 3),
            fmt(r["chance"], 3),
            str(r["kept_a"]),
            str(r["kept_b"]),
            str(r["neurons"]),
        ]
        for r in rows
    ]
    return markdown_table(
        ["ratio", "method", "source A", "source B", "Dice", "chance", "kept A", "kept B", "neurons"], body, 4
    )


def markdown(base: str, grids: Sequence[Grid], overlaps: Sequence[dict], figure: str | None = None) -> str:
    lines = [
        f"# Cross-domain calibration: {base}",
        "",
        "Perplexity of each pruned model (rows: its calibration source) on each domain's test split "
        "(columns), with its change from the dense model on the same domain. Built only from "
        "`ppl-{corpus}.json` files and mask JSONs.",
        "",
    ]
    for g in grids:
        lines += [f"## {grid_title(g)}", "", grid_markdown(g)]
        paired = paired_markdown(g)
        if paired:
            lines += [
                "Perplexity ratios paired over the same test windows, with 95% t-intervals of the per-window "
                "log-perplexity differences: against the dense model, and against the best source on that "
                "domain (an interval that excludes 1 is a difference the windows can show).",
                "",
                paired,
            ]
    lines += [
        "## Mask overlap between calibration sources",
        "",
        "Dice index of the kept MLP neurons over the prunable layers; chance: the expected Dice of two "
        "random masks with the same kept count per layer.",
        "",
    ]
    lines += [overlap_markdown(overlaps) if overlaps else "A single calibration source: no pair to compare.\n"]
    if figure:
        lines += ["", f"![perplexity heatmap]({figure})", ""]
    return "\n".join(lines)


def grids_csv(grids: Sequence[Grid]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "ratio",
            "method",
            "protocol",
            "source",
            "calibration_corpus",
            "eval_corpus",
            "ppl",
            "dense_ppl",
            "change_pct",
            *(f"{v}{e}" for v in ("x_dense", "x_best") for e in ("", "_lo", "_hi")),
        ]
    )
    for g in grids:
        cells = paired_cells(g)
        for i, j in itertools.product(range(len(g.rows)), range(len(g.corpora))):
            c = cells[i - 1][j] if i else None
            blank = ("", "", "")
            vs_dense = (c["vs_dense"] or blank) if c else blank
            vs_best = (c["vs_best"] or (1.0, 1.0, 1.0)) if c else blank  # the best source: 1 against itself
            paired = [*vs_dense, *vs_best]
            w.writerow(
                [
                    g.ratio,
                    g.method,
                    g.protocol,
                    g.rows[i],
                    g.calibration[i] or "",
                    g.corpora[j],
                    g.ppl[i, j],
                    g.ppl[0, j],
                    g.change[i, j],
                    *paired,
                ]
            )
    return buf.getvalue()


def overlap_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    fields = ["ratio", "method", "source_a", "source_b", "dice", "chance", "kept_a", "kept_b", "neurons"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def table(
    base: str,
    ppl_files: Sequence[str],
    mask_files: Sequence[str],
    mask_keys: Sequence[dict],
    out_md: str,
    out_csv: str,
    out_overlap_csv: str,
    out_png: str,
) -> None:
    """The stage: tables, overlaps and heatmap of one model's calibration sources.

    ``mask_keys`` names the ``source``, ``ratio`` and ``method`` of each of ``mask_files``.
    """
    from .plots import domain_figure

    if len(mask_files) != len(mask_keys):
        raise ValueError(f"{len(mask_files)} mask files but {len(mask_keys)} mask keys")
    grids = perplexity_grids([read_json(f) for f in ppl_files])
    overlaps = overlap_rows(
        [(k["source"], k["ratio"], k["method"], read_mask(f)) for k, f in zip(mask_keys, mask_files)]
    )
    fig = domain_figure(grids, [grid_title(g) for g in grids], f"{base}: calibration source x evaluation domain")
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
    write_text(out_csv, grids_csv(grids))
    write_text(out_overlap_csv, overlap_csv(overlaps))
    write_text(out_md, markdown(base, grids, overlaps, Path(out_png).name))
