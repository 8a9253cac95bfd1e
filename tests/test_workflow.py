"""The workflow end to end on the micro configuration: lint, dry run, real run, caching."""

import json
import re

import numpy as np
import pytest

from helpers import snakemake

pytestmark = pytest.mark.slow


def jobs_of(dry_run_stdout: str) -> dict[str, int]:
    table = re.search(r"Job stats:\n(.*?)\n\n", dry_run_stdout, re.S)
    if not table:
        return {}
    rows = [line.split() for line in table.group(1).splitlines()[2:]]
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[0] != "total"}


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dry_run_lists_every_stage(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/micro_r20_c8_bias/metrics.json")
    jobs = jobs_of(proc.stdout)
    for rule in (
        "corpus",
        "train_model",
        "calibration_batches",
        "extract",
        "ica",
        "mask_ica",
        "prune",
        "perplexity",
        "lm_eval",
        "lm_eval_tasks",
        "metrics",
    ):
        assert rule in jobs, (rule, proc.stdout[-3000:])
    assert jobs["extract"] == 2 and jobs["ica"] == 2


def test_micro_run_metrics(micro_run):
    wd, _ = micro_run
    dense = json.loads((wd / "results/micro_dense/metrics.json").read_text())
    ica = json.loads((wd / "results/micro_r20_c8/metrics.json").read_text())
    bias = json.loads((wd / "results/micro_r20_c8_bias/metrics.json").read_text())
    assert ica["neuron_params"] == 3 * 48
    assert abs(ica["achieved_block_ratio"] - 0.2) <= ica["neuron_params"] / ica["block_params"]
    assert ica["kept_neurons_per_layer"][0] == 96 and ica["kept_neurons_per_layer"][-1] == 96
    assert ica["threshold"] > 0 and ica["k"] == 8
    assert bias["kept_neurons_per_layer"] == ica["kept_neurons_per_layer"]
    assert bias["bias_compensation"] and not ica["bias_compensation"]
    for m in (dense, ica, bias):
        ppl = m["perplexity"]["flap_token_ppl@64"]
        assert np.isfinite(ppl) and ppl > 1
        assert set(m["lm_eval"]) == {"fnprune_mc", "fnprune_ppl"}
        assert all(np.isfinite(v["value"]) for t in m["lm_eval"].values() for v in t.values() if v["value"] is not None)
        assert {"perplexity", "lm_eval"} <= set(m["stage_wall_s"])
    assert {"extract", "ica", "mask", "prune", "train_model"} <= set(ica["stage_wall_s"])
    assert dense["perplexity"]["flap_token_ppl@64"] != ica["perplexity"]["flap_token_ppl@64"]
    side = json.loads((wd / "results/micro_r20_c8/model/fnprune.json").read_text())
    assert side["method"] == "c8_torch" and len(side["kept"]) == 4 and "versions" in side


def test_changing_the_ratio_reuses_extraction_and_ica(micro_run):
    wd, _ = micro_run
    proc = snakemake(wd, "-n", "results/micro_r30_c8/metrics.json")
    jobs = jobs_of(proc.stdout)
    assert "extract" not in jobs and "ica" not in jobs and "train_model" not in jobs, jobs
    assert jobs.get("mask_ica") == 1 and jobs.get("prune") == 1


def test_rerun_does_nothing(micro_run):
    wd, _ = micro_run
    proc = snakemake(wd, "-n", "results/micro_r20_c8/metrics.json", "results/micro_dense/metrics.json")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_loaded_pruned_model_has_per_layer_sizes(micro_run):
    from fnprune import load_pruned

    wd, _ = micro_run
    model = load_pruned(wd / "results/micro_r20_c8/model", device="cpu")
    sizes = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    metrics = json.loads((wd / "results/micro_r20_c8/metrics.json").read_text())
    assert sizes == metrics["kept_neurons_per_layer"]


def test_ica_backends_agree_as_well_as_seeds(micro_run):
    """torch vs nilearn CanICA on the micro model's real activations: the kept sets at 20%
    agree across backends as well as one backend agrees with itself across seeds (METHOD.md 4)."""
    from fnprune.mask import dice, n_to_drop, neuron_scores, prunable_layers, select_global
    from fnprune.shards import ica_batch

    wd, _ = micro_run
    n_layers, prunable = 4, prunable_layers(4, 1, 1)

    def kept(backend, seed):
        # the workflow's own per-batch runner (its seed scheme), then the union over both batches
        per_batch = [
            neuron_scores(
                ica_batch(
                    [wd / f"results/micro/acts/b{b}/L{layer}.npy" for layer in range(n_layers)], 8, backend, seed
                )["scores"]
            )
            for b in (0, 1)
        ]
        scores = list(np.max(per_batch, axis=0))
        n_drop = n_to_drop(0.2, sum(len(s) for s, p in zip(scores, prunable) if p), 1)
        keep, _ = select_global(scores, prunable, n_drop, 0.2)
        return np.concatenate([np.isin(np.arange(len(s)), k) for s, k, p in zip(scores, keep, prunable) if p])

    masks = {(b, s): kept(b, s) for b in ("torch", "nilearn") for s in (0, 1, 2)}
    pairs = ((0, 1), (0, 2), (1, 2))
    seed_level = np.mean([dice(masks[("torch", a)], masks[("torch", b)]) for a, b in pairs])
    cross = np.mean([dice(masks[("torch", a)], masks[("nilearn", b)]) for a in range(3) for b in range(3)])
    assert cross >= seed_level - 0.03, (cross, seed_level)


def test_domains_on_micro_reuse_the_base_weights(micro_run):
    """Cross-domain calibration on micro (config/micro.yaml, domains): the alias micro_langref is
    micro's weights calibrated on the language reference, never trained; every (calibration
    source, evaluation domain) cell of the table is a finite perplexity."""
    import csv

    from fnprune.corpus import read_split

    wd, _ = micro_run
    jobs = jobs_of(snakemake(wd, "-n", "domains").stdout)
    assert "train_model" not in jobs, jobs
    assert jobs["calibration_batches"] == 1 and jobs["extract"] == 2 and jobs["perplexity_domain"] == 6, jobs
    snakemake(wd, "domains", "--notemp")
    assert not (wd / "results/models/micro_langref").exists()
    batches = json.loads((wd / "results/micro_langref/calib/batches.json").read_text())
    langref = set(read_split(wd / "results/data/langref/calib.jsonl"))
    assert batches["corpus"] == "langref" and all(t in langref for b in batches["batches"] for t in b)
    side = json.loads((wd / "results/micro_langref_r20_c8/model/fnprune.json").read_text())
    assert side["source_model"] == "results/models/micro"
    rows = list(csv.DictReader(open(wd / "results/domains/micro_domains.csv")))
    cells = {(r["source"], r["eval_corpus"]): float(r["ppl"]) for r in rows}
    assert set(cells) == {(s, c) for s in ("micro (dense)", "micro", "micro_langref") for c in ("langref", "libdocs")}
    assert all(np.isfinite(v) and v > 1 for v in cells.values()), cells
    rec = json.loads((wd / "results/micro_langref_r20_c8/ppl-libdocs.json").read_text())
    assert (rec["weights"], rec["calibration_corpus"], rec["corpus"]) == ("micro", "langref", "libdocs")
    (overlap,) = csv.DictReader(open(wd / "results/domains/micro_domains_overlap.csv"))
    assert (overlap["source_a"], overlap["source_b"]) == ("micro", "micro_langref") and 0 < float(overlap["dice"]) <= 1
    assert "micro_langref" in (wd / "results/domains/micro_domains.md").read_text()
    assert (wd / "results/domains/micro_domains.png").stat().st_size > 0
    assert "Nothing to be done" in snakemake(wd, "-n", "domains").stdout


def test_dense_embedded_model_beats_chance_on_its_multiple_choice_task(tmp_path):
    """The toy model `tiny` (trained by the workflow on the embedded corpus, about 4 minutes on 2
    free cores; the longest test) picks true continuations far above chance (4 choices: 0.25)
    once the continuation's own likelihood is discounted (lm-eval's acc_mutual_info)."""
    import subprocess

    from helpers import REPO, SNAKEMAKE

    proc = subprocess.run(
        [
            SNAKEMAKE,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "--cores",
            "2",
            "results/tiny_dense/metrics.json",
            "--configfile",
            str(REPO / "config" / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "results/tiny_dense/metrics.json").read_text())
    mc = m["lm_eval"]["fnprune_mc"]["acc_mutual_info"]
    assert mc["value"] - 0.25 > 4 * mc["stderr"], mc
    assert m["base_model"]["validation_ppl"] < 400
    assert np.isfinite(m["perplexity"]["flap_token_ppl@128"])


def test_a_bfloat16_alias_runs_every_forward_pass_in_bfloat16(micro_run, tmp_path):
    """micro's weights under ``dtype: bfloat16`` (an alias, never trained again): the shard pass,
    perplexity and lm-eval run in bfloat16 and say so in metrics.json, next to the CPU they ran on;
    the scores stay finite and near the float32 run's (logits are scored in float32)."""
    import yaml

    wd, _ = micro_run
    overlay = tmp_path / "bf16.yaml"
    overlay.write_text(yaml.safe_dump({"models": {"micro_bf16": {"base": "micro", "dtype": "bfloat16"}}}))
    snakemake(
        wd, "results/micro_bf16_r20_c8/metrics.json", "results/micro_bf16_dense/metrics.json", configs=(str(overlay),)
    )
    assert not (wd / "results/models/micro_bf16").exists()
    for target, f32 in (("micro_bf16_dense", "micro_dense"), ("micro_bf16_r20_c8", "micro_r20_c8")):
        m = json.loads((wd / f"results/{target}/metrics.json").read_text())
        ref = json.loads((wd / f"results/{f32}/metrics.json").read_text())
        for stage in ("perplexity", "lm_eval"):
            k = m["kernels"][stage]
            assert k["dtype"] == "bfloat16" and k["device"] == "cpu", (stage, k)
            assert {"cpu", "cpu_flags", "cpu_native", "cpu_capability"} <= set(k)
            assert ("matmul_slowdown_vs_float32" in k) == (not k["cpu_native"])
        assert ref["kernels"]["perplexity"]["dtype"] == "float32"
        ppl, ppl_ref = m["perplexity"]["flap_token_ppl@64"], ref["perplexity"]["flap_token_ppl@64"]
        assert np.isfinite(ppl) and abs(np.log(ppl / ppl_ref)) < 0.1, (ppl, ppl_ref)
    ica = json.loads((wd / "results/micro_bf16_r20_c8/metrics.json").read_text())["ica"]
    assert ica["extract_dtype"] == "bfloat16"
    side = json.loads((wd / "results/micro_bf16_r20_c8/model/fnprune.json").read_text())
    weights = wd / "results/micro_bf16_r20_c8/model/model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:  # pruning reads and writes the weights as stored
        assert all(f.get_slice(n).get_dtype() == "F32" for n in f.keys())
    assert side["method"] == "c8_torch"


def test_an_alias_with_its_own_ica_solver_joins_the_comparison_as_a_variant(micro_run, tmp_path):
    """``models.<m>.ica`` overrides the ica section for one model: micro's weights decomposed by
    Picard-O join micro's comparison as ``c8@micro_picard`` (comparison.variants); micro's own
    FastICA jobs are not re-run."""
    import yaml

    wd, _ = micro_run
    overlay = tmp_path / "picard.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "models": {"micro_picard": {"base": "micro", "ica": {"solver": "picard"}}},
                "comparison": {
                    "models": ["micro"],
                    "ratios": [20],
                    "methods": ["c8"],
                    "variants": {"micro_picard": {"of": "micro", "methods": ["c8"]}},
                },
            }
        )
    )
    jobs = jobs_of(snakemake(wd, "-n", "results/micro_comparison.md", configs=(str(overlay),)).stdout)
    assert jobs.get("ica") == 2 and jobs.get("extract") == 2, jobs  # micro_picard's two batches, none of micro's
    snakemake(wd, "results/micro_comparison.md", "--notemp", configs=(str(overlay),))
    ica = json.loads((wd / "results/micro_picard_r20_c8/metrics.json").read_text())["ica"]
    assert ica["solver"] == "picard"
    assert json.loads((wd / "results/micro_r20_c8/metrics.json").read_text())["ica"]["solver"] == "fastica"
    assert "c8@micro_picard" in (wd / "results/micro_comparison.md").read_text()


def test_functional_network_variants_reuse_the_ica_and_keep_wanda_sps_budgets(micro_run):
    """c8_core25_uniform and c8_hwanda_uniform on micro: masks of rule mask_fnv from micro's cached
    ICA scores and stats (no extraction or ICA job), Wanda-sp's per-layer counts, and for the core
    variant each layer's quarter of highest network score kept."""
    from fnprune.mask import union_neuron_scores

    wd, _ = micro_run
    targets = [f"results/micro_r20_{m}/metrics.json" for m in ("c8_core25_uniform", "c8_hwanda_uniform", "wanda_sp")]
    jobs = jobs_of(snakemake(wd, "-n", *targets).stdout)
    assert jobs.get("mask_fnv") == 2 and not {"extract", "ica", "mask_ica"} & set(jobs), jobs
    snakemake(wd, *targets, "--notemp")
    masks = {
        m: json.loads((wd / f"results/micro/masks/r20_{m}.json").read_text())
        for m in ("c8_torch_core25_uniform", "c8_torch_hwanda_uniform", "wanda_sp")
    }
    counts = {m: rec["kept_counts"] for m, rec in masks.items()}
    assert counts["c8_torch_core25_uniform"] == counts["c8_torch_hwanda_uniform"] == counts["wanda_sp"], counts
    assert masks["c8_torch_core25_uniform"]["within"] == "core" and masks["c8_torch_core25_uniform"]["core_pct"] == 25
    network, _ = union_neuron_scores(sorted((wd / "results/micro/ica/torch_c8").glob("b*.npz")))
    for layer, kept in enumerate(masks["c8_torch_core25_uniform"]["kept"]):
        core = np.argsort(-network[layer], kind="stable")[: round(0.25 * len(network[layer]))]
        assert set(core.tolist()) <= set(kept), layer
    assert masks["c8_torch_core25_uniform"]["kept"] != masks["wanda_sp"]["kept"]
    for m in ("c8_core25_uniform", "c8_hwanda_uniform"):
        assert json.loads((wd / f"results/micro_r20_{m}/metrics.json").read_text())["perplexity"]
