"""float32 against bfloat16 (and float16) on this machine's CPU, side by side in one process.

Prints the CPU, the flags that decide reduced-precision speed, torch's CPU kernel level, then for
each matmul shape the GFLOP/s of every dtype (best of ``--repeats``, dtypes interleaved so load
falls on all of them) with the ratio to float32 and the float32 peak of the cores as the floor;
then a forward pass of a real model (``--model-dir``, e.g. ``results/models/smol``) in float32 and
bfloat16 with tokens/s and the largest logit difference. This is what ``dtype: auto`` decides on:
where bfloat16 is not faster than float32, it runs float32.

    python benchmarks/bf16_kernels.py
    python benchmarks/bf16_kernels.py --model-dir results/models/smol --tokens 256
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from fnprune.precision import cpu_info, native, resolve_dtype

SHAPES = [  # (m, k, n): SmolLM2's MLP up and down at 2,048 tokens, a LLaMA-7B MLP up at 4,096 tokens
    (2048, 576, 1536),
    (2048, 1536, 576),
    (4096, 4096, 11008),
]


def cpu_mhz() -> float | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except OSError:
        pass
    return None


def fp32_peak(threads: int) -> tuple[float | None, str]:
    """The cores' float32 peak: FMA lanes (AVX-512: 16, AVX2: 8) x 2 FLOP x 2 FMA units x clock."""
    flags = set(cpu_info()["flags"])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = cpu_mhz()
    if mhz is None:
        return None, "clock unknown"
    per_cycle = lanes * 2 * 2
    return threads * mhz * 1e6 * per_cycle / 1e9, f"{threads} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmuls(dtypes: list[str], repeats: int, budget_s: float) -> None:
    threads = torch.get_num_threads()
    peak, how = fp32_peak(threads)
    print(f"float32 peak (the floor of a float32 matmul): {peak:.0f} GFLOP/s ({how})" if peak else how)
    print(f"{'shape m x k x n':>22} " + " ".join(f"{d + ' GFLOP/s':>18}" for d in dtypes) + "   ratio to float32")
    for m, k, n in SHAPES:
        rates, cut = {}, {}
        for dt in dtypes:
            # a dtype without native kernels can take many minutes at the 7B shape: its rows are cut
            # so that one product fits the budget (the rate of a row block is the rate of the product)
            b = torch.randn(k, n).to(getattr(torch, dt))
            probe = torch.randn(min(m, 64), k).to(getattr(torch, dt))
            t_probe = best_time(functools.partial(torch.matmul, probe, b), 1)
            rows = min(m, max(probe.shape[0], int(budget_s / repeats / t_probe * probe.shape[0])))
            a = torch.randn(rows, k).to(getattr(torch, dt))
            rates[dt] = 2 * rows * k * n / best_time(functools.partial(torch.matmul, a, b), repeats) / 1e9
            cut[dt] = rows
        ratios = " ".join(f"{d}: {rates[d] / rates['float32']:.2f}x" for d in dtypes if d != "float32")
        note = "; ".join(f"{d} on {cut[d]} rows" for d in dtypes if cut[d] < m)
        print(
            f"{m:>6} x {k:>5} x {n:>5} "
            + " ".join(f"{rates[d]:>18.1f}" for d in dtypes)
            + f"   {ratios}"
            + (f" ({note})" if note else "")
        )


def forward(model_dir: str, tokens: int, batch: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    print(f"\nforward of {model_dir}: {batch} x {tokens} tokens, best of {repeats} (LM head included)")
    ids = torch.randint(0, 1000, (batch, tokens))
    out = {}
    for dt in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dt)).eval()
        with torch.no_grad():
            s = best_time(functools.partial(model, input_ids=ids, use_cache=False), repeats)
            logits = model(input_ids=ids, use_cache=False).logits.float()
        out[dt] = (s, logits)
        print(f"  {dt:>9}: {batch * tokens / s:10.1f} tokens/s ({s:.2f} s)")
    diff = (out["float32"][1] - out["bfloat16"][1]).abs().max().item()
    print(
        f"  bfloat16 vs float32: {out['float32'][0] / out['bfloat16'][0]:.2f}x the speed; largest logit difference {diff:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=20.0, help="time for the repeats of one slow product")
    ap.add_argument("--model-dir", help="a model directory (safetensors) for the forward pass")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"CPU: {info['model']}; flags: {', '.join(info['flags'])}")
    print(
        f"torch {torch.__version__}, cpu_capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"
    )
    print(
        f"native bfloat16: {native('bfloat16', info)}, native float16: {native('float16', info)}; "
        f"dtype auto resolves to {resolve_dtype('auto', 0, info)} here\n"
    )
    matmuls(["float32", "bfloat16", "float16"], args.repeats, args.budget_s)
    if args.model_dir:
        forward(args.model_dir, args.tokens, args.batch, args.repeats)


if __name__ == "__main__":
    main()
