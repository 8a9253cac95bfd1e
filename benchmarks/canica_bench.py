"""CanICA at LLaMA-7B layer scale: the torch backend against `exact` and `nilearn`, side by side.

Each backend runs in its own subprocess on the same input, so its peak extra memory (max RSS
after the input is loaded, minus RSS before) is its own. Prints one table and the ratios.

    python benchmarks/canica_bench.py                      # 5000 tokens x 22016 signals, k=128
    python benchmarks/canica_bench.py --real results/tiny/acts/b0   # real activations (shards kept with --notemp)
    python benchmarks/canica_bench.py --device cuda --layers 32     # GPU: all layers of one 7B batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic(args):
    from fnprune.synthetic import planted_networks

    return planted_networks(
        args.tokens,
        args.signals,
        args.networks,
        args.network_size,
        noise=args.noise,
        seed=args.data_seed,
        n_background=args.background,
    )


def load_input(args) -> tuple[np.ndarray, np.ndarray | None]:
    if args.real:
        x = np.load(Path(args.real) / f"L{args.layer}.npy").astype(np.float32)
        return x, None
    cache = OUT / (
        f"planted_{args.tokens}x{args.signals}_n{args.networks}x{args.network_size}_"
        f"bg{args.background}_noise{args.noise}_s{args.data_seed}.npz"
    )
    if not cache.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        x, member = synthetic(args)
        np.savez(cache, x=x, member=member)
    with np.load(cache) as z:
        return z["x"], z["member"]


def worker(args) -> None:
    import torch

    from fnprune.ica import canica

    torch.set_num_threads(args.threads)
    x, _ = load_input(args)
    base = rss_mb()
    t0 = time.perf_counter()
    res = canica(x, args.k, backend=args.backend, seed=args.seed)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(OUT / f"scores_{args.tag}.npy", res.scores)
    print(
        json.dumps(
            {
                "backend": args.backend,
                "seed": args.seed,
                "wall_s": wall,
                "converged": res.converged,
                "n_iter": res.n_iter,
                "extra_mb": peak - base,
                "info": res.info,
            }
        )
    )


def dice_top(a: np.ndarray, b: np.ndarray, keep: float) -> float:
    from fnprune.mask import dice

    n = int(round(keep * len(a)))
    ma, mb = np.zeros(len(a), bool), np.zeros(len(b), bool)
    ma[np.argsort(-a)[:n]] = True
    mb[np.argsort(-b)[:n]] = True
    return dice(ma, mb)


def compare(args) -> None:
    from fnprune.synthetic import auroc

    OUT.mkdir(parents=True, exist_ok=True)
    x, member = load_input(args)
    shape = x.shape
    del x
    runs = [("exact", 0), ("exact", 1), ("torch", 0), ("torch", 1), ("nilearn", 0)]
    results = {}
    for backend, seed in runs:
        if backend not in args.backends:
            continue
        tag = f"{backend}_{seed}_{'real' if args.real else 'syn'}"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--backend",
            backend,
            "--seed",
            str(seed),
            "--tag",
            tag,
            *sys.argv[1:],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{backend} seed {seed} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["scores"] = np.load(OUT / f"scores_{tag}.npy")
        results[(backend, seed)] = r
        print(f"  ran {backend} seed {seed}: {r['wall_s']:.1f} s", file=sys.stderr)

    ref = results[("exact", 0)]["scores"]
    seed_dice = dice_top(ref, results[("exact", 1)]["scores"], args.keep)
    what = f"real activations {args.real}/L{args.layer}.npy" if args.real else "planted synthetic"
    print(
        f"\nCanICA, {what} ({shape[0]} tokens x {shape[1]} signals): "
        f"k={args.k}, threads={args.threads}, keep fraction {args.keep}"
    )
    print(
        f"{'backend':8} {'seed':>4} {'wall s':>8} {'iters':>6} {'conv':>5} {'extra MB':>9} "
        f"{'AUROC':>7} {'Dice vs exact0':>15}  subspace"
    )
    for (backend, seed), r in results.items():
        au = f"{auroc(r['scores'], member):.4f}" if member is not None else "-"
        d = dice_top(ref, r["scores"], args.keep)
        print(
            f"{backend:8} {seed:>4} {r['wall_s']:>8.2f} {r['n_iter']:>6} {str(r['converged']):>5} "
            f"{r['extra_mb']:>9.0f} {au:>7} {d:>15.4f}  {r['info'].get('subspace')}"
        )
    t_exact = np.mean([results[("exact", s)]["wall_s"] for s in (0, 1)])
    t_torch = np.mean([results[("torch", s)]["wall_s"] for s in (0, 1)])
    print(f"\nexact seed-to-seed Dice: {seed_dice:.4f}")
    print(
        f"torch seed-to-seed Dice: "
        f"{dice_top(results[('torch', 0)]['scores'], results[('torch', 1)]['scores'], args.keep):.4f}"
    )
    print(f"speedup torch vs exact: {t_exact / t_torch:.2f}x")
    if ("nilearn", 0) in results:
        print(f"speedup torch vs nilearn: {results[('nilearn', 0)]['wall_s'] / t_torch:.2f}x")
    if member is not None:
        print(f"AUROC torch0 - exact0: {auroc(results[('torch', 0)]['scores'], member) - auroc(ref, member):+.4f}")
    print(
        f"Dice(torch0, exact0) - Dice(exact0, exact1): {dice_top(ref, results[('torch', 0)]['scores'], args.keep) - seed_dice:+.4f}"
    )


def gpu_layers(args) -> None:
    import torch

    from fnprune.ica import canica_torch, canica_torch_layers
    from fnprune.shards import LAYER_SEED_STRIDE
    from fnprune.synthetic import auroc

    x, member = synthetic(args)
    xs = torch.from_numpy(x).cuda()
    canica_torch(xs[:, :2048], 16, seed=0, device="cuda")  # warm-up (CUDA context, kernels)
    for name, batched in (("layer by layer", False), ("layers batched", True)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        seeds = [LAYER_SEED_STRIDE * layer for layer in range(args.layers)]  # as ica_batch seeds layers
        if batched:
            res = canica_torch_layers([xs] * args.layers, args.k, seeds, device="cuda")
        else:
            res = [canica_torch(xs, args.k, seed=s, device="cuda") for s in seeds]
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        print(
            f"GPU {torch.cuda.get_device_name()} ({name}): {args.layers} layers of {args.tokens} tokens x "
            f"{args.signals} signals, k={args.k}: {total:.2f} s total, {total / args.layers:.3f} s per layer"
        )
        print(
            "  iterations:",
            [r.n_iter for r in res],
            "all converged:",
            all(r.converged for r in res),
            "subspace:",
            sorted({r.info["subspace"] for r in res}),
        )
        print(
            f"  planted AUROC (layer 0): {auroc(res[0].scores, member):.4f}; peak GPU memory "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--signals", type=int, default=22016)
    p.add_argument("--networks", type=int, default=128)
    p.add_argument("--network-size", type=int, default=15)
    p.add_argument("--background", type=int, default=96)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["exact", "torch", "nilearn"])
    p.add_argument("--real", help="a shard directory (L{layer}.npy files) instead of synthetic data")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=32, help="with --device cuda: layers timed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.device == "cuda":
        gpu_layers(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
