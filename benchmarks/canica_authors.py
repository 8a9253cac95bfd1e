"""fnprune's CanICA against the authors' own algorithm, side by side, at the authors' cost.

The reference (:func:`authors_canica`) performs the operations of the authors' code
(WhatAboutMyStar/LLM_ACTIVATION, ``llmfact/decomposition/canica.py`` ``CanICA.fit`` and
``llmfact/decomposition/fastica.py``; ``llmfact/utils.py`` ``z_score_signals``), step by step,
at the same cost (same calls, dtypes, matrix orientations and copies); it is written here, not
copied. fnprune: ``fnprune.ica.canica(x, k, "torch", seed, solver=...)`` (Gram matrix of the
smaller dimension, subspace iteration checked for convergence, then FastICA or Picard-O).

Both run in this process on the same input, interleaved (reference seed s, fnprune with each
solver at seed s, ...), so load from other processes falls on all of them; the ratios are the
measurement, the absolute seconds depend on the load. Quality: planted AUROC and the Dice of the
kept sets when 20% of the signals are pruned (the 80% with the highest scores), fnprune against
the reference's first seed, next to the reference's own seed-to-seed Dice. Beside the
measurement the physical floor of fnprune's route on this machine: the Gram matrix's FLOPs at the
float32 matmul rate measured in the same run, the subspace-iteration products fnprune ran, and
its ICA iterations' two (k x k x N) float64 products each at the float64 rate measured at that
shape.

Planted inputs (``--inputs``, both by default): ``flat`` (128 networks of 15 signals, 96 dense
background components and white noise: more sources than components, a spectrum flat around k,
FastICA does not reach tol in 300 iterations) and ``gap`` (the same 128 networks and noise, no
background: a clear spectral gap at k, FastICA converges).

    python benchmarks/canica_authors.py                                   # flat and gap, 5000 x 22016, k = 128
    python benchmarks/canica_authors.py --inputs flat --seeds 0 1 2
    python benchmarks/canica_authors.py --shards results/smol/acts/b0 --k 64 --solvers picard
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PLANTED = {  # name: keyword arguments of fnprune.synthetic.planted_networks
    "flat": dict(n_networks=128, network_size=15, noise=1.0, n_background=96),
    "gap": dict(n_networks=128, network_size=15, noise=1.0, n_background=0),
}


def _authors_zscore(x: torch.Tensor) -> torch.Tensor:
    """``z_score_signals``: per-signal mean and std over tokens, a centred copy divided in place
    (std below the dtype's eps counts as 1)."""
    mean, std = x.mean(0), x.std(0)
    out = x - mean
    std = torch.where(std < torch.finfo(x.dtype).eps, torch.ones((), dtype=x.dtype), std)
    out /= std
    return out


def _authors_sym(w: torch.Tensor) -> torch.Tensor:
    """Their ``_sym_decorrelation``: ``(W W^T)^{-1/2} W`` by ``eigh`` of ``W W^T``."""
    s, u = torch.linalg.eigh(w @ w.T)
    s = s.clamp(min=torch.finfo(w.dtype).tiny)
    return ((u * (1.0 / s.sqrt())) @ u.T) @ w


def authors_canica(x: np.ndarray, k: int, seed: int, max_iter: int = 300, tol: float = 1e-4) -> dict:
    """The authors' CanICA, operation for operation (their step in brackets):

    1. [``z_score_signals`` after extraction, then ``.to(torch.float64)``] z-score every signal
       over the tokens in the input's dtype; a float64 copy of the (tokens x signals) matrix.
    2. [``CanICA.fit``] ``setup_seed(random_state)`` (here a generator seeded the same way);
       ``torch.tensor(signals, dtype=torch.float32)``: a float32 copy.
    3. [``CanICA.fit``] ``U, _, _ = torch.linalg.svd(signals.T, full_matrices=False)``: the full
       float32 SVD of the (signals x tokens) matrix, all three factors computed; the top-k left
       singular vectors are the (signals x k) components.
    4. [``fastica``/``FastICA.fit``] a float64 copy of the components; transposed view (k x N),
       centred in place; whitening by ``torch.linalg.svd`` of that (k x N) float64 matrix
       (``full_matrices=False``, all factors computed, ``u`` and ``d`` kept), ``u`` sign-fixed
       by its first row, ``K = (u / d)^T``, ``X1 = K X * sqrt(N)``.
    5. [``FastICA.fit``] ``w_init = torch.randn((k, k), dtype=float64)`` from the seeded
       generator.
    6. [``_ica_par`` with ``_cube``] symmetric decorrelation of ``w_init``, then per step
       ``wx = W X1``, ``g = wx**3``, ``g' = (3 wx**2).mean(-1)``,
       ``W1 = sym(g X1^T / N - g'[:, None] W)``, ``lim = max(|(|diag(W1 W^T)| - 1)|)`` with
       Python's ``max`` over the tensor, ``W = W1``, stop when ``lim < tol``; ``max_iter`` 300,
       tol 1e-4 (``CanICA.fit``'s values).
    7. [``FastICA.fit``] ``S = ((W K) X)^T``, divided by its per-component std (``W`` too),
       ``components_ = W K``, ``mixing_ = pinv(components_)``.
    8. [``CanICA.fit``] the maps ``S^T`` z-scored per map (mean and std over signals); the score
       of a signal is its maximum ``|z|`` over the maps.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    signals = _authors_zscore(torch.as_tensor(x)).to(torch.float64)  # 1
    signals = signals.to(torch.float32)  # 2: a copy (torch.tensor(..., dtype=torch.float32))
    u_full, _, _ = torch.linalg.svd(signals.T, full_matrices=False)  # 3
    del signals
    components = u_full[:, :k]
    x64 = components.to(torch.float64)  # 4
    del u_full, components
    xt = x64.T
    n_features, n_samples = xt.shape
    xt -= xt.mean(dim=-1)[:, None]
    u, d = torch.linalg.svd(xt, full_matrices=False)[:2]
    u *= torch.sign(u[0])
    kw = (u / d).T[:k]
    x1 = kw @ xt
    x1 *= torch.sqrt(torch.tensor(n_samples))
    w_init = torch.randn((k, k), dtype=x1.dtype, generator=gen)  # 5
    w = _authors_sym(w_init)  # 6
    p_ = float(x1.shape[1])
    converged, n_iter = False, max_iter
    for ii in range(max_iter):
        wx = w @ x1
        gwtx, g_wtx = wx**3, (3 * wx**2).mean(dim=-1)
        w1 = _authors_sym((gwtx @ x1.T) / p_ - g_wtx[:, None] * w)
        lim = max(abs(abs(torch.einsum("ij,ij->i", w1, w)) - 1))
        w = w1
        if lim < tol:
            converged, n_iter = True, ii + 1
            break
    s = ((w @ kw) @ xt).T  # 7
    s_std = torch.std(s, dim=0, keepdim=True)
    s /= s_std
    w /= s_std.T
    torch.linalg.pinv(w @ kw)
    maps = s.T  # 8
    z = (maps - maps.mean(dim=1, keepdim=True)) / maps.std(dim=1, keepdim=True)
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
        "power_iter": r.info.get("power_iter"),
    }


def kept(scores: np.ndarray, prune: float) -> np.ndarray:
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[: int(round((1 - prune) * len(scores)))]] = True
    return keep


def inputs(args):
    """(name, matrix, planted membership or None, seed offset) per input of the run."""
    if args.shards:
        from fnprune.shards import LAYER_SEED_STRIDE, load_shard

        paths = sorted(Path(args.shards).glob("L*.npy"), key=lambda p: int(p.stem[1:]))
        for p in paths[: args.layers or None]:
            yield p.stem, load_shard(p), None, LAYER_SEED_STRIDE * int(p.stem[1:])
        return
    from fnprune.synthetic import planted_networks

    for name in args.inputs:
        kw = PLANTED[name]
        cache = (
            HERE
            / "out"
            / (
                f"planted_{args.tokens}x{args.signals}_n{kw['n_networks']}x{kw['network_size']}"
                f"_bg{kw['n_background']}_noise{kw['noise']}_s0.npz"
            )
        )
        if cache.exists():
            with np.load(cache) as z:
                x, member = z["x"], z["member"]
        else:
            x, member = planted_networks(args.tokens, args.signals, seed=0, **kw)
            cache.parent.mkdir(exist_ok=True)
            np.savez(cache, x=x, member=member)
        yield name, x, member, 0


def _best_rate(fn, flops: float, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return flops / best


def matmul_rates(tokens: int, signals: int, k: int) -> dict:
    """FLOP/s measured now: float32 at a Gram block's shape, float64 at the ICA step's two products."""
    m = min(tokens, signals)
    a = torch.randn(min(m, 1024), 4096)
    b = torch.randn(4096, m)
    f32 = _best_rate(lambda: a @ b, 2.0 * a.shape[0] * 4096 * m)
    w = torch.randn(k, k, dtype=torch.float64)
    xw = torch.randn(k, max(tokens, signals), dtype=torch.float64)
    f64 = _best_rate(lambda: (w @ xw) @ xw.T, 4.0 * k * k * xw.shape[1])
    return {"f32": f32, "f64": f64}


def floor_s(rates: dict, tokens: int, signals: int, k: int, r: dict) -> dict:
    """fnprune's route at the measured matmul rates: the Gram's lower block triangle (about half
    the FLOPs of the full 2 m^2 n product), the subspace-iteration products it ran (2 m^2 width
    each, width = k + k/2), and its ICA iterations (two k x k x N float64 products each)."""
    m, n = min(tokens, signals), max(tokens, signals)
    gram_full = 2.0 * m * m * n / rates["f32"]
    gram_syrk = gram_full * (8 + 1) / (2 * 8)
    width = min(m, k + max(16, k // 2))
    products = (r.get("power_iter") or 0) + 1 if r.get("subspace") == "gram-subspace-iteration" else 0
    subspace = products * 2.0 * m * m * width / rates["f32"]
    ica = r["n_iter"] * 4.0 * k * k * n / rates["f64"]
    return {
        "gram_full": gram_full,
        "gram_syrk": gram_syrk,
        "subspace": subspace,
        "ica": ica,
        "total": gram_syrk + subspace + ica,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=["flat", "gap"], choices=list(PLANTED), help="planted inputs")
    p.add_argument("--shards", help="a batch's shard directory (L{layer}.npy) instead of the planted inputs")
    p.add_argument("--layers", type=int, default=0, help="with --shards: the first n layers only (0: all)")
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--signals", type=int, default=22016)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--solvers", nargs="+", default=["fastica", "picard"], choices=["fastica", "picard"])
    p.add_argument("--prune", type=float, default=0.2, help="fraction of signals pruned for the Dice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON of the per-input results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from fnprune.mask import dice
    from fnprune.synthetic import auroc

    impls = ["ref"] + args.solvers
    rows, wall = [], {i: 0.0 for i in impls}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'input':>8} {'impl':>8} {'seed':>4} {'wall s':>8} {'iters':>5} {'conv':>5} {'AUROC':>7}  subspace")
    for name, x, member, offset in inputs(args):
        res = {}
        for seed in args.seeds:  # interleaved: the reference and each fnprune solver at each seed in turn
            res[("ref", seed)] = authors_canica(x, args.k, seed + offset)
            for solver in args.solvers:
                res[(solver, seed)] = fnprune_canica(x, args.k, seed + offset, solver)
            for impl in impls:
                r = res[(impl, seed)]
                r["auroc"] = auroc(r["scores"], member) if member is not None else None
                print(
                    f"{name:>8} {impl:>8} {seed:>4} {r['wall_s']:8.2f} {r['n_iter']:5d} {str(r['converged']):>5} "
                    + (f"{r['auroc']:7.4f}" if r["auroc"] is not None else "      -")
                    + (f"  {r['subspace']} ({r['power_iter']} steps)" if impl != "ref" else "  full float32 SVD"),
                    flush=True,
                )
        t, n = x.shape
        row = {"input": name, "k": args.k, "signals": int(n), "tokens": int(t)}
        for (impl, seed), r in res.items():
            row[f"{impl}{seed}"] = {kk: v for kk, v in r.items() if kk != "scores"}
        ref0 = kept(res[("ref", args.seeds[0])]["scores"], args.prune)
        refs = [kept(res[("ref", s)]["scores"], args.prune) for s in args.seeds]
        row["dice_ref_seed_to_seed"] = float(
            np.mean([dice(refs[i], refs[j]) for i in range(len(refs)) for j in range(i + 1, len(refs))])
        )
        for solver in args.solvers:
            row[f"dice_{solver}_vs_ref"] = float(
                np.mean([dice(kept(res[(solver, s)]["scores"], args.prune), ref0) for s in args.seeds])
            )
        walls = {i: sum(res[(i, s)]["wall_s"] for s in args.seeds) for i in impls}
        for i in impls:
            wall[i] += walls[i]
        row["wall_s"] = walls
        print(f"\n[{name}] wall over {len(args.seeds)} seeds: " + ", ".join(f"{i} {walls[i]:.1f} s" for i in impls))
        for solver in args.solvers:
            per_seed = [res[("ref", s)]["wall_s"] / res[(solver, s)]["wall_s"] for s in args.seeds]
            row[f"ratio_{solver}"] = walls["ref"] / walls[solver]
            print(
                f"[{name}] authors / fnprune {solver}: {walls['ref'] / walls[solver]:.2f}x "
                f"(per seed {', '.join(f'{v:.2f}' for v in per_seed)})"
            )
        print(
            f"[{name}] Dice at {args.prune:.0%} pruned vs the reference's seed {args.seeds[0]}: "
            + ", ".join(f"{s} {row[f'dice_{s}_vs_ref']:.4f}" for s in args.solvers)
            + f"; reference seed-to-seed {row['dice_ref_seed_to_seed']:.4f}"
        )
        if member is not None:
            mean_a = {i: float(np.mean([res[(i, s)]["auroc"] for s in args.seeds])) for i in impls}
            row["auroc_mean"] = mean_a
            print(f"[{name}] planted AUROC, mean over seeds: " + ", ".join(f"{i} {mean_a[i]:.4f}" for i in impls))
        if "fastica" in args.solvers:
            rates = matmul_rates(t, n, args.k)
            fl = floor_s(rates, t, n, args.k, res[("fastica", args.seeds[0])])
            row["floor_fastica_seed0"] = fl | {"rates_gflops": {kk: v / 1e9 for kk, v in rates.items()}}
            print(
                f"[{name}] floor of fnprune fastica (seed {args.seeds[0]}) at the rates measured now "
                f"(float32 {rates['f32'] / 1e9:.0f} GFLOP/s, float64 {rates['f64'] / 1e9:.0f} GFLOP/s): "
                f"Gram {fl['gram_syrk']:.1f} s (full product {fl['gram_full']:.1f} s) + subspace products "
                f"{fl['subspace']:.1f} s + {res[('fastica', args.seeds[0])]['n_iter']} ICA steps {fl['ica']:.1f} s "
                f"= {fl['total']:.1f} s; measured {res[('fastica', args.seeds[0])]['wall_s']:.1f} s"
            )
        print(flush=True)
        rows.append(row)
    n_runs = len(rows) * len(args.seeds)
    conv = {i: sum(row[f"{i}{s}"]["converged"] for row in rows for s in args.seeds) for i in impls}
    print(
        f"wall over {len(rows)} input(s) x {len(args.seeds)} seeds: " + ", ".join(f"{i} {wall[i]:.1f} s" for i in impls)
    )
    for solver in args.solvers:
        print(f"authors / fnprune {solver}, all inputs: {wall['ref'] / wall[solver]:.2f}x")
    print(
        "converged runs (FastICA's test, tol 1e-4, 300 iterations): "
        + ", ".join(f"{i} {conv[i]}/{n_runs}" for i in impls)
    )
    if len(rows) > 2:  # paired over inputs (layers): is fnprune's agreement below the reference's own?
        from scipy import stats

        for solver in args.solvers:
            diff = np.subtract([r[f"dice_{solver}_vs_ref"] for r in rows], [r["dice_ref_seed_to_seed"] for r in rows])
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
            print(
                f"Dice {solver} vs reference minus reference seed-to-seed, paired over the {len(diff)} inputs: "
                f"{diff.mean():+.4f} [95% CI {diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "wall_s": wall, "converged": conv, "runs": n_runs, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
