"""Cache keys: after the micro run, a change of one config key schedules exactly the rules whose
output that key decides (a dry run on the shared micro workdir, nothing is executed)."""

import shutil
from pathlib import Path

import pytest
import yaml

import fnprune
from fnprune.precision import resolve_dtype
from helpers import snakemake
from test_workflow import jobs_of

pytestmark = pytest.mark.slow

TARGETS = ("results/micro_dense/metrics.json", "results/micro_r20_c8/metrics.json")
PRUNED_EVAL = {"perplexity": 1, "lm_eval": 1, "metrics": 1}
EVAL_BOTH = {"lm_eval": 2, "metrics": 2}
FROM_EXTRACT = {"extract": 2, "ica": 2, "mask_ica": 1, "prune": 1, **PRUNED_EVAL}
FROM_MASK = {"mask_ica": 1, "prune": 1, **PRUNED_EVAL}
# Every forward pass runs in the dtype; the mask and the pruning re-run only because the scores do.
FROM_DTYPE = {"extract": 2, "ica": 2, "mask_ica": 1, "prune": 1, "perplexity": 2, "lm_eval": 2, "metrics": 2}


def micro(**keys) -> dict:
    return {"models": {"micro": keys}}


# (name, config overlay, the rules (and job counts) a dry run of TARGETS must schedule)
CASES = [
    ("eval.lm_eval_limit", micro(eval={"lm_eval_limit": 17}), EVAL_BOTH),
    ("eval.lm_eval_batch_size", micro(eval={"lm_eval_batch_size": 4}), EVAL_BOTH),
    ("eval.lm_eval_max_length", micro(eval={"lm_eval_max_length": 64}), EVAL_BOTH),
    ("eval.lm_eval_tasks", micro(eval={"lm_eval_tasks": ["fnprune_mc"]}), EVAL_BOTH),
    ("eval.num_fewshot", micro(eval={"num_fewshot": 1}), EVAL_BOTH),
    ("eval.ppl_seqlens", micro(eval={"ppl_seqlens": [32]}), {"perplexity": 2, "metrics": 2}),
    ("eval.ppl_batch_size", micro(eval={"ppl_batch_size": 3}), {"perplexity": 2, "metrics": 2}),
    ("eval.ppl_max_windows", micro(eval={"ppl_max_windows": 4}), {"perplexity": 2, "metrics": 2}),
    (
        "corpora.*.mc_task (the embedded tasks' items)",
        {"corpora": {"stdlib": {"mc_task": {"n_items": 30}}}},
        {"lm_eval_tasks": 1, **EVAL_BOTH},
    ),
    ("gpus", micro(gpus=1), {}),
    # the lora section is a param of the lora rule only; comparison.lora only adds targets
    ("lora.lr", {"lora": {"lr": 0.001}}, {}),
    ("comparison.lora", {"comparison": {"lora": True}}, {}),
    ("dtype", micro(dtype="bfloat16"), FROM_DTYPE),
    # auto is what this machine multiplies fast: float32 (micro's own) unless the CPU has native bfloat16
    ("dtype auto", micro(dtype="auto"), FROM_DTYPE if resolve_dtype("auto") == "bfloat16" else {}),
    ("calibration.max_length", micro(calibration={"max_length": 64}), FROM_EXTRACT),
    ("calibration.micro_batch_size", micro(calibration={"micro_batch_size": 2}), FROM_EXTRACT),
    ("calibration.batch_size", micro(calibration={"batch_size": 3}), {"calibration_batches": 1, **FROM_EXTRACT}),
    ("calibration.seed", micro(calibration={"seed": 5}), {"calibration_batches": 1, **FROM_EXTRACT}),
    ("protect_first", micro(protect_first=2), FROM_MASK),
    ("min_keep_per_layer", micro(min_keep_per_layer=2), FROM_MASK),
    ("ica.max_iter", {"ica": {"max_iter": 100}}, {"ica": 2, **FROM_MASK}),
    ("ica.tol", {"ica": {"tol": 0.001}}, {"ica": 2, **FROM_MASK}),
    ("ica.solver", {"ica": {"solver": "picard"}}, {"ica": 2, **FROM_MASK}),
    ("ica.backend (c8 means another backend)", {"ica": {"backend": "exact"}}, {"ica": 2, **FROM_MASK}),
    (
        "torch_threads",
        {"torch_threads": 1},
        {
            "train_model": 1,
            "extract": 2,
            "ica": 2,
            "mask_ica": 1,
            "prune": 1,
            "perplexity": 2,
            "lm_eval": 2,
            "metrics": 2,
        },
    ),
]


@pytest.mark.parametrize("name,overlay,expected", CASES, ids=[c[0] for c in CASES])
def test_a_key_change_reruns_exactly_what_it_decides(micro_run, tmp_path, name, overlay, expected):
    wd, _ = micro_run
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    proc = snakemake(wd, "-n", *TARGETS, configs=(str(path),))
    assert jobs_of(proc.stdout) == expected, (name, proc.stdout[-3000:])


def test_building_the_dag_imports_no_torch(tmp_path):
    """Every dry run and every cluster job parses the Snakefile: it must not import torch."""
    import os

    fake = tmp_path / "blocked" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported while building the DAG')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = snakemake(tmp_path / "wd", "-n", *TARGETS, "results/micro_comparison.md", env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "metrics" in jobs_of(proc.stdout)


def test_a_new_variant_after_the_shards_are_gone_leaves_built_targets_up_to_date(micro_run, tmp_path):
    """Shards are temporary: a new k re-extracts its batches. That rewrote the calibration statistics
    (then an output of the extraction), and by mtime every baseline, +bias mask, pruning and
    evaluation built from them was out of date. The statistics are now a job of their own."""
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(micro_run[0], wd, symlinks=True)  # copy2: modification times kept
    for shards in (wd / "results/micro/acts").glob("b[0-9]"):
        shutil.rmtree(shards)  # as a run without --notemp leaves it
    built = (*TARGETS, "results/micro_r20_c8_bias/metrics.json", "results/micro_r20_wanda_sp/metrics.json")
    snakemake(wd, *built)
    stats = sorted((wd / "results/micro/acts").glob("b*.stats.npz"))
    before = [p.stat().st_mtime_ns for p in stats]
    new = snakemake(wd, "results/micro/masks/r20_c4_torch.json")
    log = new.stdout + new.stderr  # a real run logs its job table on stderr
    assert jobs_of(log) == {"extract": 2, "ica": 2, "mask_ica": 1}, log[-3000:]
    assert [p.stat().st_mtime_ns for p in stats] == before, "re-extraction must not touch the statistics"
    proc = snakemake(wd, "-n", *built)
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def _package_copy(tmp_path, old: str, new: str):
    """fnprune copied under tmp_path with one edit of ica.py, and an env that imports the copy."""
    import os
    import shutil

    src = tmp_path / "src"
    shutil.copytree(Path(fnprune.__file__).parent, src / "fnprune", ignore=shutil.ignore_patterns("__pycache__"))
    ica = src / "fnprune" / "ica.py"
    text = ica.read_text()
    assert old in text
    ica.write_text(text.replace(old, new, 1))
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize(
    "what,old,new,expected",
    [
        (
            "a statement of FastICA",
            "    active = torch.ones(n_prob",
            "    n_prob = int(n_prob)\n    active = torch.ones(n_prob",
            {"ica": 2, **FROM_MASK},
        ),
        (
            "a comment in FastICA",
            "    active = torch.ones(n_prob",
            "    # a comment\n    active = torch.ones(n_prob",
            {},
        ),
    ],
    ids=["code", "comment"],
)
def test_a_change_of_package_code_reruns_the_rules_that_run_it(micro_run, tmp_path, what, old, new, expected):
    """Snakemake does not track what a script imports: each rule's params carry its code key."""
    wd = tmp_path / "wd"
    shutil.copytree(micro_run[0], wd, symlinks=True)
    proc = snakemake(wd, "-n", *TARGETS, env=_package_copy(tmp_path, old, new))
    assert jobs_of(proc.stdout) == expected, (what, proc.stdout[-3000:])


LORA_TARGETS = ("results/micro_dense_lora/metrics.json", "results/micro_r20_c8_lora/metrics.json")
FROM_LORA = {"lora": 2, "perplexity": 2, "lm_eval": 2, "metrics_lora": 2}


LORA_CASES = [
    ("lora.lr", {"lora": {"lr": 0.001}}, FROM_LORA),
    ("lora.rank", {"lora": {"rank": 4}}, FROM_LORA),
    ("lora.seed", {"lora": {"seed": 3}}, FROM_LORA),
    ("eval.ppl_batch_size", micro(eval={"ppl_batch_size": 3}), {"perplexity": 4, "metrics": 2, "metrics_lora": 2}),
    (
        "protect_first (the pruned parent's twin, not dense_lora)",
        micro(protect_first=2),
        {**FROM_MASK, "perplexity": 2, "lm_eval": 2, "lora": 1, "metrics_lora": 1},
    ),
]


@pytest.mark.parametrize("name,overlay,expected", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_a_lora_key_reruns_the_tuning_and_what_reads_it(micro_lora_run, tmp_path, name, overlay, expected):
    """A change of the lora section re-runs the two lora jobs and their evaluation, never the
    untuned targets; an upstream change reaches a pruned parent's twin, not the dense one's."""
    wd, _ = micro_lora_run
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    proc = snakemake(wd, "-n", *TARGETS, *LORA_TARGETS, configs=(str(path),))
    assert jobs_of(proc.stdout) == expected, (name, proc.stdout[-3000:])
