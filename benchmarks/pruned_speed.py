"""Realised speed-up of pruned models on CPU (or ``--device cuda``): prefill latency and decode
tokens/s, dense vs pruned.

Pruning removes a ratio of block parameters (MLP neurons, uniformly over layers here, so the
shapes match what the methods produce); the ideal speed-up is the ratio of block FLOPs. With
``--round 64`` every ratio is also run with the kept neurons per layer rounded to a multiple of
64 (what the ``_m64`` method option does), side by side in the same run.

With ``--pruned`` the workflow's own pruned models (``results/{target}/model``, per-layer widths
as their masks chose them) are timed too, against the same dense model.

    python benchmarks/pruned_speed.py                          # one LLaMA-7B-shaped decoder block
    python benchmarks/pruned_speed.py --model results/models/tiny
    python benchmarks/pruned_speed.py --model results/models/smol --round 64 \
        --pruned results/smol_r20_c64/model results/smol_r20_c64_m64/model
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from fnprune import adapters as A
from fnprune.mask import n_to_drop


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model:
        from fnprune.modeling import load_base

        return load_base(args.model, device="cpu")
    cfg = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=512,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).eval()


def prune_uniform(model, ratio: float, round_to: int):
    model = copy.deepcopy(model)
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    n_drop = n_to_drop(ratio, A.block_parameter_count(model), A.mlp_neuron_params(blocks[0], ad))
    per = n_drop // len(blocks)
    for b in blocks:
        inter = A.intermediate_size(b, ad)
        keep = inter - per
        if round_to:
            keep = max(round_to, round(keep / round_to) * round_to)
        A.prune_mlp(b, ad, torch.arange(keep))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(model, prompt_len: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    prefill, decode = [], []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(dev)
        prefill.append(time.perf_counter() - t0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(dev)
        decode.append(new_tokens / (time.perf_counter() - t0))
    return min(prefill), max(decode)


def block_flops(model) -> int:
    return A.block_parameter_count(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved model directory (default: a LLaMA-7B-shaped block)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument(
        "--round",
        type=int,
        default=0,
        dest="round_to",
        help="also run every ratio with kept neurons rounded to this multiple",
    )
    p.add_argument("--pruned", nargs="*", default=[], help="pruned model directories of the workflow")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (every model is moved there)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = build(args).to(args.device)
    d_pre, d_dec = speed(dense, args.prompt, args.new_tokens, args.repeats)
    print(
        f"model: {args.model or 'LLaMA-7B-shaped decoder block (random)'}; prompt {args.prompt} tokens, "
        f"{args.new_tokens} decoded, device {args.device}, threads {args.threads}, best of {args.repeats}"
    )
    print(
        f"{'variant':18} {'MLP width':>9} {'prefill s':>10} {'decode tok/s':>13} {'prefill x':>10} {'decode x':>9} "
        f"{'ideal x':>8} {'prefill/ideal':>13}"
    )
    width = A.intermediate_size(A.layers(dense, A.adapter_for(dense))[0], A.adapter_for(dense))
    print(f"{'dense':18} {width:>9} {d_pre:>10.4f} {d_dec:>13.1f} {1:>10.2f} {1:>9.2f} {1:>8.2f} {1:>13.2f}")
    variants = [
        (f"r{int(r * 100)}" + (f"_m{round_to}" if round_to else ""), lambda r=r, m=round_to: prune_uniform(dense, r, m))
        for r in args.ratios
        for round_to in ((0, args.round_to) if args.round_to else (0,))
    ]
    for d in args.pruned:
        from fnprune.modeling import load_pruned

        variants.append((Path(d).parent.name, lambda d=d: load_pruned(d, dtype="float32", device="cpu")))
    for name, make in variants:
        pruned = make().to(args.device)
        pre, dec = speed(pruned, args.prompt, args.new_tokens, args.repeats)
        ideal = block_flops(dense) / block_flops(pruned)
        ws = [A.intermediate_size(b, A.adapter_for(pruned)) for b in A.layers(pruned, A.adapter_for(pruned))]
        w = str(ws[0]) if len(set(ws)) == 1 else f"{min(ws)}-{max(ws)}"
        print(
            f"{name:18} {w:>9} {pre:>10.4f} {dec:>13.1f} {d_pre / pre:>10.2f} {dec / d_dec:>9.2f} {ideal:>8.2f} "
            f"{d_pre / pre / ideal:>13.2f}"
        )


if __name__ == "__main__":
    main()
