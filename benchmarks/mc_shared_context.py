"""Multiple-choice scoring with shared contexts against the plain path, side by side in one process.

fnprune's HFLM subclass scores the choices of an item from one pass over their shared passage
(``_shared_context_tokens``); the plain path (lm-eval's batched forward of passage + continuation
for every choice, with logits only at the scored positions) is what the subclass does without it
(``SHARED_CONTEXT_TYPES = ()``). Both run the same lm-eval task through
:func:`fnprune.lmeval.run_lm_eval` on the same model, alternating which goes first; the best wall
time of each is reported, with their ratio and whether every item's accuracy is the same.

A third variant, ``arrival``, is the shared path with the blocking it had before contexts were
sorted: contexts in the order lm-eval sends them, blocks of about ``--batch-size`` continuations,
each block's continuations in one chunk of the batch size (so each context pass pads to the
longest of a few random passages, each continuation pass to the longest of its continuations).

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
    sorted_blocks, score_block = cls._shared_blocks, cls._score_block

    def arrival_blocks(self, shared, bs):
        blocks, cur, n = [], [], 0
        for ctx in shared:
            cur.append(ctx)
            n += len(shared[ctx])
            if n >= bs:
                blocks.append(cur)
                cur, n = [], 0
        return blocks + ([cur] if cur else [])

    def one_chunk(self, contexts, conts, chunk):
        return score_block(self, contexts, conts, max(chunk, sum(map(len, conts))))

    best, items = {}, {}
    modes = ("shared", "arrival", "plain")
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            cls.SHARED_CONTEXT_TYPES = shared_types if mode != "plain" else ()
            cls._shared_blocks, cls._score_block = (
                (arrival_blocks, one_chunk) if mode == "arrival" else (sorted_blocks, score_block)
            )
            t0 = time.perf_counter()
            out = run_lm_eval(
                model, tok, [args.task], batch_size=args.batch_size, limit=args.limit, include_path=args.tasks_dir
            )
            wall = time.perf_counter() - t0
            best[mode] = min(best.get(mode, float("inf")), wall)
            items[mode] = out["items"][args.task]
            print(f"repeat {r} {mode:6s} {wall:7.1f} s  acc {out['tasks'][args.task]['acc']['value']:.4f}", flush=True)
    cls.SHARED_CONTEXT_TYPES = shared_types
    cls._shared_blocks, cls._score_block = sorted_blocks, score_block
    same = all(items["shared"][m] == items[o][m] for o in ("plain", "arrival") for m in items["plain"])
    print(
        f"{args.task}, {args.limit} items, batch {args.batch_size}, {args.threads} threads: shared {best['shared']:.1f} s, "
        f"shared in arrival order {best['arrival']:.1f} s, plain {best['plain']:.1f} s; "
        f"arrival / shared {best['arrival'] / best['shared']:.2f}x, plain / shared {best['plain'] / best['shared']:.2f}x; "
        f"per-item scores identical: {same}"
    )


if __name__ == "__main__":
    main()
