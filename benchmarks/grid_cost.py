"""What a target still costs: the jobs of a dry run priced by the wall times already measured.

    python benchmarks/grid_cost.py paper            # the `paper` grid, on this machine's results/
    python benchmarks/grid_cost.py --all paper      # every job of the grid, as if from scratch

With ``--all`` the dry run is ``snakemake -n -F``: every job of the DAG, each priced by its own
benchmark file where it has run here (the sum is then measured, not estimated) and by the
medians below where it has not.

Each job of ``snakemake -n <targets>`` that has a benchmark file is priced by the median wall
time of the measured benchmark files (``results/benchmarks/{rule}/*.tsv``) that share its name
with the batch and seed numbers taken out (``smol_paper_torch_c64_s1_b7`` -> ``smol_paper_torch_c64``);
failing that, by the rule's median over the same model, then over all models. Jobs without a
benchmark directive (masks, tables, metrics) are counted, not priced. It prints the job counts
and the estimated wall time at one job at a time (how a 2-core machine runs smol's jobs).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path


def family(stem: str) -> str:
    return re.sub(r"(_s\d+)?(_b\d+)?$", "", stem)


def measured(root: Path) -> dict[str, dict[str, list[float]]]:
    """rule -> benchmark file stem -> wall seconds of every measured run."""
    out: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for tsv in root.glob("*/*.tsv"):
        with tsv.open() as f:
            rows = [float(r["s"]) for r in csv.DictReader(f, delimiter="\t") if r.get("s") not in (None, "", "NA")]
        if rows:
            out[tsv.parent.name][tsv.stem] = rows
    return out


def price(rule: str, stem: str, have: dict[str, dict[str, list[float]]]) -> tuple[float | None, str]:
    runs = have.get(rule, {})
    fam = family(stem)
    for level, keep in (
        ("family", lambda s: family(s) == fam),
        ("model", lambda s: s.split("_torch")[0].split("_r")[0] == fam.split("_torch")[0].split("_r")[0]),
        ("rule", lambda s: True),
    ):
        xs = [x for s, v in runs.items() if keep(s) for x in v]
        if xs:
            return statistics.median(xs), level
    return None, "unmeasured"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+")
    ap.add_argument("--benchmarks", type=Path, default=Path("results/benchmarks"))
    ap.add_argument("--all", action="store_true", help="every job of the DAG (-F), own benchmark files first")
    args = ap.parse_args()
    flags = ["-n", "--nolock"] + (["-F"] if args.all else [])
    dry = subprocess.run(["snakemake", *flags, *args.targets], capture_output=True, text=True, check=False)
    if dry.returncode:
        sys.stderr.write(dry.stdout[-3000:] + dry.stderr[-3000:])
        return dry.returncode
    have = measured(args.benchmarks)
    jobs, rule = [], None
    for line in dry.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            rule = m.group(1)
            jobs.append([rule, None])
        elif line.strip().startswith("benchmark:") and jobs:
            jobs[-1][1] = Path(line.split(":", 1)[1].strip()).stem
    counts, seconds, levels, unpriced = Counter(), Counter(), Counter(), Counter()
    for rule, stem in jobs:
        counts[rule] += 1
        if stem is None:
            unpriced[rule] += 1
            continue
        own = have.get(rule, {}).get(stem) if args.all else None
        s, level = (own[-1], "own file") if own else price(rule, stem, have)
        levels[level] += 1
        if s is None:
            unpriced[rule] += 1
        else:
            seconds[rule] += s
    print(f"{len(jobs)} jobs {'in' if args.all else 'left for'} {' '.join(args.targets)}")
    print(f"{'rule':<22} {'jobs':>5} {'est. wall s':>12}")
    for rule in sorted(counts, key=lambda r: -seconds[r]):
        est = f"{seconds[rule]:.0f}" if seconds[rule] else "-"
        note = f"  ({unpriced[rule]} without a benchmark)" if unpriced[rule] else ""
        print(f"{rule:<22} {counts[rule]:>5} {est:>12}{note}")
    total = sum(seconds.values())
    what = "wall time" if levels.keys() <= {"own file"} else "estimated wall time"
    print(f"{what} of the priced jobs, one at a time: {total:.0f} s = {total / 3600:.2f} h")
    print("priced by: " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
