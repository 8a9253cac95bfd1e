"""The users' command at its real size: a LLaMA-2-7B-shaped model (seeded random weights, `source:
init`) through every stage of results/scale7b_r20_c128/metrics.json, its _bias twin and flap, and a
GGUF export, with per stage (rule): wall time, peak resident memory as a ratio to the model's bytes,
peak disk, and shard bytes per batch, compared with the README's plan for 7B models.

    python benchmarks/scale_7b.py                      # 32 layers, this machine's device (cuda when present)
    python benchmarks/scale_7b.py --layers 4           # a quick estimate at 4 blocks
    python benchmarks/scale_7b.py --device cuda --out benchmarks/measured/scale_7b_h200.txt

Engineering check, not a result about LLMs: the weights are random. It runs the workflow (the
repository's Snakefile, this checkout's package) in its own working directory with
config/scale_7b.yaml as the whole config, one target at a time, and deletes each pruned model once
its metrics (and export) are measured, so the disk holds the base model, one pruned model and one
batch's shards at most. Wall time and snakemake's max_rss come from the rules' `benchmark:` TSVs;
snakemake samples RSS every second for a job's first 30 s and every 30 s after, so a background
thread also samples every job's RSS (the job's process tree, every 0.5 s), the working directory's
bytes, each batch's shard folder, and on CUDA the GPU's used memory (nvidia-smi; the stages do not
record torch.cuda.max_memory_allocated, so this is the device's memory, CUDA context included).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "scale7b"
# The README's plan for a 7B model ("Real models at scale"): fp16 weights on the GPU, shards per
# batch of 5,000 tokens (tokens x 2 x 11008 signals x 2 B x 32 layers), a pruned model at 20%.
PLAN = {
    "weights_bytes": 13.5e9,
    "shard_bytes_per_batch": 7e9,
    "shard_tokens": 5000,
    "pruned_bytes": 10.8e9,
}
RSS_LIMIT = 1.3  # goal: every stage's peak resident memory at most this times the model's bytes
GIB = 1024**3


def read_benchmark(path: str | Path) -> dict:
    """One snakemake benchmark TSV (header line, one record): its fields as numbers where they are."""
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no benchmark record")
    out = {}
    for k, v in rows[-1].items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def job_records(bench_dir: str | Path, since: float = 0.0) -> list[dict]:
    """Every benchmark TSV under ``bench_dir`` (``<rule>/<job>.tsv``) written after ``since``, in the
    order the jobs ended: rule, job, wall s, snakemake's max_rss (bytes), start and end times."""
    out = []
    for p in sorted(Path(bench_dir).glob("*/*.tsv")):
        end = p.stat().st_mtime
        if end < since:
            continue
        b = read_benchmark(p)
        rss = b.get("max_rss")
        out.append(
            {
                "rule": p.parent.name,
                "job": p.stem,
                "wall_s": b["s"],
                "max_rss_bytes": rss * 2**20 if isinstance(rss, float) else None,
                "start": end - b["s"],
                "end": end,
            }
        )
    return sorted(out, key=lambda r: r["end"])


def stage_rows(jobs: list[dict], samples: dict, model_bytes: int, limit: float = RSS_LIMIT) -> list[dict]:
    """Per job: its peak RSS (the larger of snakemake's max_rss and the sampler's), as a ratio to the
    model's bytes and against ``limit``; peak disk and GPU memory in its time window.

    ``samples``: ``{"rss": {pid: {"script", "first", "last", "max"}}, "disk": [(t, bytes)],
    "gpu": [(t, bytes)]}`` from :class:`Sampler`."""
    rows = []
    for j in jobs:

        def inside(t, j=j):
            return j["start"] - 1.0 <= t <= j["end"] + 1.0

        sampled = [
            p["max"]
            for p in samples.get("rss", {}).values()
            if p["first"] <= j["end"] + 1.0 and p["last"] >= j["start"] - 1.0 and p["script"] == j.get("script")
        ]
        peak = max([x for x in [j["max_rss_bytes"], *sampled] if x is not None], default=None)
        disk = [b for t, b in samples.get("disk", []) if inside(t)]
        gpu = [b for t, b in samples.get("gpu", []) if inside(t)]
        ratio = peak / model_bytes if peak is not None else None
        rows.append(
            {
                **j,
                "peak_rss_bytes": peak,
                "rss_ratio": ratio,
                "within_limit": ratio is not None and ratio <= limit,
                "disk_peak_bytes": max(disk) if disk else None,
                "gpu_peak_bytes": max(gpu) if gpu else None,
            }
        )
    return rows


def sampled_only(jobs: list[dict], rss: dict) -> list[dict]:
    """Jobs the sampler saw that no benchmark TSV records (rules without ``benchmark:``, such as the
    masks and metrics): wall time and times from the samples."""
    out = []
    for p in rss.values():
        if not any(
            j.get("script") == p["script"] and p["first"] <= j["end"] + 1 and p["last"] >= j["start"] - 1 for j in jobs
        ):
            out.append(
                {
                    "rule": p["script"],
                    "job": "(sampled; no benchmark:)",
                    "wall_s": p["last"] - p["first"],
                    "max_rss_bytes": None,
                    "start": p["first"],
                    "end": p["last"],
                    "script": p["script"],
                }
            )
    return out


def plan_comparison(
    model_bytes: int, shard_bytes: list[int], shard_tokens: list[int], pruned_bytes: dict
) -> list[dict]:
    """The README's plan against what was measured: the weights, shard bytes per batch (scaled to the
    plan's 5,000 tokens by the measured bytes per token) and each pruned model's bytes."""
    rows = [{"figure": "weights (bytes)", "plan": PLAN["weights_bytes"], "measured": model_bytes}]
    for b, (nbytes, tokens) in enumerate(zip(shard_bytes, shard_tokens)):
        per_token = nbytes / tokens
        rows.append(
            {
                "figure": f"shards of batch {b} ({tokens} tokens), scaled to {PLAN['shard_tokens']} tokens",
                "plan": PLAN["shard_bytes_per_batch"],
                "measured": per_token * PLAN["shard_tokens"],
                "bytes_per_token": per_token,
            }
        )
    for target, nbytes in pruned_bytes.items():
        rows.append({"figure": f"pruned model {target} (bytes)", "plan": PLAN["pruned_bytes"], "measured": nbytes})
    for r in rows:
        r["ratio"] = r["measured"] / r["plan"]
    return rows


class Sampler(threading.Thread):
    """Samples every ``interval`` s: the RSS of each fnprune job script under ``root_pid`` (by its
    process tree), the bytes under ``workdir``, each shard folder's bytes, and on CUDA the GPU's used
    memory."""

    def __init__(self, workdir: Path, interval: float = 0.5, gpu: bool = False):
        super().__init__(daemon=True)
        self.workdir, self.interval, self.gpu = workdir, interval, gpu
        self.rss: dict[int, dict] = {}
        self.disk: list[tuple[float, int]] = []
        self.gpu_used: list[tuple[float, int]] = []
        self.shards: dict[str, int] = {}
        self.load: list[float] = []  # the machine's 1-minute load average (other users' jobs included)
        self.free_min = shutil.disk_usage(workdir).free
        self.stop_event = threading.Event()

    def _tree_bytes(self, path: Path) -> int:
        total = 0
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def _jobs(self):
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(self.workdir) not in cmd:
                continue  # another workflow's job on the same machine
            m = re.search(r"\.snakemake/scripts/tmp\w+\.(\w+)\.py|fnprune-direct:(\w+)", cmd)
            if m:
                yield proc, m[1] or m[2]

    def sample(self) -> None:
        import psutil

        now = time.time()
        for proc, script in self._jobs():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            rec = self.rss.setdefault(proc.pid, {"script": script, "first": now, "last": now, "max": 0})
            rec["last"], rec["max"] = now, max(rec["max"], rss)
        self.disk.append((now, self._tree_bytes(self.workdir / "results")))
        self.load.append(os.getloadavg()[0])
        self.free_min = min(self.free_min, shutil.disk_usage(self.workdir).free)
        for d in (self.workdir / "results" / MODEL / "acts").glob("b*"):
            if d.is_dir():
                self.shards[d.name] = max(self.shards.get(d.name, 0), self._tree_bytes(d))
        if self.gpu:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0 and out.stdout.strip():
                self.gpu_used.append((now, int(out.stdout.split()[0]) * 2**20))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def samples(self) -> dict:
        return {"rss": self.rss, "disk": self.disk, "gpu": self.gpu_used}


# The script each rule runs (benchmark folders are named by rule; init_model's is "init").
RULE_SCRIPT = {"init": "init_model", "calibration_stats": "calibration_stats", "export_gguf": "export_gguf"}


def write_workdir_config(workdir: Path, layers: int | None, gpus: int) -> dict:
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "scale_7b.yaml").read_text())
    m = cfg["models"][MODEL]
    if layers:
        m["init"] = {"preset": m["init"], "num_layers": layers}
        m["protect_first"], m["protect_last"] = min(3, max(layers // 4, 1)), min(2, max(layers // 8, 1))
    m["gpus"] = gpus
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (workdir / "config" / "paper.yaml").write_text("paper: {grids: {}}\n")
    return cfg


def run_snakemake(workdir: Path, targets: list[str], env: dict, log) -> None:
    cmd = [
        str(Path(sys.executable).with_name("snakemake")),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "2",
        *targets,
    ]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"snakemake failed ({proc.returncode}); see {log.name}")


def direct_export(workdir: Path, target: str, gtype: str, env: dict, log) -> float:
    """The export_gguf rule's own function, run outside Snakemake (the base model's weights deleted):
    returns its wall time."""
    code = (
        "import sys; from fnprune import stages; stages.setup(sys.argv[1], 2); "
        f"stages.export_gguf('{target}', {{}}, 'results/{target}/model', 'results/{target}/model', "
        f"'results/{target}/model.{gtype}.gguf', '{gtype}')"
    )
    t0 = time.time()
    cmd = [sys.executable, "-c", code, str(workdir / f"results/logs/export_gguf/{target}_{gtype}.direct.log")]
    proc = subprocess.run([*cmd, "fnprune-direct:export_gguf"], cwd=workdir, env=env, stdout=log, stderr=log)
    if proc.returncode:
        raise SystemExit(f"direct export failed ({proc.returncode}); see {log.name}")
    return time.time() - t0


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def render(rows: list[dict], plan: list[dict], meta: dict) -> str:
    lines = [f"# {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        f"{'rule':<18} {'job':<26} {'wall s':>8} {'peak RSS GB':>11} {'x model':>8} {'<=1.3':>5} "
        f"{'disk GB':>8} {'GPU GB':>7}",
    ]
    for r in rows:
        ratio = "-" if r["rss_ratio"] is None else f"{r['rss_ratio']:.2f}"
        lines.append(
            f"{r['rule']:<18} {r['job'][:26]:<26} {r['wall_s']:>8.1f} {fmt_gb(r['peak_rss_bytes']):>11} "
            f"{ratio:>8} "
            f"{'yes' if r['within_limit'] else 'NO':>5} {fmt_gb(r['disk_peak_bytes']):>8} "
            f"{fmt_gb(r['gpu_peak_bytes']):>7}"
        )
    lines += ["", f"{'plan (README) vs measured':<70} {'plan GB':>8} {'measured GB':>11} {'ratio':>6}"]
    for p in plan:
        lines.append(f"{p['figure'][:70]:<70} {p['plan'] / 1e9:>8.2f} {p['measured'] / 1e9:>11.2f} {p['ratio']:>6.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's 32)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="cpu hides any GPU")
    ap.add_argument("--workdir", default=None, help="default results/scale_7b[_L<layers>]")
    ap.add_argument("--out", default=None, help="default benchmarks/measured/scale_7b_<device>[_L<layers>].txt")
    ap.add_argument("--gguf", default="f16", choices=["f32", "f16", "q8_0"], help="export type")
    ap.add_argument("--methods", nargs="+", default=None, help="default config/scale_7b.yaml's; the first is exported")
    ap.add_argument("--keep", action="store_true", help="keep the pruned models and the base model")
    ap.add_argument(
        "--max-disk-gb",
        type=float,
        default=25.0,
        help="when base + pruned + GGUF would exceed this, the export runs after the base model is deleted",
    )
    args = ap.parse_args()

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    suffix = f"_L{args.layers}" if args.layers else ""
    workdir = Path(args.workdir or REPO / "results" / f"scale_7b{suffix}").resolve()
    out = Path(args.out or REPO / "benchmarks" / "measured" / f"scale_7b_{device}{suffix}.txt")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_workdir_config(workdir, args.layers, 1 if device == "cuda" else 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    sampler = Sampler(workdir, gpu=device == "cuda")
    sampler.start()
    t_start = time.time()
    log = open(workdir / "scale_7b.log", "a")
    methods = args.methods or cfg["targets"]["methods"]
    export_target = f"{MODEL}_r20_{methods[0]}"
    model_dir = workdir / "results" / "models" / MODEL
    pruned_bytes, export_direct = {}, None
    # The exported target runs last: when base + pruned + GGUF exceed the disk, its pruned model
    # waits for the export while the base model is deleted.
    order = [m for m in methods if f"{MODEL}_r20_{m}" != export_target] + [methods[0]]
    try:
        for meth in order:
            target = f"{MODEL}_r20_{meth}"
            targets = [f"results/{target}/metrics.json"]
            run_snakemake(workdir, targets, env, log)
            pruned = workdir / "results" / target / "model"
            pruned_bytes[target] = sum(f.stat().st_size for f in pruned.glob("*.safetensors"))
            if target == export_target:
                gguf = pruned_bytes[target] * (2.1 if args.gguf == "f32" else 1.05 if args.gguf == "f16" else 0.6)
                base = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
                fits = base + pruned_bytes[target] + gguf <= args.max_disk_gb * 1e9
                if fits and shutil.disk_usage(workdir).free > gguf + 2e9:
                    run_snakemake(workdir, [f"results/{target}/model.{args.gguf}.gguf"], env, log)
                    (workdir / "results" / target / f"model.{args.gguf}.gguf").unlink()
                else:
                    export_direct = target
                    continue  # exported after the base model's weights are gone
            if not args.keep:
                shutil.rmtree(pruned)
        model_bytes = json.loads((model_dir / "init.json").read_text())["weights_bytes"]
        if export_direct:
            shutil.rmtree(model_dir)  # a rerun rebuilds it (and everything after it)
            wall = direct_export(workdir, export_direct, args.gguf, env, log)
            (workdir / "results" / export_direct / f"model.{args.gguf}.gguf").unlink()
            if not args.keep:
                shutil.rmtree(workdir / "results" / export_direct / "model")
    finally:
        sampler.stop_event.set()
        sampler.join()
        log.close()

    jobs = job_records(workdir / "results" / "benchmarks", since=t_start)
    for j in jobs:
        j["script"] = RULE_SCRIPT.get(j["rule"], j["rule"])
    if export_direct:
        rec = next(p for p in sampler.rss.values() if p["script"] == "export_gguf")
        jobs.append(
            {
                "rule": "export_gguf",
                "job": f"{export_direct}_{args.gguf} (direct)",
                "wall_s": wall,
                "max_rss_bytes": None,
                "start": rec["first"],
                "end": rec["last"],
                "script": "export_gguf",
            }
        )
    jobs += sampled_only(jobs, sampler.rss)
    rows = stage_rows(sorted(jobs, key=lambda j: j["end"]), sampler.samples(), model_bytes)
    import numpy as np

    shard_dirs = sorted(sampler.shards)
    # each batch's tokens, as its ICA score file records them
    tokens = [
        int(np.load(next((workdir / "results" / MODEL / "ica").glob(f"*/{b}.npz")))["n_tokens"]) for b in shard_dirs
    ]
    plan = plan_comparison(model_bytes, [sampler.shards[b] for b in shard_dirs], tokens, pruned_bytes)
    try:
        info = open("/proc/cpuinfo").read()
        cpu = re.search(r"^model name\s*:\s*(.*)$", info, re.M)[1]
        flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M)[1].split())
        cpu += f" ({', '.join(sorted(flags & {'avx512_bf16', 'amx_bf16', 'amx_tile'})) or 'no native bfloat16'})"
    except (OSError, TypeError):
        cpu = platform.processor()
    meta = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "device": device + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""),
        "model": f"{MODEL}: init {cfg['models'][MODEL]['init']}, {model_bytes / 1e9:.2f} GB of weights",
        "calibration": json.dumps(cfg["models"][MODEL]["calibration"]),
        "peak disk (results/, GB)": fmt_gb(max((b for _, b in sampler.disk), default=0)),
        "lowest free disk on the filesystem (GB, other users included)": fmt_gb(sampler.free_min),
        "peak RSS of any stage / model bytes": f"{max(r['rss_ratio'] or 0 for r in rows):.2f}",
        "whole run (s)": f"{time.time() - t_start:.0f}",
        "load average (1 min) over the run, mean / max": (
            f"{sum(sampler.load) / max(len(sampler.load), 1):.1f} / {max(sampler.load, default=0):.1f} "
            f"on {os.cpu_count()} cores (above 2: other jobs shared the cores, so wall times are upper bounds)"
        ),
        "export": "outside Snakemake after the base weights were deleted (disk)" if export_direct else "in Snakemake",
    }
    text = render(rows, plan, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "stages": rows, "plan": plan}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
