"""Another machine's arithmetic, on this one: the same draws re-run with the CPU kernels held to
an older instruction set, against the default run and against the spread between draws.

    python benchmarks/isa_check.py                       # smolr, draws 0-2, c64 / c64_bias / c64_hybrid / wanda_sp
    python benchmarks/isa_check.py --draws 0 1 --methods c64

The default run is the workflow's own (``results/`` of this checkout, made by
``snakemake --cores 2 comparison --configfile config/replicates.yaml``: every draw of the model).
The restricted run is the same targets in a second work directory, with the converted weights
and corpus splits copied from the first (the same bytes in), and these set for every job:

    ATEN_CPU_CAPABILITY=avx2        torch's vectorised kernels
    MKL_ENABLE_INSTRUCTIONS=AVX2    MKL's BLAS (torch's float32 matmul on x86)
    ONEDNN_MAX_CPU_ISA=AVX2         oneDNN's kernels
    OPENBLAS_CORETYPE=Haswell       numpy's BLAS

which is what an AVX2-only machine (this project's CI) runs. For each target it prints the
perplexity of both runs, the kept-set Dice of their masks per layer, whether batch 0's ICA scores
are bit-identical, and the machine effect (log perplexity ratio) beside the method's between-draw
standard deviation from the default run's draws, with the 95% prediction interval of one new draw
that those draws give. It writes the table to ``benchmarks/measured/isa_check_<model>.txt``.
Each run's ``metrics.json`` records the capability torch ran at (``kernels``), which the script
checks, so a restriction that did not take effect fails instead of passing quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
RESTRICT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}


def draw_slug(model: str, d: int) -> str:
    return model if d == 0 else f"{model}_d{d}"


def run(workdir: Path, targets: list[str], config: Path, env: dict, cores: int) -> float:
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores)]
    # -d moves the workdir, so the Snakefile's own configfile is not found there: name both
    cmd += [*targets, "--configfile", str(REPO / "config/config.yaml"), str(config)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snakemake in {workdir} failed:\n{proc.stderr[-4000:]}")
    return time.time() - t0


def ppl_of(root: Path, target: str, key: str) -> float:
    return json.loads((root / f"results/{target}/metrics.json").read_text())["perplexity"][key]


def capability(root: Path, target: str) -> str:
    return json.loads((root / f"results/{target}/metrics.json").read_text())["kernels"]["perplexity"]["cpu_capability"]


def kept_sets(root: Path, model: str, ratio: int, method: str) -> list[set[int]]:
    """Kept neurons per layer of the method's mask (the workflow's own mask path)."""
    from fnprune.config import parse_method

    path = root / f"results/{model}/masks/r{ratio}_{parse_method(method, 'torch')['selector']}.json"
    return [set(k) for k in json.loads(path.read_text())["kept"]]


def dice(a: list[set[int]], b: list[set[int]]) -> list[float]:
    return [2 * len(x & y) / (len(x) + len(y)) if (x or y) else 1.0 for x, y in zip(a, b)]


def scores_identical(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two ICA score files hold the same arrays bit for bit, and the largest difference."""
    with np.load(a) as za, np.load(b) as zb:
        same, worst = True, 0.0
        for k in za.files:
            x, y = za[k], zb[k]
            if x.dtype.kind not in "fiu":
                continue
            if x.shape != y.shape or not np.array_equal(x, y):
                same = False
                if x.shape == y.shape:
                    finite = np.isfinite(x) & np.isfinite(y)
                    worst = max(worst, float(np.max(np.abs(x[finite] - y[finite]), initial=0.0)))
        return same, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config/replicates.yaml")
    ap.add_argument("--model", default="smolr")
    ap.add_argument("--ratio", type=int, default=20)
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["c64", "c64_bias", "c64_hybrid", "wanda_sp"])
    ap.add_argument("--workdir", type=Path, default=REPO / "results/isa_avx2")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from fnprune.config import parse_method

    cfg = yaml.safe_load(args.config.read_text())
    spec = cfg["models"][args.model]
    n_draws = spec.get("draws", 1)
    weights = spec.get("base") or args.model
    default = REPO
    key = f"flap_token_ppl@{(spec.get('eval') or {}).get('ppl_seqlens', [128])[0]}"

    targets = [
        f"results/{draw_slug(args.model, d)}_r{args.ratio}_{m}/metrics.json" for d in args.draws for m in args.methods
    ]
    every_draw = [
        f"results/{draw_slug(args.model, d)}_r{args.ratio}_{m}/metrics.json"
        for d in range(n_draws)
        for m in args.methods
    ]
    dense = f"results/{args.model}_dense/metrics.json"
    missing = [t for t in [dense, *every_draw] if not (default / t).exists()]
    if missing:
        sys.exit(
            f"the default run lacks {len(missing)} targets (first: {missing[0]}); make them first: "
            f"snakemake --cores 2 comparison --configfile {args.config.relative_to(REPO)}"
        )

    wd = args.workdir
    (wd / "results/models").mkdir(parents=True, exist_ok=True)
    # copies, not links: a job of this run that decided to rewrite them must not touch the default run's files
    for dst, src in (
        (wd / f"results/models/{weights}", REPO / f"results/models/{weights}"),
        (wd / "results/data", REPO / "results/data"),
    ):
        if not dst.exists():
            shutil.copytree(src, dst, copy_function=shutil.copy2)
    env = {**os.environ, **RESTRICT}
    wall = run(wd, [dense, *targets], args.config, env, args.cores)

    lines = [
        f"# {args.model} at {args.ratio}%: default kernels against {', '.join(f'{k}={v}' for k, v in RESTRICT.items())}",
        f"# command: python benchmarks/isa_check.py --model {args.model} --draws {' '.join(map(str, args.draws))} "
        f"--methods {' '.join(args.methods)} ({wall:.0f} s for the restricted run)",
        f"# torch capability: default {capability(default, args.model + '_dense')}, "
        f"restricted {capability(wd, args.model + '_dense')}",
        f"# dense {key}: default {ppl_of(default, args.model + '_dense', key):.4f}, "
        f"restricted {ppl_of(wd, args.model + '_dense', key):.4f}",
        "",
        "| method | draw | PPL default | PPL AVX2 | AVX2 / default | mask Dice (mean, min over layers) "
        "| ICA scores of batch 0 | inside the 95% prediction interval of one draw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if capability(wd, args.model + "_dense") == capability(default, args.model + "_dense"):
        sys.exit("the restricted run reports the same torch capability as the default: the restriction did not apply")
    dense_log = math.log(ppl_of(default, args.model + "_dense", key))
    dense_log_avx2 = math.log(ppl_of(wd, args.model + "_dense", key))  # each run against its own dense
    summary = []
    for m in args.methods:
        logs = [
            math.log(ppl_of(default, f"{draw_slug(args.model, d)}_r{args.ratio}_{m}", key)) - dense_log
            for d in range(n_draws)
        ]
        mean, sd = float(np.mean(logs)), float(np.std(logs, ddof=1)) if len(logs) > 1 else 0.0
        half = stats.t.ppf(0.975, len(logs) - 1) * sd * math.sqrt(1 + 1 / len(logs)) if len(logs) > 1 else 0.0
        effects = []
        for d in args.draws:
            slug = draw_slug(args.model, d)
            t = f"{slug}_r{args.ratio}_{m}"
            a, b = ppl_of(default, t, key), ppl_of(wd, t, key)
            effects.append(math.log(b / a))
            y = math.log(b) - dense_log_avx2
            inside = mean - half <= y <= mean + half
            dc = dice(kept_sets(default, slug, args.ratio, m), kept_sets(wd, slug, args.ratio, m))
            ica_dir = parse_method(m, "torch")["ica_dir"]
            ica_a = default / f"results/{slug}/ica/{ica_dir}/b0.npz"
            ica_b = wd / f"results/{slug}/ica/{ica_dir}/b0.npz"
            if ica_dir and ica_a.exists() and ica_b.exists():
                same, worst = scores_identical(ica_a, ica_b)
                ica = "identical" if same else f"differ (max {worst:.2g})"
            else:
                ica = "-"
            lines.append(
                f"| {m} | {d} | {a:.2f} | {b:.2f} | {b / a:.3f} | "
                + f"{np.mean(dc):.3f}, {min(dc):.3f}"
                + f" | {ica} | {'yes' if inside else 'NO'} |"
            )
        summary.append(
            f"- {m}: machine effect over draws {', '.join(f'{e:+.4f}' for e in effects)} (log PPL); "
            f"between-draw SD {sd:.4f} over {n_draws} default draws; "
            f"largest |effect| / SD = {max(abs(e) for e in effects) / sd if sd else float('inf'):.2f}"
        )
    text = "\n".join(lines + ["", *summary]) + "\n"
    print(text)
    out = args.out or REPO / f"benchmarks/measured/isa_check_{args.model}.txt"
    out.write_text(text)


if __name__ == "__main__":
    main()
