"""Cost of the hooked calibration passes against a plain forward pass over the same tokens.

The workflow's two passes: the shard pass (rule ``extract``) writes every layer's MLP signals
to memory-mapped shards; the statistics pass (rule ``calibration_stats``) accumulates the
``down_proj``/``o_proj`` input moments the baselines and ``_bias`` read. Both run the decoder
without its LM head (they read the blocks only). Four passes run here, same model, same
micro-batches (tokenisation included in each), in turn, best of ``--repeats``: the plain forward
(the whole model, logits included: what a user runs), the same without the LM head (the floor of
the two passes), the shard pass and the statistics pass; the ratios are printed.

    python benchmarks/extract_overhead.py                   # LLaMA-shaped, hidden 512, 8 layers
    python benchmarks/extract_overhead.py --model results/models/smol \
        --batches results/smol/calib/batches.json    # the workflow's own first batch
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fnprune.extract import _decoder, extract_batch, tokenize_batch
from fnprune.train import build_model, train_tokenizer


def texts(n: int) -> list[str]:
    from fnprune.corpus import embedded_documents

    docs = [d[1] for d in embedded_documents()]
    return [d[:2000] for d in docs[:n]]


def plain_pass(model, tok, batch: list[str], max_length: int, micro: int, decoder: bool = False) -> float:
    """A forward pass over the batch's micro-batches: the whole model (logits included, what a user
    runs), or with ``decoder`` the model without its LM head (what the passes run: the floor)."""
    fwd = _decoder(model) if decoder else model
    t0 = time.perf_counter()
    seqs = tokenize_batch(tok, batch, max_length)
    with torch.no_grad():
        for s in range(0, len(seqs), micro):
            chunk = seqs[s : s + micro]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for r, q in enumerate(chunk):
                ids[r, : len(q)] = torch.tensor(q)
                mask[r, : len(q)] = 1
            fwd(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved model directory (default: a random LLaMA-shaped model)")
    p.add_argument("--texts", type=int, default=16)
    p.add_argument("--batches", help="a workflow batches.json: use its batch --batch instead of --texts texts")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--shard-dtype", default="float16")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.batches:
        import json

        batch = json.loads(Path(args.batches).read_text())["batches"][args.batch]
    else:
        batch = texts(args.texts)
    if args.model:
        from fnprune.modeling import load_base, load_tokenizer

        model, tok = load_base(args.model, device="cpu"), load_tokenizer(args.model)
    else:
        tok = train_tokenizer(texts(200), 4096)
        torch.manual_seed(0)
        model = build_model(
            dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, max_position=args.max_length), tok
        ).eval()
    n_layers = model.config.num_hidden_layers
    plain, body, shards, stats = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            plain.append(plain_pass(model, tok, batch, args.max_length, args.micro))
            body.append(plain_pass(model, tok, batch, args.max_length, args.micro, decoder=True))
            paths = [Path(d) / f"r{r}_L{i}.npy" for i in range(n_layers)]
            t0 = time.perf_counter()
            info = extract_batch(model, tok, batch, paths, None, args.max_length, args.micro, args.shard_dtype)
            shards.append(time.perf_counter() - t0)
            for f in paths:
                f.unlink()
            t0 = time.perf_counter()
            extract_batch(model, tok, batch, None, Path(d) / f"r{r}.npz", args.max_length, args.micro)
            stats.append(time.perf_counter() - t0)
    print(
        f"model: {args.model or 'random LLaMA hidden 512, 8 layers, 1376 MLP neurons'}; "
        f"{info['n_texts']} texts, {info['n_tokens']} tokens, threads {args.threads}, best of {args.repeats}"
    )
    print(
        f"plain forward: {min(plain):.3f} s; without the LM head: {min(body):.3f} s; "
        f"shard pass (extract): {min(shards):.3f} s; statistics pass (calibration_stats): {min(stats):.3f} s"
    )
    print(f"all runs (s): plain {fmt(plain)}; no head {fmt(body)}; shard {fmt(shards)}; statistics {fmt(stats)}")
    print(f"ratio shard pass / plain forward: {min(shards) / min(plain):.3f}x (target <= 1.15x)")
    print(f"ratio shard pass / forward without the LM head: {min(shards) / min(body):.3f}x")
    print(f"ratio statistics pass / plain forward: {min(stats) / min(plain):.3f}x")


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()
