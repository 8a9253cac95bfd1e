"""lm-eval batch size: ``batch_size="auto"`` (and fixed sizes) against batch size 1, same model, same tasks.

Loads one model once and runs fnprune's :func:`~fnprune.lmeval.run_lm_eval` on the embedded
tasks with every batch size in turn, alternating the order between repeats; reports the best
wall time of each, the speedup over batch size 1, and how far the results move with the batch
size: the largest difference of every metric and of every per-request log-likelihood (padding
and different matmul shapes change floating-point sums slightly).

    snakemake --cores 2 results/models/tiny results/data/stdlib/lm_eval_tasks
    python benchmarks/lmeval_batch.py --repeats 3

"wall" is the whole ``run_lm_eval`` call (task loading included, what the workflow's lm_eval
rule pays); "scoring" is the time inside lm-eval's ``loglikelihood`` / ``loglikelihood_rolling``
of the model wrapper (tokenisation, the auto batch-size probe and the forward passes).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections import defaultdict

import numpy as np


class Recorder:
    """Wraps HFLM's two scoring entry points: time spent, per-request results by request key."""

    def __init__(self):
        from lm_eval.models.huggingface import HFLM

        self.seconds = 0.0
        self.values: dict = {}
        for name in ("loglikelihood", "loglikelihood_rolling"):
            setattr(HFLM, name, self._wrap(getattr(HFLM, name), name))

    def reset(self) -> None:
        self.seconds, self.values = 0.0, {}

    def _wrap(self, fn, kind):
        rec = self

        def wrapped(lm, requests, *a, **kw):
            t0 = time.perf_counter()
            out = fn(lm, requests, *a, **kw)
            rec.seconds += time.perf_counter() - t0
            for req, res in zip(requests, out, strict=True):
                ll = res[0] if isinstance(res, tuple) else res
                rec.values[(kind, req.task_name, req.doc_id, req.idx)] = float(ll)
            return out

        return wrapped


def parse_bs(s: str) -> int | str:
    return s if s.startswith("auto") else int(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="results/models/tiny")
    p.add_argument("--tasks-dir", default="results/data/stdlib/lm_eval_tasks")
    p.add_argument("--tasks", nargs="+", default=["fnprune_mc", "fnprune_ppl"])
    p.add_argument(
        "--batch-sizes", nargs="+", type=parse_bs, default=[1, "auto", 32], help="compared against the first (1)"
    )
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="cap of 'auto' (default: run_lm_eval's, 8 on CPU, 64 on CUDA)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval --limit); default all")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.batch_sizes[0] != 1:
        p.error("--batch-sizes: the first must be 1 (the reference)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from fnprune.lmeval import run_lm_eval
    from fnprune.modeling import load_base, load_tokenizer

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lm_eval", "lm-eval", "fnprune"):
        logging.getLogger(name).setLevel(logging.WARNING)

    model = load_base(args.model_dir, device=args.device)
    tok = load_tokenizer(args.model_dir)
    rec = Recorder()

    def run(bs, lim):
        rec.reset()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints its batch-size probe
            out = run_lm_eval(
                model,
                tok,
                args.tasks,
                batch_size=bs,
                limit=lim,
                include_path=args.tasks_dir,
                max_batch_size=args.max_batch_size,
            )
        return out, time.perf_counter() - t0, rec.seconds, dict(rec.values)

    run(1, 2)  # warm-up: datasets cache, lm-eval imports, torch
    walls, scoring, outs, values = defaultdict(list), defaultdict(list), {}, {}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = args.batch_sizes if r % 2 == 0 else args.batch_sizes[::-1]
        for bs in order:
            out, wall, sc, vals = run(bs, limit)
            walls[bs].append(wall)
            scoring[bs].append(sc)
            if bs in values:
                drift = max(abs(vals[k] - values[bs][k]) for k in vals)
                if drift:
                    print(f"note: batch size {bs} is not deterministic between repeats (max |d loglik| {drift:.3g})")
            outs.setdefault(bs, out)
            values.setdefault(bs, vals)
            load.append(os.getloadavg()[0])
            print(f"  repeat {r} batch size {bs}: {wall:.2f} s", file=sys.stderr)

    ref = outs[1]
    n_req = defaultdict(int)
    for kind, *_ in values[1]:
        n_req[kind] += 1
    print(
        f"lm-eval {ref['versions']['lm_eval']} on {args.model_dir}, tasks {' '.join(args.tasks)} "
        f"({args.tasks_dir}); limit {limit if limit is not None else 'none (all documents)'}; "
        f"n_samples {ref['n_samples']}; requests {dict(n_req)}; device {args.device}, torch threads "
        f"{args.threads}, torch {torch.__version__}; best of {args.repeats}, order alternated"
    )
    print(
        f"1-min load average of the machine (cores: {os.cpu_count()}) before/after each run: "
        f"{' '.join(f'{x:.1f}' for x in load)}"
    )
    print(
        f"\n{'batch size':>10} {'used':>12} {'wall s (best)':>14} {'scoring s':>10} {'speedup':>8} "
        f"{'scoring speedup':>16}  all walls"
    )
    b1, s1 = min(walls[1]), min(scoring[1])
    for bs in args.batch_sizes:
        used = outs[bs]["config"]["batch_sizes"] or [bs]
        print(
            f"{str(bs):>10} {','.join(map(str, used)):>12} {min(walls[bs]):>14.2f} {min(scoring[bs]):>10.2f} "
            f"{b1 / min(walls[bs]):>7.2f}x {s1 / min(scoring[bs]):>15.2f}x  "
            f"{' '.join(f'{w:.2f}' for w in walls[bs])}"
        )

    print("\nagreement with batch size 1 (max abs difference):")
    for bs in args.batch_sizes[1:]:
        print(f"  batch size {bs}:")
        for task, metrics in ref["tasks"].items():
            for m, v in metrics.items():
                w = outs[bs]["tasks"][task][m]["value"]
                rel = abs(w - v["value"]) / abs(v["value"]) if v["value"] else float("nan")
                print(
                    f"    {task:12} {m:18} bs1 {v['value']:.6f}  bs {bs} {w:.6f}  |d| {abs(w - v['value']):.3g}"
                    f"  (rel {rel:.2g})"
                )
        for kind in sorted(n_req):
            keys = [k for k in values[1] if k[0] == kind]
            d = np.array([abs(values[bs][k] - values[1][k]) for k in keys])
            print(
                f"    per-request {kind}: max |d loglik| {d.max():.3g}, mean {d.mean():.3g}, "
                f"identical {int((d == 0).sum())}/{len(d)}"
            )


if __name__ == "__main__":
    main()
