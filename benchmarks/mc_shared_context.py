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
A fourth, ``before``, is that blocking with the block scoring fnprune had before it (c0a5827,
:func:`previous_score_block`): logits and log-softmax at every continuation position, padding
included, and a deep copy of the block's cache per chunk.

    snakemake --cores 2 results/models/smol results/data/stdlib_docs/lm_eval_tasks
    python benchmarks/mc_shared_context.py --limit 200 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def previous_score_block(self, contexts, conts, chunk):
    """fnprune's ``_score_block`` at c0a5827, without its autocast context (a no-op in float32):
    it ran the continuations ``lm_eval_batch_size`` at a time (``self.batch_size``; the caller's
    ``chunk`` is ignored), padded to the longest of each chunk, with the LM head and a full
    log-softmax at every position."""
    bs = self.batch_size
    dev = self.device
    lens = torch.tensor([len(c) for c in contexts], device=dev)
    width = int(lens.max())
    ids = torch.zeros(len(contexts), width, dtype=torch.long, device=dev)
    for g, c in enumerate(contexts):
        ids[g, : len(c)] = torch.tensor(c)
    ctx_mask = (torch.arange(width, device=dev)[None] < lens[:, None]).long()
    with torch.no_grad():
        body = self.model.model(input_ids=ids, attention_mask=ctx_mask, use_cache=True)
        last = body.last_hidden_state[torch.arange(len(contexts), device=dev), lens - 1]
        head = torch.log_softmax(self.model.lm_head(last).float(), -1)
    pairs = [(g, c) for g, cs in enumerate(conts) for c in cs]
    out = []
    for lo in range(0, len(pairs), bs):
        chunk = pairs[lo : lo + bs]
        rows = torch.tensor([g for g, _ in chunk], device=dev)
        k = max(len(c) for _, c in chunk) - 1
        lp_rest = None
        if k > 0:
            x = torch.zeros(len(chunk), k, dtype=torch.long, device=dev)
            for j, (_, c) in enumerate(chunk):
                x[j, : len(c) - 1] = torch.tensor(c[:-1])
            cache = copy.deepcopy(body.past_key_values)
            cache.batch_select_indices(rows)
            mask = torch.cat([ctx_mask[rows], torch.ones(len(chunk), k, dtype=torch.long, device=dev)], 1)
            pos = lens[rows][:, None] + torch.arange(k, device=dev)[None]
            with torch.no_grad():
                logits = self.model(
                    input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
                ).logits
            lp_rest = torch.log_softmax(logits.float(), -1)
        for j, (g, c) in enumerate(chunk):
            lp, greedy = float(head[g, c[0]]), int(head[g].argmax()) == c[0]
            if len(c) > 1:
                tgt = torch.tensor(c[1:], device=dev)
                row = lp_rest[j, : len(c) - 1]
                lp += float(row.gather(1, tgt[:, None]).sum())
                greedy = greedy and bool((row.argmax(-1) == tgt).all())
            out.append((lp, greedy))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="results/models/smol")
    p.add_argument("--tasks-dir", default="results/data/stdlib_docs/lm_eval_tasks")
    p.add_argument("--task", default="fnprune_mc")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=200, help="items; default 200 of the task's")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="shared,arrival,before,plain", help="which of the four to run")
    args = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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

    variants = {
        "shared": (sorted_blocks, score_block),
        "arrival": (arrival_blocks, one_chunk),
        "before": (arrival_blocks, previous_score_block),
        "plain": (sorted_blocks, score_block),
    }
    best, items = {}, {}
    modes = tuple(args.modes.split(","))
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            cls.SHARED_CONTEXT_TYPES = shared_types if mode != "plain" else ()
            cls._shared_blocks, cls._score_block = variants[mode]
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
    same = all(items[modes[0]][m] == items[o][m] for o in modes for m in items[modes[0]])
    ratios = ", ".join(
        f"{o} / shared {best[o] / best['shared']:.2f}x" for o in modes if o != "shared" and "shared" in best
    )
    print(
        f"{args.task}, {args.limit} items, batch {args.batch_size}, {args.threads} threads: "
        + ", ".join(f"{o} {best[o]:.1f} s" for o in modes)
        + (f"; {ratios}" if ratios else "")
        + f"; per-item scores identical: {same}"
    )


if __name__ == "__main__":
    main()
