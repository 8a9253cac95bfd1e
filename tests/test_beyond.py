"""Beyond the paper: method options, selection strategies, rounding, consensus ICA, seed stability."""

import json

import numpy as np
import pytest
import yaml

from fnprune import config as C
from fnprune import paper
from fnprune.ica import canica, canica_runs, consensus_scores
from fnprune.mask import (hybrid_scores, importance_budgets, n_to_drop, round_kept, select_budgets, select_global,
                          standardise_layers)
from fnprune.synthetic import auroc, planted_networks

from conftest import snakemake


def test_method_options_parse_in_order():
    m = C.parse_method("c16_exact_s3_x5_b2_hybrid_imp_m64_bias")
    assert (m["k"], m["backend"], m["seed"], m["runs"], m["batches"], m["hybrid"], m["selection"], m["multiple"],
            m["bias"]) == (16, "exact", 3, 5, 2, True, "imp", 64, True)
    assert m["selector"] == "c16_exact_s3_x5_b2_hybrid_imp_m64" and m["ica_dir"] == "exact_c16_s3_x5"
    assert m["needs_stats"]
    plain = C.parse_method("c16")
    assert (plain["selector"], plain["ica_dir"], plain["selection"], plain["needs_stats"]) == \
        ("c16_torch", "torch_c16", "global", False)
    assert C.parse_method("c16_zglobal")["needs_stats"] is False
    b = C.parse_method("flap_mlp_m128")
    assert (b["kind"], b["baseline"], b["multiple"], b["bias"], b["selector"]) == ("baseline", "flap_mlp", 128, True,
                                                                                  "flap_mlp_m128")
    assert not C.parse_method("random")["needs_stats"]


@pytest.mark.parametrize("method, needle", [("c16_x1", "at least 2"), ("c0", "k must be at least 1"),
                                            ("c16_m0", "_m<multiple> must be"), ("c16_b0", "at least 1"),
                                            ("c16_uniform_hybrid", "expected c<k>"), ("flap_x5", "expected")])
def test_bad_method_options_are_explained(method, needle):
    with pytest.raises(ValueError, match=needle):
        C.parse_method(method)


def test_method_name_round_trips_and_changes():
    for name in ("c16", "c16_nilearn_s2_x3_b4_hybrid_uniform_m64_bias", "c8_zglobal"):
        assert C.method_name(C.ICA_METHOD.fullmatch(name)) == name
    assert paper.variant("c16_x5_imp_bias", k=8, batches=2) == "c8_x5_b2_imp_bias"


def layer_scores(seed=0, layers=6, inter=64):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0 + i, size=inter) for i in range(layers)]


def test_round_kept_gives_multiples_close_to_the_total_and_keeps_the_best():
    s = layer_scores()
    prunable = [False, True, True, True, True, False]
    kept, _ = select_global(s, prunable, 100, 0.3)
    rounded = round_kept(kept, s, prunable, 16)
    counts = [len(k) for k in rounded]
    assert all(c % 16 == 0 for c, p in zip(counts, prunable) if p)
    assert counts[0] == counts[-1] == 64
    assert abs(sum(counts) - sum(len(k) for k in kept)) <= 8 * sum(prunable)
    for layer in range(1, 5):
        best = np.argsort(-s[layer], kind="stable")[: counts[layer]]
        assert set(rounded[layer].tolist()) == set(best.tolist())


def test_importance_budgets_follow_importance_and_sum_to_the_request():
    sizes = [64] * 6
    prunable = [False, True, True, True, True, False]
    drops = importance_budgets([1.0, 1.0, 2.0, 4.0, 4.0, 1.0], sizes, prunable, 90, min_keep=1)
    assert sum(drops) == 90 and drops[0] == drops[-1] == 0
    assert drops[1] > drops[2] > drops[3] == drops[4]
    capped = importance_budgets([1.0, 0.01, 1.0, 1.0, 1.0, 1.0], sizes, prunable, 150, min_keep=4)
    assert sum(capped) == 150 and capped[1] == 60            # capped at size - min_keep, rest spread
    with pytest.raises(ValueError, match="removable"):
        importance_budgets([1.0] * 6, sizes, prunable, 4 * 63 + 1)
    kept = select_budgets(layer_scores(), drops)
    assert [len(k) for k in kept] == [64 - d for d in drops]


def test_standardised_and_hybrid_scores():
    s = layer_scores()
    s[2][5] = np.inf
    z = standardise_layers(s)
    fin = np.isfinite(z[2])
    assert np.isinf(z[2][5]) and abs(z[2][fin].mean()) < 1e-9 and abs(z[1].std() - 1) < 1e-9
    h = hybrid_scores(layer_scores(1), layer_scores(2))
    assert all(abs(x.mean()) < 1e-9 for x in h)
    net, flu = layer_scores(3), layer_scores(4)
    # A neuron top-ranked by both parents is top-ranked by the hybrid.
    net[1][7], flu[1][7] = 1e3, 1e6
    assert int(np.argmax(hybrid_scores(net, flu)[1])) == 7


@pytest.fixture(scope="module")
def planted():
    return planted_networks(n_tokens=800, n_signals=600, n_networks=8, network_size=15, noise=1.5, seed=5,
                            n_background=6)


def test_consensus_recovers_planted_networks_like_a_single_run(planted):
    x, member = planted
    runs = canica_runs(x, 10, "torch", [0, 1, 2, 3])
    assert len(runs) == 4 and all(r.maps.shape == (10, 600) for r in runs)
    scores, info = consensus_scores(runs)
    assert info["clusters"] >= 10 and 1 <= info["recurring"] <= 10 and info["min_runs"] == 2
    single = canica(x, 10, "torch", seed=0)
    assert auroc(scores, member) > 0.85
    assert auroc(scores, member) >= auroc(single.scores, member) - 0.03


def test_consensus_keeps_only_recurring_networks():
    rng = np.random.default_rng(0)

    class Run:
        def __init__(self, maps):
            self.maps = maps

    shared = rng.standard_normal((2, 500))
    runs = [Run(np.vstack([shared + 0.05 * rng.standard_normal((2, 500)), rng.standard_normal((2, 500))]))
            for _ in range(4)]
    scores, info = consensus_scores(runs)
    # The two shared maps recur in all runs; each run's own random maps recur in none.
    assert info["recurring"] == 2
    assert np.corrcoef(scores, np.abs(shared).max(0))[0, 1] > 0.95
    with pytest.raises(ValueError, match="two runs"):
        consensus_scores(runs[:1])


def fake_batches(n_batches=4, layers=4, inter=40, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=(layers, 2 * inter))
    return [base + noise * rng.standard_normal(base.shape) for _ in range(n_batches)]


def toy_mask(layers=4, inter=40, ratio=0.25):
    prunable = [False] + [True] * (layers - 2) + [False]
    return {"prunable": prunable, "n_drop": int(ratio * inter * (layers - 2)), "ratio_requested": ratio,
            "min_keep": 1, "method": "c8_torch"}


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
    assert same["seed_dice_mean"] == 1.0           # an identical "seed" agrees exactly
    assert res["batch_dice_mean"] < 1.0


def test_seeds_figure_and_studies_table(tmp_path):
    scores = []
    for b, s in enumerate(fake_batches(3)):
        np.savez(tmp_path / f"b{b}.npz", scores=s)
        scores.append(str(tmp_path / f"b{b}.npz"))
    (tmp_path / "mask.json").write_text(json.dumps(toy_mask()))
    out = tmp_path / "seeds"
    paper.seeds(str(tmp_path / "mask.json"), scores, scores[1:], [1, 2], "toy", f"{out}.png", f"{out}.pdf",
                f"{out}.json")
    assert (tmp_path / "seeds.png").stat().st_size > 1000
    assert json.loads((tmp_path / "seeds.json").read_text())["accumulation"]["n_batches"] == [1, 2, 3]


def test_grid_studies_and_seeds_are_checked():
    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg.update(yaml.safe_load(open("config/paper.yaml")))
    paper.check_grids(cfg)
    assert paper.figures_of(cfg, "paper")[-1] == "seeds"
    assert [t.method for t in paper.study_targets(cfg, "paper", "consensus") if t.ratio == 20] == ["c16", "c16_x5"]
    assert paper.seeds_ica_dirs(cfg, "paper") == ("torch_c16", ["torch_c16_s1", "torch_c16_s2", "torch_c16_s3"])
    # the config's own seed among the stability seeds is the reference itself: dropped, not an error
    # (it used to refuse `seed: 1` for every target, in or out of the grid)
    cfg["seed"] = 1
    paper.check_grids(cfg)
    assert paper.seeds_ica_dirs(cfg, "paper") == ("torch_c16", ["torch_c16_s2", "torch_c16_s3"])
    cfg["paper"]["grids"]["paper"]["stability_seeds"] = [1]
    assert "seeds" not in paper.figures_of(cfg, "paper")
    cfg["paper"]["grids"]["paper"]["studies"]["bad"] = ["c16_nope"]
    with pytest.raises(ValueError) as e:
        paper.check_grids(cfg)
    assert "paper.grids.paper.studies.bad" in str(e.value)


MICRO_GRID = {"paper": {"grids": {"micro_grid": {
    "models": ["micro"], "ratios": [20], "methods": ["c8"], "ablation_method": "c8", "components": [8],
    "calibration_batches": [1, 2], "focus_ratio": 20, "task_metrics": ["acc", "bits_per_byte"],
    "stability_seeds": [1],
    "studies": {"consensus": ["c8", "c8_x2"], "selection": ["c8_imp"], "hybrid": ["c8_hybrid"],
                "rounding": ["c8_m16", "flap_mlp_m16"]}}}}}


@pytest.mark.slow
def test_micro_grid_report_has_studies_and_seeds(micro_run, tmp_path):
    wd, _ = micro_run
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(MICRO_GRID))
    # --notemp: the workdir is shared and later tests read its (temp) activation shards
    snakemake(wd, "results/paper/micro_grid/report.md", "--notemp", configs=(str(cfg),))
    out = wd / "results" / "paper" / "micro_grid"
    report = (out / "report.md").read_text()
    for needle in ("### consensus", "consensus of 2", "importance budgets", "Hybrid ICA+FLAP", "x16 widths",
                   "seeds.png"):
        assert needle in report, needle
    seeds = json.loads((out / "micro" / "seeds.json").read_text())
    assert seeds["seeds"] == [1] and seeds["accumulation"]["dice_to_final"][-1] == 1.0
    m16 = json.loads((wd / "results" / "micro" / "masks" / "r20_c8_torch_m16.json").read_text())
    assert all(c % 16 == 0 for c in m16["kept_counts"])
    ica = np.load(wd / "results" / "micro" / "ica" / "torch_c8_x2" / "b0.npz")
    assert int(ica["runs"]) == 2 and (ica["recurring"] >= 1).all()


def test_summary_includes_studies_and_domain_tables(tmp_path):
    for name, text in (("main.md", "| a |\n"), ("abl.md", "| b |\n"),
                       ("studies.md", "# Studies beyond the paper\n\n## consensus\n\n| c |\n"),
                       ("tiny_domains.md", "# Cross-domain calibration: tiny\n\n## 20% removed\n\n| d |\n")):
        (tmp_path / name).write_text(text)
    (tmp_path / "tiny_domains.png").write_bytes(b"png")
    out = tmp_path / "grid" / "report.md"
    out.parent.mkdir()
    paper.summary("g", str(tmp_path / "main.md"), str(tmp_path / "abl.md"), [], str(out),
                  studies_md=str(tmp_path / "studies.md"), domains_md=[str(tmp_path / "tiny_domains.md")])
    text = out.read_text()
    assert "## Studies beyond the paper" in text and "### consensus" in text
    assert "## Cross-domain calibration: tiny" in text and "### 20% removed" in text
    assert "![tiny_domains](../tiny_domains.png)" in text
