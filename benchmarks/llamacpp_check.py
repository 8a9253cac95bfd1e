"""Exported GGUF models in a real llama.cpp: agreement with fnprune's PyTorch model, and speed.

For the dense model and each pruned model directory given, in one run:

- export F32 and F16 GGUF (``fnprune.ggufwrite.write_gguf``: per-layer widths, ``deci``
  architecture when the layers differ);
- agreement (F32): next-token log-probabilities on ``--windows`` windows of ``--seqlen`` tokens
  of the corpus's held-out test split, llama.cpp vs PyTorch: the largest absolute difference and
  both perplexities;
- speed (F16, ``--threads`` threads): prompt processing and generation tokens/s, best of
  ``--repeats`` rounds that interleave the models, and the ratio to dense beside the ideal one (the ratio of the matmul parameters
  a token passes through, LM head included).

    python benchmarks/llamacpp_check.py --dense results/models/smol \\
        --pruned results/smol_r20_c64/model results/smol_r20_c64_m64/model --test results/data/stdlib/test.jsonl

Needs llama-cpp-python (``make llamacpp``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def load(path: str):
    from fnprune.modeling import load_base, load_pruned, load_tokenizer

    p = Path(path)
    model = (
        load_pruned(p, dtype="float32", device="cpu")
        if (p / "fnprune.json").exists()
        else load_base(str(p), dtype="float32", device="cpu")
    )
    return model.eval(), load_tokenizer(str(p))


def matmul_params(model) -> int:
    """Weights a token multiplies with: every Linear (LM head included), not the embedding lookup."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def windows_of(tok, test_file: str, n: int, seqlen: int) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in open(test_file)]
    ids = tok("\n\n".join(texts))["input_ids"]
    if len(ids) < n * seqlen:
        raise SystemExit(f"{test_file}: {len(ids)} tokens, {n} x {seqlen} needed")
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True)
    ap.add_argument("--pruned", nargs="*", default=[])
    ap.add_argument("--test", required=True, help="held-out split (.jsonl with a text field)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the rows as JSON here too")
    args = ap.parse_args()
    from fnprune.ggufwrite import write_gguf
    from fnprune.llamacpp import agreement, speed

    torch.set_num_threads(args.threads)
    rows, f16 = [], []
    with tempfile.TemporaryDirectory() as d:
        for i, path in enumerate([args.dense, *args.pruned]):
            model, tok = load(path)
            wins = windows_of(tok, args.test, args.windows, args.seqlen)
            f32 = Path(d) / f"m{i}.f32.gguf"
            f16.append(Path(d) / f"m{i}.f16.gguf")
            widths = write_gguf(model, tok, f32, "F32")
            write_gguf(model, tok, f16[-1], "F16")
            agree = agreement(f32, model, wins, n_threads=args.threads)
            f32.unlink()
            ffn = widths["feed_forward_length"]
            rows.append(
                {
                    "model": path,
                    "ffn_widths": f"{min(ffn)}..{max(ffn)}",
                    "widths_multiple_of_64": all(w % 64 == 0 for w in ffn),
                    "heads": sum(widths["head_count"]),
                    "matmul_params": matmul_params(model),
                    **agree,
                    "prompt_tokens_per_s": 0.0,
                    "generate_tokens_per_s": 0.0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del model
        prompt = wins[0][: args.prompt]
        for _ in range(args.repeats):  # rounds over all models: load drifts hit each alike
            for r, path in zip(rows, f16):
                sp = speed(path, prompt, args.generate, n_threads=args.threads)
                for key, value in sp.items():
                    r[key] = max(r[key], value)
    dense = rows[0]
    print(
        f"\n{'model':48s} {'max|dlogp|':>10s} {'ppl torch':>9s} {'ppl l.cpp':>9s} {'rel':>7s} "
        f"{'pp tok/s':>8s} {'tg tok/s':>8s} {'pp x':>5s} {'tg x':>5s} {'ideal x':>7s}"
    )
    for r in rows:
        print(
            f"{r['model'][-48:]:48s} {r['max_abs_logprob_diff']:10.2e} {r['ppl_torch']:9.3f} {r['ppl_llamacpp']:9.3f} "
            f"{r['ppl_rel_diff']:7.2%} {r['prompt_tokens_per_s']:8.1f} {r['generate_tokens_per_s']:8.1f} "
            f"{r['prompt_tokens_per_s'] / dense['prompt_tokens_per_s']:5.2f} "
            f"{r['generate_tokens_per_s'] / dense['generate_tokens_per_s']:5.2f} "
            f"{dense['matmul_params'] / r['matmul_params']:7.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
