"""fnprune's CanICA against a faithful torch implementation of the authors' algorithm, side by side.

The reference (:func:`authors_canica`, written here as fast as that algorithm can be written):
z-score every signal over the tokens; full float32 SVD of the (tokens x signals) matrix; its top-k
right singular vectors as the k x N spatial components; parallel FastICA with symmetric
decorrelation, ``cube``, float64, tol 1e-4, max_iter 300, started from scikit-learn's seeded normal
matrix, on a contiguous (k x N) layout; the maps z-scored across signals; per signal the maximum
``|z|`` over maps. fnprune: ``fnprune.ica.canica(x, k, "torch", seed, solver=...)`` (Gram matrix
of the smaller dimension, subspace iteration checked for convergence, then Picard-O or FastICA).

Both run in this process on the same input, interleaved (reference seed s, fnprune seed s, ...),
so load from other processes falls on both. Quality: planted AUROC (planted input) and the Dice
of the kept sets when 20% of the signals are pruned (the 80% with the highest scores), fnprune
against the reference's first seed, next to the reference's own seed-to-seed Dice.

    python benchmarks/canica_authors.py                                   # planted, 5000 x 22016, k = 128
    python benchmarks/canica_authors.py --shards results/smol/acts/b0 --k 64   # every layer of one batch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def zscore_signals(x: torch.Tensor) -> torch.Tensor:
    std = x.std(0, keepdim=True)
    return (x - x.mean(0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def _sym(w: torch.Tensor) -> torch.Tensor:
    s, u = torch.linalg.eigh(w @ w.T)
    return (u * s.clamp(min=torch.finfo(w.dtype).tiny).rsqrt()) @ u.T @ w


def authors_canica(x: np.ndarray, k: int, seed: int, max_iter: int = 300, tol: float = 1e-4) -> dict:
    """The authors' algorithm: full float32 SVD, then float64 parallel FastICA (cube)."""
    t0 = time.perf_counter()
    xz = zscore_signals(torch.as_tensor(x, dtype=torch.float32))
    _, _, vh = torch.linalg.svd(xz, full_matrices=False)
    comp = vh[:k].double().contiguous()  # k x N: signals are the samples
    del xz, vh
    n = comp.shape[1]
    xc = comp - comp.mean(1, keepdim=True)
    d, e = torch.linalg.eigh(xc @ xc.T / n)
    xw = ((e * d.clamp(min=1e-12 * float(d.max())).rsqrt()).T @ xc).contiguous()
    w = _sym(torch.from_numpy(np.random.RandomState(seed).standard_normal((k, k))))
    converged, n_iter = False, max_iter
    for it in range(1, max_iter + 1):
        wx = w @ xw
        w1 = _sym((wx * wx * wx) @ xw.T / n - 3.0 * (wx * wx).mean(1, keepdim=True) * w)
        lim = float(((w1 * w).sum(1).abs() - 1).abs().max())
        w = w1
        if lim < tol:
            converged, n_iter = True, it
            break
    s = w @ xw
    z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)
    return {
        "scores": z.abs().amax(0).float().numpy(),
        "converged": converged,
        "n_iter": n_iter,
        "wall_s": time.perf_counter() - t0,
    }


def fnprune_canica(x: np.ndarray, k: int, seed: int, solver: str) -> dict:
    from fnprune.ica import canica

    t0 = time.perf_counter()
    r = canica(x, k, "torch", seed=seed, solver=solver)
    return {
        "scores": r.scores,
        "converged": r.converged,
        "n_iter": r.n_iter,
        "wall_s": time.perf_counter() - t0,
        "subspace": r.info.get("subspace"),
    }


def kept(scores: np.ndarray, prune: float) -> np.ndarray:
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[: int(round((1 - prune) * len(scores)))]] = True
    return keep


def inputs(args):
    """(name, matrix, planted membership or None, seed offset) per layer of the run."""
    if args.shards:
        from fnprune.shards import LAYER_SEED_STRIDE, load_shard

        paths = sorted(Path(args.shards).glob("L*.npy"), key=lambda p: int(p.stem[1:]))
        for p in paths[: args.layers or None]:
            yield p.stem, load_shard(p), None, LAYER_SEED_STRIDE * int(p.stem[1:])
        return
    from fnprune.synthetic import planted_networks

    cache = HERE / "out" / f"planted_{args.tokens}x{args.signals}_n128x15_bg96_noise1.0_s0.npz"
    if cache.exists():
        with np.load(cache) as z:
            x, member = z["x"], z["member"]
    else:
        x, member = planted_networks(args.tokens, args.signals, 128, 15, noise=1.0, seed=0, n_background=96)
        cache.parent.mkdir(exist_ok=True)
        np.savez(cache, x=x, member=member)
    yield "planted", x, member, 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a batch's shard directory (L{layer}.npy) instead of the planted input")
    p.add_argument("--layers", type=int, default=0, help="with --shards: the first n layers only (0: all)")
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--signals", type=int, default=22016)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--solver", default="fastica", choices=["fastica", "picard"])
    p.add_argument("--prune", type=float, default=0.2, help="fraction of signals pruned for the Dice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON of the per-layer results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from fnprune.mask import dice
    from fnprune.synthetic import auroc

    rows, ref_wall, ours_wall = [], 0.0, 0.0
    print(f"{'input':>8} {'impl':>8} {'seed':>4} {'wall s':>8} {'iters':>5} {'conv':>5} {'AUROC':>7}")
    for name, x, member, offset in inputs(args):
        res = {}
        for seed in args.seeds:  # interleaved: the reference and fnprune at each seed in turn
            res[("ref", seed)] = authors_canica(x, args.k, seed + offset)
            res[("fnprune", seed)] = fnprune_canica(x, args.k, seed + offset, args.solver)
        row = {"input": name, "k": args.k, "solver": args.solver, "signals": int(x.shape[1]), "tokens": int(x.shape[0])}
        for (impl, seed), r in res.items():
            a = auroc(r["scores"], member) if member is not None else None
            row[f"{impl}{seed}"] = {kk: v for kk, v in r.items() if kk != "scores"} | {"auroc": a}
            print(
                f"{name:>8} {impl:>8} {seed:>4} {r['wall_s']:8.2f} {r['n_iter']:5d} {str(r['converged']):>5} "
                + (f"{a:7.4f}" if a is not None else "      -")
            )
        s0, s1 = args.seeds[0], args.seeds[1]
        ref0 = kept(res[("ref", s0)]["scores"], args.prune)
        row["dice_ref_seed_to_seed"] = dice(ref0, kept(res[("ref", s1)]["scores"], args.prune))
        row["dice_fnprune_vs_ref"] = float(
            np.mean([dice(kept(res[("fnprune", s)]["scores"], args.prune), ref0) for s in args.seeds])
        )
        row["kept"] = {"ref0": ref0.tolist()}
        rows.append(row)
        ref_wall += sum(res[("ref", s)]["wall_s"] for s in args.seeds)
        ours_wall += sum(res[("fnprune", s)]["wall_s"] for s in args.seeds)
    n_runs = len(rows) * len(args.seeds)
    conv = {
        impl: sum(row[f"{impl}{s}"]["converged"] for row in rows for s in args.seeds) for impl in ("ref", "fnprune")
    }
    print(
        f"\nwall over {len(rows)} input(s) x {len(args.seeds)} seeds: reference {ref_wall:.1f} s, "
        f"fnprune ({args.solver}) {ours_wall:.1f} s"
    )
    print(f"speedup fnprune vs the authors' algorithm: {ref_wall / ours_wall:.2f}x")
    print(
        f"converged runs (FastICA's test, tol 1e-4, 300 iterations): reference {conv['ref']}/{n_runs}, "
        f"fnprune {conv['fnprune']}/{n_runs}"
    )
    seed_dice = [r["dice_ref_seed_to_seed"] for r in rows]
    cross = [r["dice_fnprune_vs_ref"] for r in rows]
    print(
        f"Dice at {args.prune:.0%} pruned, mean over inputs: fnprune vs reference {np.mean(cross):.4f}, "
        f"reference seed-to-seed {np.mean(seed_dice):.4f} (difference {np.mean(cross) - np.mean(seed_dice):+.4f}; "
        f"inputs where fnprune is below: {sum(c < d for c, d in zip(cross, seed_dice))} of {len(rows)})"
    )
    if len(rows) > 2:  # paired over inputs (layers): is fnprune's agreement below the reference's own?
        from scipy import stats

        diff = np.subtract(cross, seed_dice)
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        print(
            f"Dice difference, paired over the {len(diff)} inputs: {diff.mean():+.4f} "
            f"[95% CI {diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"
        )
    if rows[0]["ref0"]["auroc"] is not None:
        ours_a = np.mean([rows[0][f"fnprune{s}"]["auroc"] for s in args.seeds])
        ref_a = np.mean([rows[0][f"ref{s}"]["auroc"] for s in args.seeds])
        print(f"planted AUROC: fnprune {ours_a:.4f}, reference {ref_a:.4f} (difference {ours_a - ref_a:+.4f})")
    if args.out:
        for r in rows:
            r.pop("kept")
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "speedup": ref_wall / ours_wall,
                    "ref_wall_s": ref_wall,
                    "fnprune_wall_s": ours_wall,
                    "converged": conv,
                    "runs": n_runs,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
