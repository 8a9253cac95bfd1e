"""Replicates: a method's result over independent calibration draws, not one mask.

A mask is a random draw: of the calibration texts (which texts form each batch), of the FastICA
start, of random's seed. ``models.<m>.draws: R`` adds R - 1 aliases ``<m>_d1 .. <m>_d{R-1}`` that
share the model's weights and evaluation but draw calibration texts, ICA starts and random seeds
anew (draw d: seeds + d); draw 0 is the model itself. Every target of a draw alias is an ordinary
cached target.

The model behind the intervals here: each draw d gives a method a value y_d (log perplexity ratio
to dense, or accuracy difference to dense, each already averaged over the evaluation's windows or
items), y_d = mu + e_d with e_d independent across draws and of unknown variance. The interval is
the t-interval of the draws' mean (R - 1 degrees of freedom); the evaluation noise of one draw is
inside e_d. Two methods are compared on the draws they share (paired: draw d of both used the same
calibration texts), with Holm's adjustment over the pairs of one ratio and measure, as the
one-draw tables do over windows and items. A method without randomness (magnitude) has one value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Methods whose mask depends on no random draw: one value, repeated wherever a pair needs one.
DETERMINISTIC = ("magnitude",)


def is_random(method: str) -> bool:
    """Whether a method's mask changes with the draw (everything but magnitude and dense)."""
    return method != "dense" and method.split("_m")[0] not in DETERMINISTIC


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, ``level`` t-interval and standard deviation of ``values`` (independent draws); with
    one value, or values without spread, the interval is the value itself."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if sd > 0 else 0.0
    return mean, mean - half, mean + half, sd


def paired_draws_p(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean difference a - b over shared draws, its standard deviation and the two-sided paired
    t-test's p-value (1 where nothing varies or there is one draw)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    mean, _, _, sd = t_interval(d)
    if len(d) < 2 or sd == 0:
        return mean, sd, 1.0 if mean == 0 or len(d) < 2 else 0.0
    t = mean / (sd / math.sqrt(len(d)))
    return mean, sd, float(2 * stats.t.sf(abs(t), len(d) - 1))


def draws_needed(mean: float, sd: float, power: float = 0.8, alpha: float = 0.05, most: int = 1000) -> int | None:
    """Draws a paired t-test at ``alpha`` (two-sided) needs to detect a true difference ``mean``
    with between-draw standard deviation ``sd`` with probability ``power`` (noncentral t); None
    when the difference is zero or more than ``most`` draws would be needed."""
    from scipy import stats

    if mean == 0 or sd == 0:
        return None if mean == 0 else 2
    effect = abs(mean) / sd
    for n in range(2, most + 1):
        crit = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = effect * math.sqrt(n)
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= power:
            return n
    return None


def _measures(record: dict) -> dict[str, tuple[float, bool]]:
    """A record's measures as (value, lower is better): log perplexity per protocol, and each
    lm-eval metric's value."""
    out = {k: (math.log(v), True) for k, v in (record.get("perplexity") or {}).items() if v}
    for task, metrics in (record.get("lm_eval") or {}).items():
        for metric, v in metrics.items():
            value = v.get("value") if isinstance(v, dict) else v
            if isinstance(value, (int, float)) and not metric.endswith("stderr"):
                out[f"{task}:{metric}"] = (float(value), False)
    return out


def group_draws(records: list[dict], draws: dict[str, Sequence]) -> tuple[dict, dict]:
    """Records by (base model, ratio, method) -> {draw: record}, and dense records by base model.

    ``draws`` maps a draw alias's slug to (base model, draw); any other model is its own draw 0."""
    groups: dict[tuple, dict[int, dict]] = {}
    dense: dict[str, dict] = {}
    for r in records:
        base, d = draws.get(r["model"], (r["model"], 0))
        if r["method"] == "dense":
            if d == 0:
                dense[base] = r
            continue
        groups.setdefault((base, r.get("ratio_requested"), r["method"]), {})[int(d)] = r
    return groups, dense


def across_draws_rows(records: list[dict], draws: dict[str, Sequence]) -> list[dict]:
    """Per base model x ratio x measure x method: the mean over draws of the method's value relative
    to dense (perplexity: ratio; metrics: difference), its 95% t-interval across draws, the
    between-draw standard deviation and the number of draws."""
    groups, dense = group_draws(records, draws)
    out = []
    for (base, ratio, method), by_draw in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        d = dense.get(base)
        ref = _measures(d) if d else {}
        per_draw = {k: _measures(r) for k, r in by_draw.items()}
        for key in sorted({m for ms in per_draw.values() for m in ms}):
            if key not in ref:
                continue
            lower = ref[key][1]
            by_draw = {k: ms[key][0] - ref[key][0] for k, ms in sorted(per_draw.items()) if key in ms}
            values = list(by_draw.values())
            mean, lo, hi, sd = t_interval(values)
            scale = math.exp if lower else (lambda x: 100 * x)
            out.append(
                {
                    "model": base,
                    "ratio": ratio,
                    "measure": key,
                    "method": method,
                    "draws": len(values),
                    "random": is_random(method),
                    "mean": scale(mean),
                    "lo": scale(lo),
                    "hi": scale(hi),
                    "sd": sd if lower else 100 * sd,
                    "lower_is_better": lower,
                    "values": values,
                    "by_draw": by_draw,
                }
            )
    return out


def relabel_variants(records: list[dict], variants: dict) -> list[dict]:
    """Records of a variant's draws (``variants``: its draw slug -> the compared model's draw slug,
    the variant's name) become that draw's records of ``<method>@<variant>``, in place."""
    for r in records:
        if r["model"] in variants:
            r["model"], name = variants[r["model"]]
            r["method"] = f"{r['method']}@{name}"
    return records


def _shared(a: dict, b: dict) -> list[tuple[float, float]]:
    """The two methods' values on the draws both have (paired by calibration draw); a method
    without randomness contributes its one value to every draw of the other."""
    if not a["random"] or not b["random"]:
        fixed, other = (a, b) if not a["random"] else (b, a)
        value = fixed["values"][0]
        pairs = [(value, v) for v in other["values"]]
        return pairs if fixed is a else [(v, w) for w, v in pairs]
    return [(a["by_draw"][d], b["by_draw"][d]) for d in sorted(set(a["by_draw"]) & set(b["by_draw"]))]


def draw_pairwise_rows(rows: list[dict], alpha: float = 0.05) -> list[dict]:
    """Every pair of methods of one base model, ratio and measure, compared over their shared draws
    (a method without randomness pairs its one value with every draw), Holm-adjusted over the
    matrix's pairs; ``needed`` is the draws that would detect the observed mean difference with 80%
    power where the pair is not separated."""
    from .tables import holm

    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        blocks.setdefault((r["model"], r["ratio"], r["measure"]), []).append(r)
    out = []
    for (model, ratio, measure), members in blocks.items():
        pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
        tests = []
        for a, b in pairs:
            shared = _shared(a, b)
            tests.append(paired_draws_p([v for v, _ in shared], [w for _, w in shared]) + (len(shared),))
        for (a, b), (mean, sd, p, n), p_adj in zip(pairs, tests, holm([t[2] for t in tests])):
            better = (mean < 0) == a["lower_is_better"]
            order = "=" if p_adj >= alpha else ("<" if better else ">")
            out.append(
                {
                    "model": model,
                    "ratio": ratio,
                    "measure": measure,
                    "a": a["method"],
                    "b": b["method"],
                    "draws": n,
                    "diff": mean,
                    "sd": sd,
                    "p": p,
                    "p_holm": p_adj,
                    "order": order,
                    # one shared draw tests nothing and has no spread to plan with
                    "needed": draws_needed(mean, sd) if order == "=" and n > 1 else None,
                }
            )
    return out


def across_draws_markdown(rows: list[dict], pairs: list[dict]) -> str:
    """The across-draws rows and their pairwise verdicts as Markdown."""
    from .tables import fmt, markdown_table

    def ci(r):
        if r["lower_is_better"]:
            return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        return f"{r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]"

    def sd(r):
        if not r["random"]:
            return "no draw"
        return f"{r['sd']:.3f}" if r["lower_is_better"] else f"{r['sd']:.1f}"

    ordered = sorted(
        rows, key=lambda r: (r["model"], r["ratio"] or 0, r["measure"], r["mean"] * (1 if r["lower_is_better"] else -1))
    )
    body = [[r["model"], fmt(r["ratio"]), r["measure"], r["method"], str(r["draws"]), ci(r), sd(r)] for r in ordered]
    text = markdown_table(
        [
            "model",
            "ratio",
            "measure",
            "method",
            "draws",
            "x dense or - dense (points) [95% CI over draws]",
            "SD between draws (log PPL or points)",
        ],
        body,
        4,
    )
    flip = {"<": ">", ">": "<", "=": "="}
    blocks: dict[tuple, dict] = {}
    needs: list[str] = []
    for p in pairs:
        b = blocks.setdefault((p["model"], p["ratio"], p["measure"]), {})
        b[(p["a"], p["b"])] = p["order"]
        b[(p["b"], p["a"])] = flip[p["order"]]
        if p["order"] == "=":
            n = p["needed"]
            needs.append(
                f"- {p['model']}, ratio {fmt(p['ratio'])}, {p['measure']}: {p['a']} vs {p['b']} "
                f"(mean difference {p['diff']:+.4f}, SD {p['sd']:.4f} over {p['draws']} draws): "
                + (
                    "one shared draw, no test"
                    if p["draws"] < 2
                    else f"about {n} draws for 80% power"
                    if n
                    else "no difference to detect, or more than 1,000 draws"
                )
            )
    parts = []
    for (model, ratio, measure), cells in blocks.items():
        names = list(dict.fromkeys(n for pair in cells for n in pair))
        matrix = [[n] + ["" if n == m else cells.get((n, m), "") for m in names] for n in names]
        parts.append(
            f"**{model}, ratio {fmt(ratio)}, {measure}, over draws**\n\n" + markdown_table(["", *names], matrix, 1)
        )
    text += "\n\n" + "\n".join(parts)
    if needs:
        text += (
            "\n\nPairs not separated, and the draws a paired test would need to separate the observed difference:\n\n"
            + "\n".join(needs)
            + "\n"
        )
    return text


def reference_rows(rows: list[dict], reference: str) -> list[dict]:
    """Every method against ``reference`` over the draws they share (paired by calibration draw),
    one test per pair at 5% (each row is its own question, as an ablation's is): perplexity as
    the geometric mean ratio to the reference, a metric as the mean difference in points, each
    with its 95% t-interval across draws, the SD of the per-draw difference, and for a pair the
    draws do not separate, the draws a paired test would need for 80% power."""
    by_block: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_block.setdefault((r["model"], r["ratio"], r["measure"]), {})[r["method"]] = r
    out = []
    for (model, ratio, measure), members in by_block.items():
        ref = members.get(reference)
        if ref is None:
            continue
        for method, r in members.items():
            if method == reference:
                continue
            shared = _shared(r, ref)
            diffs = [a - b for a, b in shared]
            mean, lo, hi, sd = t_interval(diffs)
            _, _, p = paired_draws_p([a for a, _ in shared], [b for _, b in shared])
            scale = math.exp if r["lower_is_better"] else (lambda x: 100 * x)
            separated = len(diffs) > 1 and p < 0.05
            better = (mean < 0) == r["lower_is_better"]
            out.append(
                {
                    "model": model,
                    "ratio": ratio,
                    "measure": measure,
                    "method": method,
                    "reference": reference,
                    "draws": len(diffs),
                    "lower_is_better": r["lower_is_better"],
                    "mean": scale(mean),
                    "lo": scale(lo),
                    "hi": scale(hi),
                    "sd": sd if r["lower_is_better"] else 100 * sd,
                    "p": p,
                    "verdict": ("better" if better else "worse") if separated else "not separated",
                    "needed": None if separated or len(diffs) < 2 else draws_needed(mean, sd),
                }
            )
    return out


def reference_markdown(rows: list[dict]) -> str:
    """:func:`reference_rows` as a Markdown table."""
    from .tables import fmt, markdown_table

    def ci(r):
        if r["lower_is_better"]:
            return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        return f"{r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]"

    def needed(r):
        if r["verdict"] != "not separated":
            return ""
        if r["draws"] < 2:
            return "one shared draw, no test"
        return f"{r['needed']}" if r["needed"] else "> 1,000 or none"

    body = [
        [
            r["model"],
            fmt(r["ratio"]),
            r["measure"],
            r["method"],
            str(r["draws"]),
            ci(r),
            f"{r['sd']:.3f}" if r["lower_is_better"] else f"{r['sd']:.1f}",
            f"{r['p']:.3g}",
            r["verdict"],
            needed(r),
        ]
        for r in sorted(rows, key=lambda r: (r["model"], r["ratio"] or 0, r["measure"], r["method"]))
    ]
    return markdown_table(
        [
            "model",
            "ratio",
            "measure",
            "method",
            "draws",
            "x reference or - reference (points) [95% CI over draws]",
            "SD of the per-draw difference",
            "p (paired t)",
            "verdict",
            "draws for 80% power",
        ],
        body,
        4,
    )
