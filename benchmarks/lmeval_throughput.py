"""lm-eval's scoring throughput against a plain batched forward pass over the same tokens.

Runs fnprune's :func:`~fnprune.lmeval.run_lm_eval` (the workflow's lm_eval rule: fixed batch size,
bounded context) on the embedded tasks, capturing every token sequence lm-eval scores. Then a
plain batched forward pass scores exactly those sequences: sorted by length, ``--batch-size`` a
batch, right-padded to the longest of the batch (the least padding a batched forward needs),
``model(input_ids).logits`` under ``no_grad``. Both count the same tokens; the ratio of their
tokens per second is what lm-eval's machinery (collation, log-softmax over the vocabulary,
per-request bookkeeping) costs. It runs twice: with fnprune's HFLM subclass (logits only at the
scored positions, what the workflow uses) and, in the first repeat only, with lm-eval's stock
HFLM. Repeats alternate the order; best of each is reported.

    snakemake --cores 2 results/models/smol results/data/stdlib/lm_eval_tasks
    python benchmarks/lmeval_throughput.py --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="results/models/smol")
    p.add_argument("--tasks-dir", default="results/data/stdlib/lm_eval_tasks")
    p.add_argument("--tasks", nargs="+", default=["fnprune_mc", "fnprune_ppl"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="documents per task; default all")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from lm_eval.models.huggingface import HFLM

    import fnprune.lmeval as L
    from fnprune.lmeval import run_lm_eval
    from fnprune.modeling import load_base, load_tokenizer

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lm_eval", "lm-eval", "fnprune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = load_base(args.model_dir, device="cpu")
    tok = load_tokenizer(args.model_dir)

    captured: list[list[int]] = []
    scoring = [0.0]
    inner = HFLM._loglikelihood_tokens

    def recording(lm, requests, *a, **kw):
        for _, ctx, cont in requests:
            captured.append((ctx + cont)[-(lm.max_length + 1) :][:-1])
        t0 = time.perf_counter()
        out = inner(lm, requests, *a, **kw)
        scoring[0] += time.perf_counter() - t0
        return out

    HFLM._loglikelihood_tokens = recording

    def lm_eval_run(stock=False):
        captured.clear()
        scoring[0] = 0.0
        L._scoring_lm_class = (lambda: HFLM) if stock else ours
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            out = run_lm_eval(
                model,
                tok,
                args.tasks,
                batch_size=args.batch_size,
                limit=args.limit,
                include_path=args.tasks_dir,
                max_length=args.max_length,
            )
        return time.perf_counter() - t0, scoring[0], out

    ours = L._scoring_lm_class

    def batches(seqs):
        """Longest first, ``--batch-size`` a batch and at most LOGITS_TOKENS padded positions a batch
        (the bound fnprune's HFLM keeps in its rolling path; an unbounded 32 x 2048 batch is slower)."""
        order = sorted(seqs, key=len, reverse=True)
        i = 0
        while i < len(order):
            n = max(1, min(args.batch_size, ours().LOGITS_TOKENS // len(order[i])))
            yield order[i : i + n]
            i += n

    @torch.no_grad()
    def plain_run(seqs):
        t0 = time.perf_counter()
        for chunk in batches(seqs):
            width = len(chunk[0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
            model(input_ids=ids)
        return time.perf_counter() - t0

    lm_eval_run()  # warm-up: datasets cache, imports; captures the sequences
    seqs = [list(s) for s in captured]
    n_tok = sum(len(s) for s in seqs)
    padded = sum(len(c[0]) * len(c) for c in batches(seqs))
    walls, scores, plains, load = {"ours": [], "stock": []}, {"ours": [], "stock": []}, [], [os.getloadavg()[0]]
    results = {}
    for r in range(args.repeats):
        order = ("ours", "stock", "plain") if r % 2 == 0 else ("plain", "ours")
        for which in order:
            if which == "plain":
                plains.append(plain_run(seqs))
            else:
                wall, sc, out = lm_eval_run(stock=which == "stock")
                walls[which].append(wall)
                scores[which].append(sc)
                results[which] = out
            load.append(os.getloadavg()[0])
    print(
        f"model {args.model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters), tasks "
        f"{' '.join(args.tasks)}, n_samples {out['n_samples']}, batch size {args.batch_size}, max length "
        f"{out['config']['max_length']}, torch threads {args.threads}, torch {torch.__version__}; best of "
        f"{args.repeats}, order alternated"
    )
    print(f"sequences scored: {len(seqs)}, tokens {n_tok:,} ({padded:,} with the batches' right padding)")
    print(f"1-min load average (cores: {os.cpu_count()}) before/after each run: {' '.join(f'{x:.1f}' for x in load)}")
    best_plain = min(plains)
    print(f"\n{'':34} {'s (best)':>9} {'tokens/s':>10}  all")
    print(
        f"{'plain batched forward':34} {best_plain:>9.2f} {n_tok / best_plain:>10.0f}  "
        f"{' '.join(f'{x:.2f}' for x in plains)}"
    )
    for which, label in (("ours", "fnprune HFLM"), ("stock", "lm-eval stock HFLM")):
        for what, times in ((f"{label} scoring", scores[which]), (f"{label} whole call", walls[which])):
            print(f"{what:34} {min(times):>9.2f} {n_tok / min(times):>10.0f}  {' '.join(f'{x:.2f}' for x in times)}")
    print()
    for which, label in (("ours", "fnprune HFLM"), ("stock", "lm-eval stock HFLM")):
        print(
            f"{label}: scoring tokens/s vs plain forward {best_plain / min(scores[which]):.2f}, whole call "
            f"{best_plain / min(walls[which]):.2f}"
        )
    print(f"fnprune HFLM vs stock HFLM, whole call: {min(walls['stock']) / min(walls['ours']):.2f}x")
    diff = max(
        abs(results["ours"]["tasks"][t][m]["value"] - results["stock"]["tasks"][t][m]["value"])
        for t in results["ours"]["tasks"]
        for m in results["ours"]["tasks"][t]
    )
    print(f"largest metric difference fnprune vs stock HFLM: {diff:.3g}")


if __name__ == "__main__":
    main()
