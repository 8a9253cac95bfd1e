"""The paper's tables, grids and figures, built from hand-written metrics and mask fixtures."""

import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fnprune import paper, tables
from fnprune.paper import Target
from helpers import REPO, mask_for, snakemake

FIX = Path(__file__).parent / "fixtures" / "metrics"
MAIN = [
    "toy_dense",
    "toy_r20_c16",
    "toy_r20_c16_bias",
    "toy_r20_random",
    "toy_r20_flap",
    "toy_r30_c16",
    "toy_r30_c16_bias",
    "toy_r30_random",
    "toy_r30_flap",
]
COMPONENTS = ["toy_dense", "toy_r20_c8", "toy_r20_c16", "toy_r20_c32", "toy_r30_c8", "toy_r30_c16", "toy_r30_c32"]
CALIBRATION = [
    "toy_dense",
    "toy_r20_c16_b1",
    "toy_r20_c16_b2",
    "toy_r20_c16",
    "toy_r30_c16_b1",
    "toy_r30_c16_b2",
    "toy_r30_c16",
]
MASKS = [FIX / "toy" / "masks" / f"r20_{s}.json" for s in ("c16_torch", "random", "flap")]


def files(targets):
    return [str(FIX / t / "metrics.json") for t in targets]


def records(targets):
    return [json.loads(Path(f).read_text()) for f in files(targets)]


@pytest.fixture
def main():
    return tables.main_table(records(MAIN), ["acc", "bits_per_byte"])


def md_rows(md):
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[2:]]


def test_main_csv_rows_in_grid_order_with_raw_values(main):
    rows = list(csv.DictReader(io.StringIO(main["csv"])))
    assert [(r["ratio_requested"], r["method"]) for r in rows] == [
        ("0.0", "dense"),
        ("0.2", "c16"),
        ("0.2", "c16_bias"),
        ("0.2", "random"),
        ("0.2", "flap"),
        ("0.3", "c16"),
        ("0.3", "c16_bias"),
        ("0.3", "random"),
        ("0.3", "flap"),
    ]
    assert list(rows[0])[4:] == ["ppl:flap_token_ppl@64", "fnprune_mc:acc", "fnprune_ppl:bits_per_byte", "mean_acc"]
    assert float(rows[1]["ppl:flap_token_ppl@64"]) == 24.0 and float(rows[4]["fnprune_mc:acc"]) == 0.47
    assert float(rows[2]["achieved_block_ratio"]) == pytest.approx(0.2)


def test_main_markdown_bolds_the_best_pruned_value_per_block(main):
    rows = md_rows(main["md"])
    by = {(r[1], r[2]): r[4:] for r in rows}
    assert by[("-", "Dense")] == ["20.00", "50.00", "2.000", "50.00"]
    assert by[("20%", "ICA k=16 +bias")][0] == "**23.00**" and by[("20%", "ICA k=16 +bias")][2] == "**2.100**"
    assert by[("20%", "FLAP")][1] == "**47.00**" and by[("20%", "FLAP")][3] == "**47.00**"
    assert by[("30%", "FLAP")][1:] == ["**45.00**", "**2.300**", "**45.00**"]
    assert by[("30%", "Random")] == ["60.00", "35.00", "3.300", "35.00"]
    assert sum(c.startswith("**") for r in rows for c in r) == 8
    assert "PPL@64 ↓" in main["md"] and "fnprune_mc acc ↑" in main["md"]


def test_main_latex_is_booktabs_with_bold_best(main):
    tex = main["tex"]
    assert tex.startswith(r"\begin{tabular}{lrlrrrrr}") and tex.rstrip().endswith(r"\end{tabular}")
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1 and tex.count(r"\midrule") == 3
    assert r"fnprune\_mc acc $\uparrow$" in tex and r"PPL@64 $\downarrow$" in tex
    line = next(x for x in tex.splitlines() if "ICA k=16 +bias" in x and r"20\%" not in x and "23" in x)
    assert line.split(" & ")[4] == r"\textbf{23.00}"
    assert tex.count(r"\textbf{") == 8


def test_task_metric_preference_and_direction():
    recs = records(MAIN)
    cols = {c.key: c for c in tables.metric_columns(recs, ["acc_norm", "word_perplexity"])}
    assert set(cols) == {"ppl:flap_token_ppl@64", "fnprune_mc:acc_norm", "fnprune_ppl:word_perplexity", "mean_acc"}
    assert cols["fnprune_ppl:word_perplexity"].lower_better and not cols["fnprune_mc:acc_norm"].lower_better
    fallback = {c.key for c in tables.metric_columns(recs, ["f1"])}
    assert {"fnprune_mc:acc", "fnprune_ppl:word_perplexity"} <= fallback


def test_ablation_table_orders_by_ratio_k_and_texts():
    t = tables.ablation_table(records(list(dict.fromkeys(COMPONENTS + CALIBRATION))), ["acc"])
    rows = list(csv.DictReader(io.StringIO(t["csv"])))
    r20 = [(r["k"], r["calibration_texts"]) for r in rows if r["ratio_requested"] == "0.2"]
    assert r20 == [("8", "32"), ("16", "8"), ("16", "16"), ("16", "32"), ("32", "32")]
    c32 = next(r for r in rows if r["method"] == "c32" and r["ratio_requested"] == "0.2")
    assert float(c32["nonconverged_fraction"]) == 0.25 and float(c32["threshold"]) == 3.6
    assert md_rows(t["md"])[0][2] == "Dense"


def test_method_labels():
    assert tables.method_label("c16_nilearn_b2_bias") == "ICA k=16 (nilearn), 2 batches +bias"
    assert tables.method_label("c16_b1") == "ICA k=16, 1 batch"
    assert tables.method_label("wanda_sp") == "Wanda-sp"


@pytest.fixture
def config():
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg.update(yaml.safe_load(Path("config/paper.yaml").read_text()))
    return cfg


def test_shipped_grids_pass_the_checks(config):
    paper.check_grids(config)
    full = paper.main_targets(config, "paper_full") + paper.ablation_targets(config, "paper_full")
    # ChatGLM3 (fused query_key_value) is excluded from FLAP's head pruning at the three ratios.
    assert len(set(full)) == 3 * (1 + 3 * 7 + 3 * 2 + 3 * 3) - 3
    assert Target("chatglm3_6b", 20, "flap") not in full and Target("chatglm3_6b", 20, "flap_mlp") in full
    assert Target("vicuna7b", 20, "c128_b38") in full and Target("vicuna7b", 20, "c128_b80") not in full


def test_calibration_ablation_can_keep_to_some_ratios(config):
    cfg = copy.deepcopy(config)
    cfg["paper"]["grids"]["paper_tiny"]["calibration_ratios"] = [30, 20]
    cal = paper.calibration_targets(cfg, "paper_tiny", "tiny")
    assert [(t.ratio, t.method) for t in cal[1:]] == [(r, m) for r in (20, 30) for m in ("c16_b1", "c16_b2", "c16")]
    # The components ablation keeps every ratio; the smol grid varies calibration at 20% only.
    assert {t.ratio for t in paper.component_targets(cfg, "paper_tiny", "tiny")[1:]} == {10, 20, 30}
    smol = paper.calibration_targets(config, "paper", "smol_paper")[1:]
    assert {t.ratio for t in smol} == {20} and len(smol) == 5


def test_a_grid_of_an_alias_reports_its_base_models_domains_table(config):
    from fnprune import domains

    assert domains.bases_of(config, config["paper"]["grids"]["paper"]["models"]) == ["smol"]
    assert domains.bases_of(config, ["tiny"]) == []  # no domains source shares tiny's weights here


def test_head_pruning_on_fused_qkv_must_be_excluded(config):
    cfg = copy.deepcopy(config)
    cfg["paper"]["grids"]["paper_full"]["exclude"] = {}
    with pytest.raises(
        ValueError, match="paper.grids.paper_full.methods: flap prunes attention heads, which model chatglm3_6b"
    ):
        paper.check_grids(cfg)


def test_embedded_grid_expansion(config):
    cal = paper.calibration_targets(config, "paper_tiny", "tiny")
    assert cal[0] == Target("tiny", None, "dense")
    assert [t.method for t in cal if t.ratio == 20] == ["c16_b1", "c16_b2", "c16"]
    assert [t.method for t in paper.component_targets(config, "paper_tiny", "tiny") if t.ratio == 10] == [
        "c8",
        "c16",
        "c32",
    ]
    assert len(paper.threshold_targets(config, "paper_tiny", "tiny")) == 3 * 5
    masks = paper.overlap_masks(config, "paper_tiny", "tiny")
    assert [t.method for t in masks] == ["c16", "random", "magnitude", "wanda_sp", "flap", "flap_mlp"]
    assert paper.stability_target(config, "paper_tiny", "tiny") == (Target("tiny", 20, "c16"), 16, "torch")
    assert paper.variant("c16_nilearn_bias", k=8, batches=2) == "c8_nilearn_b2_bias"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("models", ["nope"], "paper.grids.paper_tiny.models"),
        ("methods", ["c16_bogus"], "paper.grids.paper_tiny.methods"),
        ("ablation_method", "c16_b2", "paper.grids.paper_tiny.ablation_method"),
        ("focus_ratio", 25, "paper.grids.paper_tiny.focus_ratio"),
        ("calibration_batches", [1, 5], "paper.grids.paper_tiny.calibration_batches"),
        ("calibration_ratios", [20, 25], "paper.grids.paper_tiny.calibration_ratios: 25 is not one of ratios"),
    ],
)
def test_grid_errors_name_the_key(config, key, value, needle):
    cfg = copy.deepcopy(config)
    cfg["paper"]["grids"]["paper_tiny"][key] = value
    with pytest.raises(ValueError, match=needle):
        paper.check_grids(cfg)


def test_overlap_and_keep_counts():
    masks = [json.loads(p.read_text()) for p in MASKS]
    pairs, layers, values = paper.overlap_by_layer(masks)
    assert layers == [1, 2] and pairs[1] == ("c16_torch", "flap")
    assert values[1].tolist() == pytest.approx([0.8, 5 / 6])
    scores = [np.array([[1.0, 4.0, 3.2, 0.2]]), np.array([[3.5, 0.1, 0.2, 0.1]])]
    assert paper.batch_keep_counts(scores, 3.0).tolist() == [[2, 1]]


def assert_figure(png: Path, pdf: Path):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


@pytest.mark.parametrize(
    "figure, targets",
    [
        ("components", COMPONENTS),
        ("calibration", CALIBRATION),
        ("threshold", sorted(set(COMPONENTS + CALIBRATION) - {"toy_dense"})),
        ("kept_per_layer", MAIN[:5]),
    ],
)
def test_metric_figures_render(tmp_path, figure, targets):
    png, pdf = tmp_path / f"{figure}.png", tmp_path / f"{figure}.pdf"
    paper.metrics_figure(figure, files(targets), str(png), str(pdf), "c16")
    assert_figure(png, pdf)


def test_mask_figures_render(tmp_path):
    paper.overlap([str(p) for p in MASKS], "toy", str(tmp_path / "o.png"), str(tmp_path / "o.pdf"))
    assert_figure(tmp_path / "o.png", tmp_path / "o.pdf")
    rng = np.random.default_rng(0)
    scores = []
    for b in range(4):
        scores.append(tmp_path / f"b{b}.npz")
        np.savez(scores[-1], scores=rng.gamma(4.0, 0.8, size=(4, 16)))
    paper.stability(str(MASKS[0]), [str(s) for s in scores], "toy", str(tmp_path / "s.png"), str(tmp_path / "s.pdf"))
    assert_figure(tmp_path / "s.png", tmp_path / "s.pdf")


def test_summary_links_tables_and_figures(tmp_path):
    out = {f"{t}_{f}": str(tmp_path / f"{t}_table.{f}") for t in ("main", "ablation") for f in ("csv", "md", "tex")}
    del out["ablation_tex"]
    paper.tables(files(MAIN), files(COMPONENTS), ["acc"], out)
    figures = [tmp_path / "toy" / f"{f.name}.png" for f in paper.FIGURES]
    paper.summary(
        "toy_grid", out["main_md"], out["ablation_md"], [str(f) for f in figures], str(tmp_path / "report.md")
    )
    text = (tmp_path / "report.md").read_text()
    assert "grid `toy_grid`" in text and "**23.00**" in text and "![overlap](toy/overlap.png)" in text
    assert all(f"### {f.title}" in text for f in paper.FIGURES)
    assert Path(out["main_tex"]).read_text().startswith(r"\begin{tabular}")


def test_ties_at_display_precision_are_all_bold():
    recs = records(MAIN[:3])
    recs[1]["lm_eval"]["fnprune_ppl"]["bits_per_byte"]["value"] = 2.1004
    recs[2]["lm_eval"]["fnprune_ppl"]["bits_per_byte"]["value"] = 2.1001
    rows = md_rows(tables.main_table(recs, ["acc", "bits_per_byte"])["md"])
    assert [r[6] for r in rows] == ["2.000", "**2.100**", "**2.100**"]


def fake_batches(n_batches=4, layers=4, inter=40, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=(layers, 2 * inter))
    return [base + noise * rng.standard_normal(base.shape) for _ in range(n_batches)]


def toy_mask(layers=4, inter=40, ratio=0.25):
    prunable = [False] + [True] * (layers - 2) + [False]
    return mask_for(
        [range(inter)] * layers, [inter] * layers, prunable, "c8_torch", ratio, n_drop=int(ratio * inter * (layers - 2))
    )


def test_seed_stability_measures():
    batches = fake_batches()
    mask = toy_mask()
    res = paper.seed_stability(mask, batches, [batches[0], batches[0] + 0.3], [1, 2])
    acc = res["accumulation"]
    assert acc["n_batches"] == [1, 2, 4] and acc["dice_to_final"][-1] == 1.0
    assert 0.5 < res["keep_fraction"] < 1
    assert len(res["seed_dice_per_layer"]) == len(res["layers"]) == 2
    assert all(0 <= d <= 1 for d in res["seed_dice_per_layer"] + res["batch_dice_per_layer"])
    same = paper.seed_stability(mask, batches, [batches[0]], [1])
    assert same["seed_dice_mean"] == 1.0  # an identical "seed" agrees exactly
    assert res["batch_dice_mean"] < 1.0


def test_seeds_figure_and_studies_table(tmp_path):
    scores = []
    for b, s in enumerate(fake_batches(3)):
        np.savez(tmp_path / f"b{b}.npz", scores=s)
        scores.append(str(tmp_path / f"b{b}.npz"))
    (tmp_path / "mask.json").write_text(json.dumps(toy_mask()))
    out = tmp_path / "seeds"
    paper.seeds(
        str(tmp_path / "mask.json"), scores, scores[1:], [1, 2], "toy", f"{out}.png", f"{out}.pdf", f"{out}.json"
    )
    assert (tmp_path / "seeds.png").stat().st_size > 1000
    assert json.loads((tmp_path / "seeds.json").read_text())["accumulation"]["n_batches"] == [1, 2, 3]


def test_grid_studies_and_seeds_are_checked():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    paper.check_grids(cfg)
    assert paper.figures_of(cfg, "paper_tiny")[-1] == "seeds"
    assert [t.method for t in paper.study_targets(cfg, "paper_tiny", "consensus") if t.ratio == 20] == ["c16", "c16_x5"]
    assert paper.seeds_ica_dirs(cfg, "paper_tiny") == ("torch_c16", ["torch_c16_s1", "torch_c16_s2", "torch_c16_s3"])
    # the config's own seed among the stability seeds is the reference itself: dropped, not an error
    # (it used to refuse `seed: 1` for every target, in or out of the grid)
    cfg["seed"] = 1
    paper.check_grids(cfg)
    assert paper.seeds_ica_dirs(cfg, "paper_tiny") == ("torch_c16", ["torch_c16_s2", "torch_c16_s3"])
    cfg["paper"]["grids"]["paper_tiny"]["stability_seeds"] = [1]
    assert "seeds" not in paper.figures_of(cfg, "paper_tiny")
    cfg["paper"]["grids"]["paper_tiny"]["studies"]["bad"] = ["c16_nope"]
    with pytest.raises(ValueError) as e:
        paper.check_grids(cfg)
    assert "paper.grids.paper_tiny.studies.bad" in str(e.value)


MICRO_GRID = {
    "paper": {
        "grids": {
            "micro_grid": {
                "models": ["micro"],
                "ratios": [20],
                "methods": ["c8"],
                "ablation_method": "c8",
                "components": [8],
                "calibration_batches": [1, 2],
                "focus_ratio": 20,
                "task_metrics": ["acc", "bits_per_byte"],
                "stability_seeds": [1],
                "studies": {
                    "consensus": ["c8", "c8_x2"],
                    "selection": ["c8_imp"],
                    "hybrid": ["c8_hybrid"],
                    "rounding": ["c8_m16", "flap_mlp_m16"],
                },
            }
        }
    }
}


@pytest.mark.slow
def test_micro_grid_report_has_studies_and_seeds(micro_run, tmp_path):
    wd, _ = micro_run
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(MICRO_GRID))
    # --notemp: the workdir is shared and later tests read its (temp) activation shards
    snakemake(wd, "results/paper/micro_grid/report.md", "--notemp", configs=(str(cfg),))
    out = wd / "results" / "paper" / "micro_grid"
    report = (out / "report.md").read_text()
    for needle in (
        "### consensus",
        "consensus of 2",
        "importance budgets",
        "Hybrid ICA+FLAP",
        "x16 widths",
        "seeds.png",
    ):
        assert needle in report, needle
    seeds = json.loads((out / "micro" / "seeds.json").read_text())
    assert seeds["seeds"] == [1] and seeds["accumulation"]["dice_to_final"][-1] == 1.0
    m16 = json.loads((wd / "results" / "micro" / "masks" / "r20_c8_torch_m16.json").read_text())
    assert all(c % 16 == 0 for c in m16["kept_counts"])
    ica = np.load(wd / "results" / "micro" / "ica" / "torch_c8_x2" / "b0.npz")
    assert int(ica["runs"]) == 2 and (ica["recurring"] >= 1).all()


def test_summary_includes_studies_and_domain_tables(tmp_path):
    for name, text in (
        ("main.md", "| a |\n"),
        ("abl.md", "| b |\n"),
        ("studies.md", "# Studies beyond the paper\n\n## consensus\n\n| c |\n"),
        ("tiny_domains.md", "# Cross-domain calibration: tiny\n\n## 20% removed\n\n| d |\n"),
    ):
        (tmp_path / name).write_text(text)
    (tmp_path / "tiny_domains.png").write_bytes(b"png")
    out = tmp_path / "grid" / "report.md"
    out.parent.mkdir()
    paper.summary(
        "g",
        str(tmp_path / "main.md"),
        str(tmp_path / "abl.md"),
        [],
        str(out),
        studies_md=str(tmp_path / "studies.md"),
        domains_md=[str(tmp_path / "tiny_domains.md")],
    )
    text = out.read_text()
    assert "## Studies beyond the paper" in text and "### consensus" in text
    assert "## Cross-domain calibration: tiny" in text and "### 20% removed" in text
    assert "![tiny_domains](../tiny_domains.png)" in text
