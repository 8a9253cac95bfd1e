"""Replicates: draws as model aliases, intervals across draws that cover at their level, paired
tests over shared draws, and the draws a test would need."""

import math
import re

import numpy as np
import pytest
import yaml

from fnprune import config as C
from fnprune import replicates as R
from fnprune import tables
from helpers import REPO


def test_intervals_across_draws_cover_at_95_percent_under_known_between_draw_variance():
    """Simulate R draws of a method whose log perplexity ratio has a known mean and between-draw
    spread, each draw's value measured through its own window noise (the window-paired interval of
    one draw is too narrow for this: it misses the draw's own variance); the across-draws
    interval covers the mean about 95% of the time, the one-draw window interval far less."""
    rng = np.random.default_rng(0)
    mu, between, window_sd, windows, draws, sims = 0.4, 0.05, 0.3, 256, 5, 2000
    covered = covered_one_draw = 0
    for _ in range(sims):
        effects = mu + rng.normal(0, between, draws)
        measured = [(e + rng.normal(0, window_sd, windows)) for e in effects]
        _, lo, hi, _ = R.t_interval([m.mean() for m in measured])
        covered += lo <= mu <= hi
        one = measured[0]
        half = 1.96 * one.std(ddof=1) / math.sqrt(windows)
        covered_one_draw += one.mean() - half <= mu <= one.mean() + half
    assert 0.93 <= covered / sims <= 0.97, covered / sims
    assert covered_one_draw / sims < 0.6, covered_one_draw / sims


def test_paired_test_over_draws_and_the_draws_it_would_need():
    a = [0.50, 0.55, 0.47, 0.52, 0.49]
    b = [0.40, 0.46, 0.36, 0.43, 0.38]  # a - b = 0.1 +- 0.01: separated
    mean, sd, p = R.paired_draws_p(a, b)
    assert mean == pytest.approx(0.1) and p < 0.001
    assert R.paired_draws_p([1.0], [0.5])[2] == 1.0  # one draw tests nothing
    n = R.draws_needed(0.05, 0.1)  # effect 0.5 SD: the textbook paired n for 80% power is about 34
    assert 30 <= n <= 37, n
    assert R.draws_needed(0.0, 0.1) is None and R.draws_needed(0.2, 0.1) < n


def _record(model, method, ratio, ppl, acc):
    return {
        "model": model,
        "target": f"{model}_{method}",
        "method": method,
        "ratio_requested": ratio,
        "achieved_block_ratio": ratio,
        "perplexity": {"flap_token_ppl@128": ppl},
        "lm_eval": {"mc": {"acc": {"value": acc, "stderr": 0.01}}},
    }


def test_comparison_reports_each_method_over_its_draws_beside_one_draw():
    draws = {"m_d1": ["m", 1], "m_d2": ["m", 2]}
    recs = [_record("m", "dense", 0.0, 20.0, 0.9)]
    for slug, shift in (("m", 0.0), ("m_d1", 1.0), ("m_d2", -1.0)):
        recs.append(_record(slug, "c64", 0.2, 40.0 + shift, 0.80 + shift / 100))
        recs.append(_record(slug, "wanda_sp", 0.2, 30.0 + shift, 0.85))
    recs.append(_record("m", "magnitude", 0.2, 50.0, 0.7))
    rows = {(r["method"], r["measure"]): r for r in R.across_draws_rows(recs, draws)}
    c64 = rows[("c64", "flap_token_ppl@128")]
    logs = [math.log(v / 20.0) for v in (40.0, 41.0, 39.0)]
    assert c64["draws"] == 3 and c64["mean"] == pytest.approx(math.exp(np.mean(logs)))
    assert c64["lo"] < c64["mean"] < c64["hi"] and c64["sd"] == pytest.approx(np.std(logs, ddof=1))
    mag = rows[("magnitude", "flap_token_ppl@128")]
    assert mag["draws"] == 1 and not mag["random"] and mag["lo"] == mag["hi"]
    assert rows[("wanda_sp", "mc:acc")]["mean"] == pytest.approx(-5.0) and rows[("wanda_sp", "mc:acc")]["sd"] == 0
    pairs = {(p["a"], p["b"], p["measure"]): p for p in R.draw_pairwise_rows(list(rows.values()))}
    ppl = pairs[("c64", "wanda_sp", "flap_token_ppl@128")]
    assert ppl["draws"] == 3 and ppl["order"] == ">"  # c64 worse on every shared draw
    md, csv = tables.comparison_table(recs, draws)
    assert "## Across calibration draws" in md and "no draw" in md
    assert md.count("m_d1") == 0 and "m_d1" in csv  # one-draw tables are draw 0's; the CSV has all


def test_draws_add_aliases_with_offset_seeds_that_share_the_weights():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["smol"]["draws"] = 3
    C.validate(cfg)
    m = cfg["models"]
    assert [s for s in m if s.startswith("smol_d")] == ["smol_d1", "smol_d2"]
    assert C.draws_of(cfg, "smol") == ["smol", "smol_d1", "smol_d2"]
    for d in (1, 2):
        alias = m[f"smol_d{d}"]
        assert alias["base"] == "smol" and C.weights_of(cfg, f"smol_d{d}") == "smol"
        assert alias["draw"] == d and alias["calibration"]["seed"] == cfg["seed"] + d
        assert alias["eval"] == m["smol"]["eval"] and alias["num_layers"] == 30
    assert m["smol"]["draw"] == 0 and m["smol"]["calibration"]["seed"] == cfg["seed"]
    C.validate(cfg)  # validating the expanded config again adds nothing and refuses nothing
    assert [s for s in m if s.startswith("smol_d")] == ["smol_d1", "smol_d2"]
    clash = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    clash["models"]["smol"]["draws"] = 2
    clash["models"]["smol_d1"] = {"base": "smol", "calibration": {"seed": 7}}
    with pytest.raises(ValueError, match=r"models.smol.draws: draw alias 'smol_d1' is already a key of models"):
        C.validate(clash)
    assert R.is_random("c64_bias") and R.is_random("random") and not R.is_random("magnitude_m32")


def test_each_method_against_a_reference_over_draws_with_a_variant_paired_draw_by_draw(tmp_path):
    """``comparison.reference``: every method's ratio to it over shared draws, one test per row;
    ``comparison.variants``: a variant model's draws join the compared model's as <method>@<variant>,
    draw d paired with draw d (same calibration texts)."""
    import json

    from fnprune import stages

    recs = [_record("m", "dense", 0.0, 20.0, 0.9)]
    for d, slug in enumerate(("m", "m_d1", "m_d2", "m_d3")):
        noise = (0.0, 2.0, -2.0, 1.0)[d]
        recs.append(_record(slug, "c64", 0.2, 40.0 + noise, 0.80))
        recs.append(_record(slug, "c32", 0.2, 36.0 + noise, 0.80))  # 10% lower on every draw
        recs.append(_record(slug, "c128", 0.2, 40.0 + noise * (1, -3, 2, -1)[d], 0.80))  # no steady difference
    for d, slug in enumerate(("v", "v_d1", "v_d2", "v_d3")):
        recs.append(_record(slug, "c64", 0.2, 1.2 * (40.0 + (0.0, 2.0, -2.0, 1.0)[d]), 0.80))
    files = []
    for i, r in enumerate(recs):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    draws = {"m_d1": ["m", 1], "m_d2": ["m", 2], "m_d3": ["m", 3]}
    variants = {"v": ["m", "v"], "v_d1": ["m_d1", "v"], "v_d2": ["m_d2", "v"], "v_d3": ["m_d3", "v"]}
    md_path, csv_path = tmp_path / "c.md", tmp_path / "c.csv"
    stages.comparison([str(f) for f in files], str(md_path), str(csv_path), [], draws, variants, "c64")
    md = md_path.read_text()
    assert "## Against c64, across draws" in md and "c64@v" in md
    relabelled = R.relabel_variants([json.loads(f.read_text()) for f in files], variants)
    rows = R.across_draws_rows(relabelled, draws)
    against = {(r["method"], r["measure"]): r for r in R.reference_rows(rows, "c64")}
    c32 = against[("c32", "flap_token_ppl@128")]
    assert c32["draws"] == 4 and c32["verdict"] == "better" and c32["lo"] < c32["mean"] < c32["hi"] < 1
    assert c32["mean"] == pytest.approx(math.exp(np.mean([math.log(36 + n) - math.log(40 + n) for n in (0, 2, -2, 1)])))
    variant = against[("c64@v", "flap_token_ppl@128")]
    assert variant["draws"] == 4 and variant["mean"] == pytest.approx(1.2) and variant["verdict"] == "worse"
    c128 = against[("c128", "flap_token_ppl@128")]
    assert c128["verdict"] == "not separated" and c128["lo"] < 1 < c128["hi"]
    assert against[("c32", "mc:acc")]["mean"] == pytest.approx(0.0) and against[("c32", "mc:acc")]["sd"] == 0
    one = R.reference_rows(R.across_draws_rows([r for r in relabelled if r["model"] == "m"], {}), "c64")
    assert all(r["draws"] == 1 and r["needed"] is None and r["verdict"] == "not separated" for r in one)
    assert "one shared draw, no test" in R.reference_markdown(one)


@pytest.mark.parametrize(
    "comparison, needle",
    [
        ({"reference": "c8"}, "comparison.reference: 'c8' is not one of comparison.methods"),
        ({"variants": {"nope": {"of": "smol", "methods": ["c64"]}}}, "comparison.variants.nope: 'nope' is not a key"),
        ({"variants": {"smolp": {"of": "tiny", "methods": ["c64"]}}}, "uses the weights of 'smol', 'tiny' those of"),
        ({"variants": {"smolp": {"of": "smol", "methods": ["c64_zz"]}}}, "comparison.variants.smolp.methods"),
        ({"variants": {"smolp3": {"of": "smol", "methods": ["c64"]}}}, "'smolp3' has 3 draws and 'smol' 1"),
        ({"draws": {"c32": 3}}, "comparison.draws.c32: 'c32' is not one of comparison.methods"),
        (
            {"variants": {"smolw": {"of": "smol", "methods": ["c64"]}}},
            "models.smolw.eval differs from models.smol.eval",
        ),
    ],
)
def test_reference_and_variant_errors_name_the_key(comparison, needle):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["smolp"] = {"base": "smol", "ica": {"solver": "picard"}}
    cfg["models"]["smolp3"] = {"base": "smol", "draws": 3}
    cfg["models"]["smolw"] = {"base": "smol", "eval": {"ppl_max_windows": 8}}
    cfg["comparison"] = {"methods": ["c64", "wanda_sp"], **comparison}
    with pytest.raises(ValueError, match=re.escape(needle)):
        C.validate(cfg)


def test_the_replicate_config_plans_each_method_on_its_draws(tmp_path):
    """config/replicates.yaml's DAG, dry run: the comparison's methods on smolr's 5 draws, the
    ablations (comparison.draws) on the first 3, magnitude once, the Picard-O variant on its 3,
    and each ICA job once per (draw, k) whatever reads it."""
    import subprocess

    from helpers import SNAKEMAKE

    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1", "comparison"]
    cmd += ["--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "replicates.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = set(re.findall(r"results/(smol[rp](?:_d\d)?_r20_[a-z0-9_]+)/metrics\.json", proc.stdout))
    for method in (
        "c64",
        "c64_bias",
        "c64_hybrid",
        "random",
        "wanda_sp",
        "flap",
        "flap_mlp",
        "shortgpt",
        "c64_b1",
        "c64_b2",
    ):
        assert {t for t in planned if t.startswith("smolr") and t.endswith(f"_r20_{method}")} == {
            f"smolr{d}_r20_{method}" for d in ("", "_d1", "_d2", "_d3", "_d4")
        }, method
    for method in ("c32", "c128"):
        assert {t for t in planned if t.endswith(f"_r20_{method}")} == {
            f"smolr{d}_r20_{method}" for d in ("", "_d1", "_d2")
        }
    assert {t for t in planned if t.endswith("_magnitude")} == {"smolr_r20_magnitude"}
    assert {t for t in planned if t.startswith("smolp")} == {f"smolp{d}_r20_c64" for d in ("", "_d1", "_d2")}
    ica = re.findall(r"output: (results/smol[rp](?:_d\d)?/ica/\S+)", proc.stdout)
    assert len(ica) == len(set(ica)) == 4 * (5 + 3 + 3 + 3), len(ica)  # c64 x 5 draws, c32, c128, picard x 3


def test_the_beyond_and_recovery_configs_compare_on_the_replicate_configs_own_draws():
    """config/beyond.yaml and recovery.yaml (recovery_gemma.yaml) reuse config/replicates.yaml's
    (replicates_gemma.yaml's) cached targets only while their model is the same: the same keys, so the same
    draws, calibration and evaluation."""
    import yaml

    for name, source, model in (
        ("beyond", "replicates", "smolr"),
        ("recovery", "replicates", "smolr"),
        ("recovery_gemma", "replicates_gemma", "gemmar"),
    ):
        replicates = yaml.safe_load((REPO / "config" / f"{source}.yaml").read_text())
        other = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
        assert other["models"][model] == replicates["models"][model], name
        assert other["comparison"]["name"] == name.split("_")[0]  # its own tables, not the replicates'
