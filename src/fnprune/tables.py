"""Tables built only from ``metrics.json`` records."""

from __future__ import annotations

import csv
import io
import math


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def comparison_rows(records: list[dict]) -> tuple[list[str], list[list]]:
    """One row per target: method, ratios, every perplexity and lm-eval metric, in a fixed order."""
    ppl_keys = sorted({k for r in records for k in r.get("perplexity", {})})
    task_metrics = sorted({(t, m) for r in records for t, ms in (r.get("lm_eval") or {}).items() for m in ms})
    header = ["model", "method", "ratio_requested", "achieved_block_ratio"]
    header += [f"ppl:{k}" for k in ppl_keys] + [f"{t}:{m}" for t, m in task_metrics]
    rows = []
    order = sorted(records, key=lambda r: (r["model"], r.get("ratio_requested") or 0.0,
                                           r["method"] != "dense", r["method"]))
    for r in order:
        row = [r["model"], r["method"], r.get("ratio_requested"), r.get("achieved_block_ratio")]
        row += [r.get("perplexity", {}).get(k) for k in ppl_keys]
        row += [(r.get("lm_eval") or {}).get(t, {}).get(m, {}).get("value") for t, m in task_metrics]
        rows.append(row)
    return header, rows


def comparison_table(records: list[dict]) -> tuple[str, str]:
    """Markdown and CSV text of the method comparison; the best pruned value per ratio is bold."""
    header, rows = comparison_rows(records)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    lower_better = [h.startswith("ppl:") or "perplexity" in h or "bits_per_byte" in h for h in header]
    best: dict[tuple, float] = {}
    for row in rows:
        if row[1] == "dense":
            continue
        for j in range(4, len(header)):
            v = row[j]
            if v is None:
                continue
            key = (row[0], row[2], j)
            cur = best.get(key)
            if cur is None or (v < cur if lower_better[j] else v > cur):
                best[key] = v
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row[0], row[1], _fmt(row[2]), _fmt(row[3], 4)]
        for j in range(4, len(header)):
            s = _fmt(row[j], 3)
            if row[1] != "dense" and row[j] is not None and best.get((row[0], row[2], j)) == row[j]:
                s = f"**{s}**"
            cells.append(s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", buf.getvalue()
