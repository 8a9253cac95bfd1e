"""Tables built only from ``metrics.json`` records."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def fmt(x, digits: int = 2) -> str:
    """A number with ``digits`` decimals; ``-`` for a missing one (None or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


COMPARISON_IDS = ["model", "method", "ratio_requested", "achieved_block_ratio"]


def comparison_columns(records: list[dict]) -> list[Column]:
    """Every perplexity protocol and every lm-eval task x metric of the records, raw values, 3 decimals."""
    keys = sorted({f"ppl:{k}" for r in records for k in r.get("perplexity") or {}})
    keys += sorted({f"{t}:{m}" for r in records for t, ms in (r.get("lm_eval") or {}).items() for m in ms})
    return [Column(k, k, lower_is_better(k), digits=3) for k in keys]


def comparison_order(records: list[dict]) -> list[dict]:
    """Per model and ratio, dense first, then methods alphabetically."""
    return sorted(
        records, key=lambda r: (r["model"], r.get("ratio_requested") or 0.0, r["method"] != "dense", r["method"])
    )


def paired_t(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, what: str = "a paired comparison"
) -> tuple[float, float, float, float]:
    """Mean of the paired differences a - b, its ``level`` t-interval and the two-sided p-value of
    the paired t-test (for 0/1 item scores: the normal approximation of McNemar's test); ``what``
    names the two records and the measure in the error for unpaired inputs."""
    import numpy as np
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"{what}: a paired comparison needs the same windows or items, at least 2 (got {len(a)} and {len(b)}); "
            "evaluate both with the same eval settings (eval.ppl_max_windows, the same task)"
        )
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = d.std(ddof=1) / math.sqrt(d.size)
    mean = float(d.mean())
    if se == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * se
    return mean, mean - half, mean + half, float(2 * stats.t.sf(abs(mean) / se, d.size - 1))


def paired_ratio(
    nll_a: Sequence[float], nll_b: Sequence[float], level: float = 0.95, what: str = "a paired comparison"
) -> tuple[float, float, float]:
    """Perplexity ratio a / b of two models on the same windows, with a ``level`` t-interval over the
    paired per-window differences of mean token NLL (log PPL_a - log PPL_b is their mean)."""
    mean, lo, hi, _ = paired_t(nll_a, nll_b, level, what)
    return math.exp(mean), math.exp(lo), math.exp(hi)


def _what(a: dict, b: dict, key: str) -> str:
    return f"{a.get('target', a.get('method'))} vs {b.get('target', b.get('method'))} on {key}"


def _window_nll(record: dict, key: str) -> list[float] | None:
    for r in record.get("perplexity_detail") or []:
        if f"{r['protocol']}@{r['seqlen']}" == key:
            return r.get("window_nll")
    return None


def _item_scores(record: dict, key: str) -> list[float] | None:
    task, _, metric = key.partition(":")
    return ((record.get("lm_eval_items") or {}).get(task) or {}).get(metric)


def _paired_groups(records: list[dict]):
    """``(model, ratio), dense record or None, pruned records`` per model and ratio, in table order."""
    dense = {r["model"]: r for r in records if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["method"] != "dense":
            groups.setdefault((r["model"], r.get("ratio_requested")), []).append(r)
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        yield key, dense.get(key[0]), rs


def paired_ppl_rows(records: list[dict]) -> list[dict]:
    """Per model x ratio x perplexity protocol: every pruned method's ratio to dense and to the best
    method of its ratio, each with a 95% paired interval over windows; ``tied`` marks the methods
    whose interval against the best includes 1 (not distinguishable from the best)."""
    out = []
    for (model, ratio), d, rs in _paired_groups(records):
        for key in sorted({k for r in rs for k in r.get("perplexity", {})}):
            have = [r for r in rs if _window_nll(r, key)]
            if not have:
                continue
            best = min(have, key=lambda r: r["perplexity"][key])
            for r in sorted(have, key=lambda r: r["perplexity"][key]):
                row = {
                    "model": model,
                    "ratio": ratio,
                    "protocol": key,
                    "method": r["method"],
                    "ppl": r["perplexity"][key],
                    "best": best["method"],
                }
                if d is not None and _window_nll(d, key):
                    row["vs_dense"] = paired_ratio(_window_nll(r, key), _window_nll(d, key), what=_what(r, d, key))
                row["vs_best"] = paired_ratio(_window_nll(r, key), _window_nll(best, key), what=_what(r, best, key))
                row["tied"] = row["vs_best"][1] <= 1.0
                out.append(row)
    return out


def _paired_markdown(rows: list[dict], measure: str, value: str, digits: int, ci, headers: list[str]) -> str:
    """Paired rows (:func:`paired_ppl_rows`, :func:`paired_acc_rows`) as Markdown: model, ratio,
    ``measure``, method, ``value`` (bold where tied with the best), the intervals against dense and
    against the best, each rendered by ``ci``."""
    body = [
        [
            r["model"],
            fmt(r["ratio"]),
            r[measure],
            r["method"],
            f"**{fmt(r[value], digits)}**" if r["tied"] else fmt(r[value], digits),
            ci(r["vs_dense"]) if r.get("vs_dense") else "-",
            "best" if r["method"] == r["best"] else ci(r["vs_best"]),
        ]
        for r in rows
    ]
    return markdown_table(["model", "ratio", *headers], body, 4)


def paired_ppl_markdown(rows: list[dict]) -> str:
    """The paired perplexity rows as Markdown; ties with the best (interval includes 1) in bold."""
    return _paired_markdown(
        rows,
        "protocol",
        "ppl",
        2,
        lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]",
        ["protocol", "method", "PPL", "x dense [95% CI]", "x best [95% CI]"],
    )


def paired_acc_rows(records: list[dict]) -> list[dict]:
    """Per model x ratio x lm-eval task metric with per-item scores: every pruned method's accuracy
    difference to dense and to the best method of its ratio (points), with 95% paired t-intervals
    over items; ``tied`` marks the methods whose interval against the best includes 0."""
    out = []
    for (model, ratio), d, rs in _paired_groups(records):
        keys = sorted({f"{t}:{m}" for r in rs for t, ms in (r.get("lm_eval_items") or {}).items() for m in ms})
        for key in keys:
            have = [r for r in rs if _item_scores(r, key)]
            if not have:
                continue
            mean = {id(r): float(sum(_item_scores(r, key)) / len(_item_scores(r, key))) for r in have}
            best = max(have, key=lambda r: mean[id(r)])
            for r in sorted(have, key=lambda r: -mean[id(r)]):
                row = {"model": model, "ratio": ratio, "metric": key, "method": r["method"], "value": mean[id(r)]}
                row["best"] = best["method"]
                if d is not None and _item_scores(d, key):
                    row["vs_dense"] = paired_t(_item_scores(r, key), _item_scores(d, key), what=_what(r, d, key))[:3]
                row["vs_best"] = paired_t(_item_scores(r, key), _item_scores(best, key), what=_what(r, best, key))[:3]
                row["tied"] = row["vs_best"][2] >= 0.0
                out.append(row)
    return out


def paired_acc_markdown(rows: list[dict]) -> str:
    """The paired accuracy rows as Markdown (differences in points); ties with the best in bold."""
    return _paired_markdown(
        rows,
        "metric",
        "value",
        3,
        lambda v: f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]",
        ["metric", "method", "value", "- dense, points [95% CI]", "- best, points [95% CI]"],
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input's order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def pairwise_rows(records: list[dict], alpha: float = 0.05) -> list[dict]:
    """Every pair of methods (dense included) per model x ratio x measure, with the paired t-test's
    p-value and its Holm adjustment over the pairs of that model, ratio and measure.

    Measures: each perplexity protocol (per-window NLL; lower is better) and each lm-eval metric
    with per-item scores (higher is better). ``order`` is ``"<"`` where the row method is
    significantly better than the column method at ``alpha`` after adjustment, ``">"`` worse,
    ``"="`` not distinguishable."""
    out = []
    for (model, ratio), d, rs in _paired_groups(records):
        members = ([d] if d is not None else []) + sorted(rs, key=lambda r: r["method"])
        measures = [(k, _window_nll, True) for k in sorted({k for r in rs for k in r.get("perplexity", {})})]
        measures += [
            (k, _item_scores, False)
            for k in sorted({f"{t}:{m}" for r in rs for t, ms in (r.get("lm_eval_items") or {}).items() for m in ms})
        ]
        for key, get, lower in measures:
            have = [r for r in members if get(r, key)]
            pairs = [(a, b) for i, a in enumerate(have) for b in have[i + 1 :]]
            if not pairs:
                continue
            tests = [paired_t(get(a, key), get(b, key), what=_what(a, b, key)) for a, b in pairs]
            for (a, b), t, p_adj in zip(pairs, tests, holm([t[3] for t in tests])):
                better = (t[0] < 0) == lower
                order = "=" if p_adj >= alpha else ("<" if better else ">")
                out.append(
                    {
                        "model": model,
                        "ratio": ratio,
                        "measure": key,
                        "a": a["method"],
                        "b": b["method"],
                        "diff": t[0],
                        "p": t[3],
                        "p_holm": p_adj,
                        "order": order,
                    }
                )
    return out


def pairwise_markdown(rows: list[dict]) -> str:
    """One matrix per model x ratio x measure: cell (row, column) ``<`` the row method is better,
    ``>`` worse, ``=`` not distinguishable (paired t-test, Holm-adjusted over the matrix's pairs)."""
    flip = {"<": ">", ">": "<", "=": "="}
    blocks: dict[tuple, dict] = {}
    for r in rows:
        b = blocks.setdefault((r["model"], r["ratio"], r["measure"]), {})
        b[(r["a"], r["b"])] = r["order"]
        b[(r["b"], r["a"])] = flip[r["order"]]
    parts = []
    for (model, ratio, measure), cells in blocks.items():
        names = list(dict.fromkeys(n for pair in cells for n in pair))
        body = [[n] + ["" if n == m else cells.get((n, m), "") for m in names] for n in names]
        parts.append(f"**{model}, ratio {fmt(ratio)}, {measure}**\n\n" + markdown_table(["", *names], body, 1))
    return "\n".join(parts)


def comparison_table(records: list[dict], draws: dict | None = None, reference: str | None = None) -> tuple[str, str]:
    """Markdown and CSV text of the method comparison; the best displayed pruned value per model x
    ratio and column is bold (:func:`best_cells`, ties all bold).

    The Markdown adds lm-eval standard errors and, where the metrics carry per-window NLLs, the
    paired perplexity table (:func:`paired_ppl_rows`). With ``draws`` (draw alias slug -> model,
    draw) the tables of one draw are draw 0's, and a section across draws follows
    (:mod:`fnprune.replicates`), with every method against ``reference`` when one is named; the
    CSV holds every draw's row."""
    from .replicates import (
        across_draws_markdown,
        across_draws_rows,
        draw_pairwise_rows,
        reference_markdown,
        reference_rows,
    )

    draws = draws or {}
    tuned = [r for r in records if r.get("lora")]
    every = comparison_order([r for r in records if not r.get("lora")])
    records = [r for r in every if r["model"] not in draws]
    md, _ = _one_draw_table(records)
    _, csv = _one_draw_table(every + tuned)
    rows = across_draws_rows(every, draws) if draws else []
    if any(r["draws"] > 1 for r in rows):
        md += (
            "\n## Across calibration draws\n\nEach random method pruned from independent calibration draws "
            "(texts, ICA start, random seed). Perplexity: the mean over draws of the ratio to dense (geometric), "
            "accuracy: the mean difference to dense in points, each with a 95% t-interval across draws and the "
            "between-draw standard deviation, what another machine or draw should expect. Methods are compared "
            "on the draws they share (paired by calibration draw) by a t-test at 5%, Holm-adjusted over the "
            "pairs of one matrix.\n\n" + across_draws_markdown(rows, draw_pairwise_rows(rows))
        )
        against = reference_rows(rows, reference) if reference else []
        if against:
            md += (
                f"\n## Against {reference}, across draws\n\nEach method against `{reference}` on the draws both "
                "have (paired by calibration draw), one paired t-test per row at 5% without adjustment: each row "
                "answers its own question (does k = 32 beat k = 64?), not a search over all pairs.\n\n"
                + reference_markdown(against)
                + "\n"
            )
    recovery = lora_recovery_rows(records + tuned)
    if recovery:
        md += (
            "\n## Recovery with LoRA\n\nEach target tuned by LoRA on the same tokens of its calibration corpus's "
            "train split (`_lora`, config section `lora`), dense included: in-domain tuning lowers the dense "
            "model's perplexity too, so the gap after tuning is measured against the tuned dense model. "
            "x untuned: the tuned model's perplexity over its untuned parent's, with a 95% t-interval over the "
            "per-window differences of mean token NLL; gap before: method / dense; gap after: method_lora / "
            "dense_lora; closed: the share of the gap's log that tuning removed (1: none left, 0: none "
            "removed, negative: wider); x best tuned: the tuned model's perplexity over the best tuned model's of its "
            "ratio, paired over windows (tuning can reorder the methods).\n\n" + lora_recovery_markdown(recovery)
        )
    return md, csv


def lora_recovery_rows(records: list[dict]) -> list[dict]:
    """Per model x perplexity protocol x target with a ``_lora`` twin among ``records`` (its
    ``tuned_from`` names its parent's ``target``): the parent's and the twin's perplexity, their
    ratio with a 95% interval paired over windows, and for a pruned method the gap to dense before
    (method / dense) and after (method_lora / dense_lora), with the share of its log closed, and the
    tuned model against the best tuned model of its ratio (``vs_best_tuned``, paired over windows)."""
    by_target = {r["target"]: r for r in records if not r.get("lora") and "target" in r}
    pairs = [(by_target[r["tuned_from"]], r) for r in records if r.get("lora") and r["tuned_from"] in by_target]
    dense = {u["model"]: (u, t) for u, t in pairs if u["method"] == "dense"}
    # the tuned models against the best tuned one of their ratio: the main table's paired rows, on
    # the twins (tuning can reorder the methods; the gap to dense alone does not say whether it did)
    tuned_rows = paired_ppl_rows([t for u, t in pairs if u["method"] != "dense"])
    vs_best = {(p["model"], p["ratio"], p["protocol"], p["method"]): p for p in tuned_rows}
    out = []
    for u, t in sorted(
        pairs, key=lambda p: (p[0]["model"], p[0]["method"] != "dense", ratio_pct(p[0]), p[0]["method"])
    ):
        for key in sorted(set(u.get("perplexity") or {}) & set(t.get("perplexity") or {})):
            row = {
                "model": u["model"],
                "ratio": u.get("ratio_requested"),
                "method": u["method"],
                "protocol": key,
                "ppl": u["perplexity"][key],
                "ppl_lora": t["perplexity"][key],
                "vs_untuned": None,
                "gap_before": None,
                "gap_after": None,
                "closed": None,
            }
            a, b = _window_nll(t, key), _window_nll(u, key)
            if a and b:
                row["vs_untuned"] = paired_ratio(a, b, what=_what(t, u, key))
            else:
                row["vs_untuned"] = (t["perplexity"][key] / u["perplexity"][key], None, None)
            d = dense.get(u["model"])
            if u["method"] != "dense" and d and key in d[0]["perplexity"] and key in d[1]["perplexity"]:
                row["gap_before"] = u["perplexity"][key] / d[0]["perplexity"][key]
                row["gap_after"] = t["perplexity"][key] / d[1]["perplexity"][key]
                if row["gap_before"] != 1:
                    row["closed"] = 1 - math.log(row["gap_after"]) / math.log(row["gap_before"])
            p = vs_best.get((t["model"], t.get("ratio_requested"), key, t["method"]))
            row["vs_best_tuned"] = p and ("best" if p["method"] == p["best"] else p["vs_best"])
            out.append(row)
    return out


def lora_recovery_markdown(rows: list[dict]) -> str:
    """:func:`lora_recovery_rows` as one Markdown table."""

    def ci(v):
        if v is None or isinstance(v, str):
            return v or "-"
        return f"{v[0]:.3f}" + (f" [{v[1]:.3f}, {v[2]:.3f}]" if v[1] is not None else "")

    body = [
        [
            r["model"],
            r["protocol"],
            fmt(r["ratio"]),
            r["method"],
            fmt(r["ppl"]),
            fmt(r["ppl_lora"]),
            ci(r["vs_untuned"]),
            fmt(r["gap_before"], 3),
            fmt(r["gap_after"], 3),
            fmt(r["closed"], 2),
            ci(r.get("vs_best_tuned")),
        ]
        for r in rows
    ]
    header = ["model", "protocol", "ratio", "method", "PPL", "PPL LoRA", "x untuned [95% CI]", "gap before"]
    return markdown_table([*header, "gap after", "closed", "x best tuned [95% CI]"], body, 4)


def _one_draw_table(records: list[dict]) -> tuple[str, str]:
    records = comparison_order(records)
    cols = comparison_columns(records)
    bold = best_cells(records, cols)
    ids = [[r["model"], r["method"], r.get("ratio_requested"), r.get("achieved_block_ratio")] for r in records]
    raw = [row + [metric_value(r, c.key) for c in cols] for row, r in zip(ids, records)]
    rows = [
        [r["model"], r["method"], fmt(r.get("ratio_requested")), fmt(r.get("achieved_block_ratio"), 4)]
        + [
            f"**{c.display(metric_value(r, c.key))}**" if (i, j) in bold else c.display(metric_value(r, c.key))
            for j, c in enumerate(cols)
        ]
        for i, r in enumerate(records)
    ]
    md = markdown_table(COMPARISON_IDS + [c.label for c in cols], rows, 4)
    paired = paired_ppl_rows(records)
    if paired:
        md += (
            "\n## Perplexity, paired over windows\n\nRatio of each method's perplexity to dense and to the best "
            "method of its ratio, with a 95% t-interval over the per-window differences of mean token NLL "
            "(windows of one text are not independent: read the intervals as approximate). Bold: not "
            "distinguishable from the best (its interval includes 1).\n\n" + paired_ppl_markdown(paired)
        )
    acc = paired_acc_rows(records)
    if acc:
        md += (
            "\n## Accuracy, paired over items\n\nDifference of each method's accuracy to dense and to the best "
            "method of its ratio, in points, with a 95% t-interval over the per-item score differences "
            "(the same items for every model). Bold: not distinguishable from the best (its interval "
            "includes 0).\n\n" + paired_acc_markdown(acc)
        )
    pairs = pairwise_rows(records)
    if pairs:
        md += (
            "\n## Which methods differ\n\nEvery pair of methods of a ratio, dense included: `<` the row's "
            "method is better than the column's, `>` worse, `=` not distinguishable, by a paired t-test "
            "(windows for perplexity, items for accuracy) at 5% after Holm's adjustment over the pairs of "
            "one matrix.\n\n" + pairwise_markdown(pairs)
        )
    errs = stderr_rows(records)
    if errs:
        md += "\n## lm-eval, with standard errors\n\n" + errs
    return md, _csv(COMPARISON_IDS + [c.key for c in cols], raw)


def stderr_rows(records: list[dict]) -> str:
    """Every lm-eval metric that has a standard error, as value ± stderr, one row per target."""
    metrics = sorted(
        {
            (t, m)
            for r in records
            for t, ms in (r.get("lm_eval") or {}).items()
            for m, v in ms.items()
            if v.get("stderr") is not None and math.isfinite(v["stderr"])
        }
    )
    if not metrics:
        return ""
    body = [
        [r["model"], fmt(r.get("ratio_requested")), r["method"]]
        + [_pm((r.get("lm_eval") or {}).get(t, {}).get(m)) for t, m in metrics]
        for r in comparison_order(records)
    ]
    return markdown_table(["model", "ratio", "method", *(f"{t} {m}" for t, m in metrics)], body, 3)


def _pm(v: dict | None, digits: int = 3) -> str:
    if not v or v.get("value") is None:
        return "-"
    err = v.get("stderr")
    return fmt(v["value"], digits) + (f" ± {fmt(err, digits)}" if err is not None and math.isfinite(err) else "")


def summary_text(dense: dict, pruned: dict) -> str:
    """Dense vs one pruned target: parameters, weights on disk, perplexity, every lm-eval metric
    with its standard error, and the item limit when one was used."""

    def params(r):
        return r.get("parameters") or (r.get("base_model") or {}).get("parameters")

    def mb(r):
        return f"{r['weights_bytes'] / 1e6:.1f} MB" if r.get("weights_bytes") else "-"

    src = pruned.get("source_provenance") or dense.get("source_provenance")
    rows = [
        (
            "parameters",
            f"{params(dense):,}" if params(dense) else "-",
            f"{params(pruned):,}" if params(pruned) else "-",
        ),
        ("weights on disk", mb(dense), mb(pruned)),
        ("block parameters removed", "0", fmt(pruned.get("achieved_block_ratio"), 4)),
    ]
    for key in sorted(set(dense.get("perplexity", {})) | set(pruned.get("perplexity", {}))):
        rows.append((key, fmt(dense.get("perplexity", {}).get(key)), fmt(pruned.get("perplexity", {}).get(key))))
    for task in sorted(set(dense.get("lm_eval") or {}) | set(pruned.get("lm_eval") or {})):
        for metric in sorted(
            set((dense.get("lm_eval") or {}).get(task, {})) | set((pruned.get("lm_eval") or {}).get(task, {}))
        ):
            rows.append(
                (
                    f"{task} {metric}",
                    _pm((dense.get("lm_eval") or {}).get(task, {}).get(metric)),
                    _pm((pruned.get("lm_eval") or {}).get(task, {}).get(metric)),
                )
            )
    width = max(len(r[0]) for r in rows)
    lines = [f"{pruned['target']} vs {dense['target']} ({method_label(pruned['method'])})"]
    if src:
        packages = ", ".join(sorted({v for v in src.get("gguf_package_versions") or [] if v}))
        lines.append(
            f"source: {src.get('gguf_name')} ({packages or src.get('gguf_file')}), "
            f"tensor types {src.get('tensor_types')}" + (", dequantised" if src.get("dequantised") else "")
        )
    limit = (pruned.get("lm_eval_config") or {}).get("limit")
    if limit:
        lines.append(f"lm-eval: first {limit} items of each task (eval.lm_eval_limit)")
    lines.append(f"{'':{width}}  {'dense':>18}  {'pruned':>18}")
    lines += [f"{name:{width}}  {a:>18}  {b:>18}" for name, a, b in rows]
    return "\n".join(lines) + "\n"


BASELINE_LABELS = {
    "random": "Random",
    "magnitude": "Magnitude",
    "wanda_sp": "Wanda-sp",
    "flap": "FLAP",
    "flap_mlp": "FLAP (MLP only)",
    "shortgpt": "ShortGPT (blocks)",
}
LOWER_IS_BETTER = ("ppl", "perplexity", "bits_per_byte")


SELECTION_LABELS = {"zglobal": "per-layer z", "uniform": "uniform", "imp": "importance budgets"}


def method_label(method: str) -> str:
    """Display name of a method or mask selector: ``c16_b2_bias`` -> ``ICA k=16, 2 batches +bias``."""
    from .config import BASELINE_METHOD, ICA_METHOD

    if method == "dense":
        return "Dense"
    b = BASELINE_METHOD.fullmatch(method)
    if b:
        return BASELINE_LABELS[b["baseline"]] + (f", x{b['multiple']} widths" if b["multiple"] else "")
    m = ICA_METHOD.fullmatch(method)
    if not m:
        return method
    label = "Hybrid ICA+FLAP" if m["hybrid"] else "Hybrid ICA+Wanda-sp" if m["within"] == "_hwanda" else "ICA"
    label += f" k={m['k']}"
    if m["core"]:
        label = f"Wanda-sp, ICA k={m['k']} cores ({m['core']}%) kept"
    if m["backend"]:
        label += f" ({m['backend']})"
    if m["seed"] is not None:
        label += f", seed {m['seed']}"
    if m["runs"]:
        label += f", consensus of {m['runs']}"
    if m["batches"]:
        label += f", {m['batches']} batch{'es' if int(m['batches']) > 1 else ''}"
    if m["selection"]:
        label += f", {SELECTION_LABELS[m['selection']]}"
    if m["multiple"]:
        label += f", x{m['multiple']} widths"
    return label + (" +bias" if m["bias"] else "")


def ratio_pct(record: dict) -> int:
    """The requested pruning ratio in percent (0 for the dense model)."""
    return round(100 * (record.get("ratio_requested") or 0.0))


def batches_used(record: dict) -> int | None:
    ica = record.get("ica")
    return len(ica["batches_used"]) if ica else None


def calibration_texts(record: dict) -> int | None:
    """Calibration texts behind an ICA mask: the batches it used times the texts per batch."""
    n, cal = batches_used(record), record.get("calibration")
    return n * cal["batch_size"] if n is not None and cal else None


def full_calibration(record: dict) -> bool:
    """Whether an ICA mask used every calibration batch (no ``_b{n}`` subset)."""
    return batches_used(record) == (record.get("calibration") or {}).get("batches")


def nonconverged_fraction(record: dict) -> float | None:
    return (record.get("ica") or {}).get("nonconverged_fraction")


def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in LOWER_IS_BETTER)


def metric_value(record: dict, key: str) -> float | None:
    """A metric of a record by column key: ``ppl:{protocol}@{seqlen}``, ``{task}:{metric}``, ``mean_acc``."""
    if key == "mean_acc":
        return record.get("lm_eval_mean_acc")
    group, name = key.split(":", 1)
    if group == "ppl":
        return (record.get("perplexity") or {}).get(name)
    return ((record.get("lm_eval") or {}).get(group) or {}).get(name, {}).get("value")


@dataclass(frozen=True)
class Column:
    """A metric column: CSV key, display label, direction and display scale."""

    key: str
    label: str
    lower_better: bool
    percent: bool = False
    digits: int = 2

    def shown(self, value: float | None) -> float | None:
        """The value as displayed (percent, rounded): best values are compared at this precision."""
        if value is None or math.isnan(value):
            return None
        return round(value * 100 if self.percent else value, self.digits)

    def display(self, value: float | None) -> str:
        return fmt(self.shown(value), self.digits)


def _ordered(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _ppl_label(key: str) -> str:
    protocol, _, seqlen = key.partition("@")
    return f"PPL@{seqlen}" if protocol == "flap_token_ppl" else key


def metric_columns(records: list[dict], task_metrics: Sequence[str] = ("acc", "word_perplexity")) -> list[Column]:
    """Every perplexity protocol, one metric per lm-eval task (first of ``task_metrics`` it has), mean acc."""
    cols = [
        Column(f"ppl:{k}", _ppl_label(k), True) for k in _ordered(k for r in records for k in r.get("perplexity") or {})
    ]
    for task in _ordered(t for r in records for t in r.get("lm_eval") or {}):
        available = _ordered(m for r in records for m in ((r.get("lm_eval") or {}).get(task) or {}))
        metric = next((m for m in task_metrics if m in available), available[0])
        lower = lower_is_better(metric)
        cols.append(
            Column(
                f"{task}:{metric}",
                f"{task} {metric}",
                lower,
                percent=not lower,
                digits=3 if metric == "bits_per_byte" else 2,
            )
        )
    if any(r.get("lm_eval_mean_acc") is not None for r in records):
        cols.append(Column("mean_acc", "mean acc", False, percent=True))
    return cols


def order_records(records: list[dict]) -> list[dict]:
    """Models in order of appearance; per model dense first, then ratios ascending, methods in order."""
    models = _ordered(r["model"] for r in records)
    methods = _ordered(r["method"] for r in records)
    return sorted(
        records,
        key=lambda r: (models.index(r["model"]), r["method"] != "dense", ratio_pct(r), methods.index(r["method"])),
    )


def best_cells(records: list[dict], columns: list[Column]) -> set[tuple[int, int]]:
    """(row, column) of the best displayed value per block (model x ratio) and column; dense never counts."""
    cells = {
        (i, j): ((r["model"], ratio_pct(r), j), c.shown(metric_value(r, c.key)))
        for i, r in enumerate(records)
        if r["method"] != "dense"
        for j, c in enumerate(columns)
    }
    best: dict[tuple, float] = {}
    for (_, j), (block, v) in cells.items():
        if v is not None and (block not in best or (v < best[block] if columns[j].lower_better else v > best[block])):
            best[block] = v
    return {pos for pos, (block, v) in cells.items() if v is not None and v == best[block]}


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def markdown_table(header: list[str], rows: list[list[str]], left: int) -> str:
    """A Markdown table: the first ``left`` columns left-aligned (identifiers), the rest right (numbers)."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def _arrow(c: Column, tex: bool) -> str:
    if tex:
        return r" $\downarrow$" if c.lower_better else r" $\uparrow$"
    return " ↓" if c.lower_better else " ↑"


MAIN_IDS = ["model", "ratio_requested", "method", "achieved_block_ratio"]


def main_table(records: list[dict], task_metrics: Sequence[str] = ("acc", "word_perplexity")) -> dict[str, str]:
    """The paper's main table as CSV, Markdown and LaTeX (booktabs); best value per block in bold.

    Rows are model x ratio x method (dense once per model, first); columns every perplexity
    protocol, one metric per lm-eval task and the mean accuracy. A block is one model at one
    ratio; lower is better for perplexities and bits per byte, higher for accuracies.
    """
    records = order_records(records)
    cols = metric_columns(records, task_metrics)
    bold = best_cells(records, cols)
    raw = [
        [
            r["model"],
            r.get("ratio_requested"),
            r["method"],
            r.get("achieved_block_ratio"),
            *(metric_value(r, c.key) for c in cols),
        ]
        for r in records
    ]
    return {
        "csv": _csv(MAIN_IDS + [c.key for c in cols], raw),
        "md": _main_markdown(records, cols, bold),
        "tex": _main_latex(records, cols, bold),
    }


def _id_cells(r: dict) -> list[str]:
    ratio = "-" if r["method"] == "dense" else f"{ratio_pct(r)}%"
    return [r["model"], ratio, method_label(r["method"]), fmt(100 * (r.get("achieved_block_ratio") or 0.0), 1)]


def _main_markdown(records: list[dict], cols: list[Column], bold: set[tuple[int, int]]) -> str:
    header = ["Model", "Ratio", "Method", "Removed %"] + [c.label + _arrow(c, False) for c in cols]
    rows = []
    for i, r in enumerate(records):
        cells = [c.display(metric_value(r, c.key)) for c in cols]
        rows.append(_id_cells(r) + [f"**{s}**" if (i, j) in bold else s for j, s in enumerate(cells)])
    return markdown_table(header, rows, 3)


def _main_latex(records: list[dict], cols: list[Column], bold: set[tuple[int, int]]) -> str:
    header = ["Model", "Ratio", "Method", r"Removed \%"] + [_tex(c.label) + _arrow(c, True) for c in cols]
    lines = [
        r"\begin{tabular}{lrl" + "r" * (1 + len(cols)) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    prev: tuple | None = None
    for i, r in enumerate(records):
        model, ratio, method, removed = (_tex(s) for s in _id_cells(r))
        block = (r["model"], ratio_pct(r))
        if prev is not None and block != prev:
            lines.append(r"\midrule")
        cells = [_tex(c.display(metric_value(r, c.key))) for c in cols]
        cells = [rf"\textbf{{{s}}}" if (i, j) in bold else s for j, s in enumerate(cells)]
        first_of_model = prev is None or prev[0] != r["model"]
        lines.append(
            " & ".join([model if first_of_model else "", ratio if block != prev else "", method, removed, *cells])
            + r" \\"
        )
        prev = block
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


ABLATION_IDS = [
    "model",
    "ratio_requested",
    "method",
    "k",
    "calibration_texts",
    "batches",
    "threshold",
    "achieved_block_ratio",
    "nonconverged_fraction",
]


def ablation_table(records: list[dict], task_metrics: Sequence[str] = ("acc", "word_perplexity")) -> dict[str, str]:
    """The ablation targets (k and calibration size) as CSV and Markdown, with threshold and convergence."""
    models = _ordered(r["model"] for r in records)
    records = sorted(
        records,
        key=lambda r: (
            models.index(r["model"]),
            r["method"] != "dense",
            ratio_pct(r),
            r.get("k") or 0,
            calibration_texts(r) or 0,
        ),
    )
    cols = metric_columns(records, task_metrics)
    ids = [
        [
            r["model"],
            r.get("ratio_requested"),
            r["method"],
            r.get("k"),
            calibration_texts(r),
            batches_used(r),
            r.get("threshold"),
            r.get("achieved_block_ratio"),
            nonconverged_fraction(r),
        ]
        for r in records
    ]
    raw = [row + [metric_value(r, c.key) for c in cols] for row, r in zip(ids, records)]
    header = ["Model", "Ratio", "Method", "k", "Texts", "Batches", "T", "Removed %", "Non-conv. %"]
    rows = [
        [
            r["model"],
            "-" if r["method"] == "dense" else f"{ratio_pct(r)}%",
            method_label(r["method"]),
            _int(r.get("k")),
            _int(calibration_texts(r)),
            _int(batches_used(r)),
            fmt(r.get("threshold"), 3),
            fmt(100 * (r.get("achieved_block_ratio") or 0.0), 1),
            _pct(nonconverged_fraction(r)),
        ]
        + [c.display(metric_value(r, c.key)) for c in cols]
        for r in records
    ]
    header += [c.label + _arrow(c, False) for c in cols]
    return {"csv": _csv(ABLATION_IDS + [c.key for c in cols], raw), "md": markdown_table(header, rows, 3)}


def _int(x: int | None) -> str:
    return "-" if x is None else str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else fmt(100 * x, 1)
