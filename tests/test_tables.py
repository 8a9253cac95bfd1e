"""The comparison table: paired perplexity intervals over windows, lm-eval standard errors, summary."""

import math

import numpy as np
import pytest
from scipy import stats

from fnprune import tables


def record(method, ratio, nll, mc=None):
    nll = np.asarray(nll, dtype=float)
    rec = {
        "model": "m",
        "target": f"m_{method}",
        "method": method,
        "ratio_requested": ratio,
        "achieved_block_ratio": ratio,
        "perplexity": {"flap_token_ppl@128": float(np.exp(nll.mean()))},
        "perplexity_detail": [{"protocol": "flap_token_ppl", "seqlen": 128, "window_nll": nll.tolist()}],
    }
    if mc is not None:
        rec["lm_eval"] = {"fnprune_mc": {"acc": {"value": mc, "stderr": 0.03}}}
    return rec


def test_paired_ratio_is_the_t_interval_of_window_differences():
    rng = np.random.default_rng(0)
    b = rng.normal(3.0, 0.4, 50)
    a = b + rng.normal(0.1, 0.05, 50)
    ratio, lo, hi = tables.paired_ratio(a, b)
    d = a - b
    ci = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert ratio == pytest.approx(math.exp(d.mean())) and ratio == pytest.approx(math.exp(a.mean() - b.mean()))
    assert (lo, hi) == pytest.approx((math.exp(ci[0]), math.exp(ci[1])))
    with pytest.raises(ValueError, match="same windows"):
        tables.paired_ratio(a[:10], b)


def test_comparison_marks_ties_with_the_best_and_reports_stderr():
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, 60)
    recs = [
        record("dense", 0.0, base, 0.9),
        record("good", 0.2, base + 0.10 + rng.normal(0, 0.01, 60), 0.85),
        record("same", 0.2, base + 0.10 + rng.normal(0, 0.3, 60), 0.84),  # noisy: not separable from good
        record("bad", 0.2, base + 0.60 + rng.normal(0, 0.01, 60), 0.70),
    ]
    rows = {r["method"]: r for r in tables.paired_ppl_rows(recs)}
    assert rows["good"]["method"] == rows["good"]["best"] or rows["same"]["best"] == rows["good"]["best"]
    best = rows["good"]["best"]
    assert rows[best]["tied"] and not rows["bad"]["tied"]
    other = "same" if best == "good" else "good"
    assert rows[other]["tied"], rows[other]
    vd = rows["bad"]["vs_dense"]
    assert vd[1] < vd[0] < vd[2] and vd[0] == pytest.approx(math.exp(0.6), rel=0.01)
    md, csv_text = tables.comparison_table(recs)
    assert "## Perplexity, paired over windows" in md and "0.700 ± 0.030" in md
    assert "window_nll" not in csv_text


def test_summary_lists_dense_and_pruned_side_by_side():
    dense = {**record("dense", 0.0, [3.0, 3.1], 0.9), "base_model": {"parameters": 1000}, "weights_bytes": 4000}
    pruned = {
        **record("c64", 0.2, [3.2, 3.3], 0.8),
        "parameters": 800,
        "weights_bytes": 3200,
        "lm_eval_config": {"limit": 50},
    }
    text = tables.summary_text(dense, pruned)
    assert "1,000" in text and "800" in text and "0.900 ± 0.030" in text and "0.800 ± 0.030" in text
    assert "first 50 items" in text and "flap_token_ppl@128" in text


def with_items(rec, scores):
    rec["lm_eval_items"] = {"fnprune_mc": {"acc": [float(x) for x in scores]}}
    return rec


def test_paired_t_matches_scipy_and_holm_is_step_down():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, 400).astype(float), rng.integers(0, 2, 400).astype(float)
    mean, lo, hi, p = tables.paired_t(a, b)
    ref = stats.ttest_rel(a, b)
    assert mean == pytest.approx((a - b).mean()) and p == pytest.approx(ref.pvalue)
    assert lo < mean < hi
    assert tables.paired_t(a, a) == (0.0, 0.0, 0.0, 1.0)
    # Holm: sorted p-values times (m, m-1, ...), made monotone, capped at 1, in the input's order.
    assert tables.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert tables.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_accuracy_paired_over_items_marks_ties_and_pairs_that_differ():
    rng = np.random.default_rng(3)
    n = 1000
    truth = rng.random(n) < 0.8
    flip = lambda p: np.where(rng.random(n) < p, ~truth, truth)  # noqa: E731
    base = rng.normal(3.0, 0.5, 300)
    recs = [
        with_items(record("dense", 0.0, base, 0.8), truth),
        with_items(record("good", 0.2, base + 0.1 + rng.normal(0, 0.01, 300), 0.7), flip(0.05)),
        with_items(record("close", 0.2, base + 0.1 + rng.normal(0, 0.01, 300), 0.7), flip(0.06)),
        with_items(record("bad", 0.2, base + 0.6 + rng.normal(0, 0.01, 300), 0.5), flip(0.45)),
    ]
    rows = {r["method"]: r for r in tables.paired_acc_rows(recs)}
    assert rows["good"]["best"] in ("good", "close") and rows["good"]["tied"] and rows["close"]["tied"]
    assert not rows["bad"]["tied"]
    mean, lo, hi = rows["bad"]["vs_dense"]
    assert mean == pytest.approx(rows["bad"]["value"] - truth.mean()) and lo < mean < hi < 0
    pairs = {(r["a"], r["b"], r["measure"]): r for r in tables.pairwise_rows(recs)}
    acc = {k[:2]: v["order"] for k, v in pairs.items() if k[2] == "fnprune_mc:acc"}
    assert acc[("bad", "close")] == ">" and acc[("bad", "good")] == ">" and acc[("close", "good")] == "="
    ppl = {k[:2]: v["order"] for k, v in pairs.items() if k[2] == "flap_token_ppl@128"}
    assert ppl[("dense", "bad")] == "<" and ppl[("bad", "good")] == ">"
    assert all(0 <= v["p"] <= v["p_holm"] <= 1 for v in pairs.values())
    md, _ = tables.comparison_table(recs)
    assert "## Accuracy, paired over items" in md and "## Which methods differ" in md


def test_unpaired_windows_name_both_targets_and_the_measure():
    recs = [record("dense", 0.0, np.ones(10)), record("c64", 0.2, np.ones(8) * 1.1)]
    with pytest.raises(ValueError, match=r"m_c64 vs m_dense on flap_token_ppl@128: .* \(got 8 and 10\)"):
        tables.paired_ppl_rows(recs)


def test_a_comparison_names_the_methods_it_left_out(tmp_path):
    from fnprune import io, stages

    files = []
    for rec in (record("dense", 0.0, [3.0, 3.1, 2.9]), record("flap_mlp", 0.2, [3.2, 3.4, 3.1])):
        files.append(tmp_path / f"{rec['method']}.json")
        io.write_json(files[-1], rec)
    why = "flap: flap removes whole key/value head groups, and model m has one key/value head per layer"
    stages.comparison([str(f) for f in files], tmp_path / "c.md", tmp_path / "c.csv", [why])
    md = (tmp_path / "c.md").read_text()
    assert md.endswith(f"## Methods left out\n\n- {why}\n") and "flap_mlp" in md


def tuned(rec, shift):
    """``rec``'s _lora twin: its window NLLs moved by ``shift``."""
    nll = np.asarray(rec["perplexity_detail"][0]["window_nll"]) + shift
    out = record(f"{rec['method']}_lora", rec["ratio_requested"], nll)
    return {**out, "target": f"{rec['target']}_lora", "tuned_from": rec["target"], "lora": {"steps": 64}}


def test_recovery_with_lora_compares_the_gap_to_the_tuned_dense_model():
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.5, 80)
    dense, c8 = record("dense", 0.0, base, 0.9), record("c8", 0.2, base + 0.3 + rng.normal(0, 0.02, 80), 0.8)
    flap = record("flap", 0.2, base + 0.2 + rng.normal(0, 0.02, 80), 0.85)
    plain = [dense, c8, flap]
    twins = [tuned(dense, -0.05), tuned(c8, -0.2), tuned(flap, -0.05)]
    rows = {r["method"]: r for r in tables.lora_recovery_rows(plain + twins)}
    assert list(rows) == ["dense", "c8", "flap"]
    assert rows["dense"]["vs_untuned"][0] == pytest.approx(math.exp(-0.05)) and rows["dense"]["gap_before"] is None
    c = rows["c8"]
    assert c["vs_untuned"][0] == pytest.approx(math.exp(-0.2)) and c["vs_untuned"][1] <= c["vs_untuned"][2]
    assert c["gap_before"] == pytest.approx(
        c8["perplexity"]["flap_token_ppl@128"] / dense["perplexity"]["flap_token_ppl@128"]
    )
    assert c["gap_after"] == pytest.approx(c["gap_before"] * math.exp(-0.15))
    assert c["closed"] == pytest.approx(1 - math.log(c["gap_after"]) / math.log(c["gap_before"]))
    assert 0.4 < c["closed"] < 0.6 and rows["flap"]["closed"] == pytest.approx(0, abs=1e-9)
    # tuning reordered them: c8 was worse than flap untuned, its twin is the best tuned model
    assert rows["c8"]["vs_best_tuned"] == "best" and rows["dense"]["vs_best_tuned"] is None
    vs = rows["flap"]["vs_best_tuned"]
    assert vs[0] == pytest.approx(math.exp(0.05), rel=0.01) and vs[1] < vs[0] < vs[2] and vs[1] > 1
    md_off, csv_off = tables.comparison_table(plain)
    md_on, csv_on = tables.comparison_table(plain + twins)
    # the tables without tuning are what they were; the section follows them; the CSV adds the twins' rows
    assert "Recovery with LoRA" not in md_off and md_on.startswith(md_off)
    section = md_on[len(md_off) :]
    assert section.startswith("\n## Recovery with LoRA") and "| m | flap_token_ppl@128 | 0.20 | c8 |" in section
    assert "c8_lora" not in md_off and "dense_lora" not in md_on.split("## Recovery with LoRA")[0]
    assert set(csv_off.splitlines()) < set(csv_on.splitlines()) and "c8_lora" in csv_on
