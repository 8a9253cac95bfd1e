"""The SLURM profile (profiles/slurm) against a real single-node SLURM cluster on localhost.

The cluster test starts munged, slurmctld and slurmd with tests/slurm/start_local_slurm.sh
(Debian's SLURM 22.05 packages, installed by the script when missing; needs root and apt),
runs the micro workflow through the profile, checks that every rule of the DAG ran as its
own SLURM batch job without asking for a GPU, and stops the daemons it started.
The dry-run test needs no SLURM: it checks which rules of a 7B target request a GPU.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import CONFIGS, REPO

PROFILE = REPO / "profiles" / "slurm"
SLURM_DIR = REPO / "tests" / "slurm"
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
GPU_RULES = {"extract", "calibration_stats", "ica", "perplexity", "lm_eval"}
TARGET = "results/micro_r20_c8/metrics.json"
# Per-job memory cap for the test node (2 cores, a few GB): the profile's set-resources are
# sized for 7B models; the test keeps them but lowers mem_mb so every job fits the node.
TEST_MEM_MB = 3000
SNAKEMAKE_TIMEOUT_S = 540
# squeue forgets finished jobs after MinJobAge s; keep them past the whole run for the checks.
MIN_JOB_AGE_S = 1800


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def workflow_args(workdir: Path, *extra: str) -> list[str]:
    """The snakemake command line of the SLURM runs: the profile replaces profiles/default."""
    return [
        SNAKEMAKE,
        "--workflow-profile",
        str(PROFILE),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        *extra,
        "--configfile",
        *CONFIGS,
    ]


def job_resources(dry_run_stdout: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the resources of each of its jobs, from a dry run's job listing."""
    out: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=rule \w+:)", dry_run_stdout):
        head = re.match(r"rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if head and res:
            pairs = dict(kv.split("=", 1) for kv in res.group(1).split(", ") if "=" in kv)
            out.setdefault(head.group(1), []).append(pairs)
    return out


def slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs inherit it (sbatch --export=ALL)
    return env


def run_logged(cmd: list[str], log: Path, timeout: int, env=None) -> tuple[int, str, float]:
    """Run cmd with output to a file (daemons started by it must not hold a pipe open)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.run(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env=env,
            start_new_session=True,
        ).returncode
    return rc, log.read_text(errors="replace"), time.monotonic() - t0


def pid_alive(pidfile: str, comm: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError):
        return False


def scontrol_job(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(?:^|\s)([\w/:]+)=(\S*)", line))


def minutes(limit: str) -> int:
    """SLURM time limit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def test_profile_dry_run_gpus_only_on_gpu_rules(tmp_path):
    """7B targets: gpu=1 on exactly the GPU rules (extract, calibration_stats, ica, perplexity, lm_eval);
    the profile's sizes apply."""
    proc = subprocess.run(
        workflow_args(
            tmp_path, "-n", "results/vicuna7b_r20_c128/metrics.json", "results/vicuna7b_r20_wanda_sp/metrics.json"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_resources(proc.stdout)
    assert GPU_RULES <= set(jobs) and {"prune", "metrics", "corpus"} <= set(jobs), sorted(jobs)
    for rule, reslist in jobs.items():
        for res in reslist:
            assert res.get("gpu", "0") == ("1" if rule in GPU_RULES else "0"), (rule, res)
    for rule, sizes in profile()["set-resources"].items():
        for res in jobs.get(rule, []):
            assert int(res["mem_mb"]) == sizes["mem_mb"], (rule, res)
            assert int(res["runtime"]) == sizes["runtime"], (rule, res)


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A running local SLURM cluster (started here, stopped at teardown even on failure)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (installs packages, starts daemons)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-query")):
        pytest.skip("the local SLURM cluster needs a Debian system (apt-get, dpkg)")
    logs = tmp_path_factory.mktemp("slurm_daemons")
    partition = str(profile().get("default-resources", {}).get("slurm_partition", "debug")).strip("'\"")
    env = dict(os.environ, SLURM_PARTITION_NAME=partition, SLURM_MIN_JOB_AGE=str(MIN_JOB_AGE_S))
    already_up = pid_alive("/run/slurmctld.pid", "slurmctld")
    rc, out, start_s = run_logged(
        ["bash", str(SLURM_DIR / "start_local_slurm.sh")], logs / "start.log", timeout=600, env=env
    )
    print(
        f"\n[slurm] start_local_slurm.sh: rc {rc}, {start_s:.1f} s"
        f"{' (cluster was already running)' if already_up else ''}"
    )
    try:
        assert rc == 0, f"start_local_slurm.sh failed ({rc}):\n{out[-4000:]}"
        yield {"partition": partition}
    finally:
        if already_up:
            print("[slurm] cluster was running before the tests: left running")
        else:
            rc, out, stop_s = run_logged(
                ["bash", str(SLURM_DIR / "stop_local_slurm.sh")], logs / "stop.log", timeout=180
            )
            print(f"[slurm] stop_local_slurm.sh: rc {rc}, {stop_s:.1f} s")
            assert rc == 0, out[-2000:]


@pytest.mark.slurm
@pytest.mark.slow
def test_micro_workflow_through_slurm_profile(local_slurm, tmp_path):
    prof = profile()
    init_s = prof["slurm-init-seconds-before-status-checks"]
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    min_job_age = int(re.search(r"^MinJobAge\s*=\s*(\d+)", config, re.M).group(1))
    assert prof["slurm-status-command"] == "squeue" and min_job_age >= 3 * init_s

    # Every rule in the profile's set-resources keeps its sizes, memory capped for this node.
    overrides = [
        f"{rule}:{key}={min(val, TEST_MEM_MB) if key == 'mem_mb' else val}"
        for rule, sizes in prof["set-resources"].items()
        for key, val in sizes.items()
    ]
    wd = tmp_path / "wd"
    wd.mkdir()
    dry = subprocess.run(
        workflow_args(wd, "-n", TARGET, "--set-resources", *overrides),
        capture_output=True,
        text=True,
        timeout=300,
        env=slurm_env(),
    )
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    planned = {rule: len(r) for rule, r in job_resources(dry.stdout).items()}
    assert {"train_model", "extract", "ica", "prune", "lm_eval", "metrics"} <= set(planned), planned

    cmd = ["timeout", "-k", "10", str(SNAKEMAKE_TIMEOUT_S), *workflow_args(wd, TARGET, "--set-resources", *overrides)]
    rc, out, run_s = run_logged(cmd, tmp_path / "snakemake.log", SNAKEMAKE_TIMEOUT_S + 60, slurm_env())
    print(f"[slurm] micro workflow through SLURM: rc {rc}, {run_s:.1f} s, {sum(planned.values())} jobs")
    assert rc == 0, f"snakemake through SLURM failed ({rc}; 124/137 = timeout):\n{out[-6000:]}"

    metrics = json.loads((wd / TARGET).read_text())
    assert isinstance(metrics, dict) and "perplexity" in metrics

    # Every job of the DAG was submitted with sbatch, completed as a SLURM job in the
    # profile's partition, without a GPU, and left its log in .snakemake/slurm_logs/rule_<name>/.
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", out)
    by_rule: dict[str, list[tuple[str, Path]]] = {}
    for job_id, log in submitted:
        rule = re.search(r"/slurm_logs/rule_(\w+?)/", log).group(1)
        by_rule.setdefault(rule, []).append((job_id, Path(log)))
    assert {r: len(j) for r, j in by_rule.items()} == planned, (by_rule, planned)
    for rule, jobs in by_rule.items():
        for job_id, log in jobs:
            assert log.resolve().is_relative_to((wd / ".snakemake/slurm_logs" / f"rule_{rule}").resolve()), log
            text = log.read_text(errors="replace")
            assert f"(Rule: {rule})" in text and "--executor slurm-jobstep" in text, text[-2000:]
            # the job ran snakemake from the submitting venv
            command = re.search(r"^\s*Command: (.*)$", text, re.M).group(1)
            assert command.startswith(sys.prefix), command
            info = scontrol_job(job_id)
            assert info.get("JobState") == "COMPLETED", (rule, job_id, info)
            assert info.get("Partition") == local_slurm["partition"], info
            comment = info.get("Comment", "")
            assert comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"), info
            tres = {k: v for k, v in info.items() if re.match(r"(?i)(tres|gres)", k)}
            assert tres and not any("gpu" in v.lower() for v in tres.values()), (rule, tres)
            sizes = prof["set-resources"].get(rule, {})
            if "runtime" in sizes:
                assert minutes(info["TimeLimit"]) == sizes["runtime"], (rule, info["TimeLimit"])
