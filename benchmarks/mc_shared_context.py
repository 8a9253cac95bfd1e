"""Multiple-choice scoring with shared contexts against the plain path, side by side in one process.

fnprune's HFLM subclass scores the choices of an item from one pass over their shared passage
(``_shared_context_tokens``); the plain path (lm-eval's batched forward of passage + continuation
for every choice, with logits only at the scored positions) is what the subclass does without it
(``SHARED_CONTEXT_TYPES = ()``). Both run the same lm-eval task through
:func:`fnprune.lmeval.run_lm_eval` on the same model, alternating which goes first; the best wall
time of each is reported, with their ratio and whether every item's accuracy is the same.

    snakemake --cores 2 results/models/smol results/data/stdlib_docs/lm_eval_tasks
    python benchmarks/mc_shared_context.py --limit 200 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="results/models/smol")
    p.add_argument("--tasks-dir", default="results/data/stdlib_docs/lm_eval_tasks")
    p.add_argument("--task", default="fnprune_mc")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=200, help="items; default 200 of the task's")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fnprune.lmeval import _scoring_lm_class, run_lm_eval

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    cls = _scoring_lm_class()
    shared_types = cls.SHARED_CONTEXT_TYPES
    best, items = {}, {}
    for r in range(args.repeats):
        for mode in ("shared", "plain") if r % 2 == 0 else ("plain", "shared"):
            cls.SHARED_CONTEXT_TYPES = shared_types if mode == "shared" else ()
            t0 = time.perf_counter()
            out = run_lm_eval(
                model, tok, [args.task], batch_size=args.batch_size, limit=args.limit, include_path=args.tasks_dir
            )
            wall = time.perf_counter() - t0
            best[mode] = min(best.get(mode, float("inf")), wall)
            items[mode] = out["items"][args.task]
            print(f"repeat {r} {mode:6s} {wall:7.1f} s  acc {out['tasks'][args.task]['acc']['value']:.4f}", flush=True)
    cls.SHARED_CONTEXT_TYPES = shared_types
    same = all(items["shared"][m] == items["plain"][m] for m in items["plain"])
    print(
        f"{args.task}, {args.limit} items, batch {args.batch_size}, {args.threads} threads: shared {best['shared']:.1f} s, "
        f"plain {best['plain']:.1f} s, ratio {best['plain'] / best['shared']:.2f}x; per-item scores identical: {same}"
    )


if __name__ == "__main__":
    main()
