"""bfloat16 against float32 on the same model, ratio and methods: does any conclusion change?

Reads the metrics and masks the workflow wrote for two slugs of one model's weights, one run in
float32 and one in bfloat16 (``config/bf16.yaml``: ``smol`` and its alias ``smol_bf16``), and prints
side by side, per method:

- perplexity, bfloat16 / float32, with a 95% interval paired over windows;
- multiple-choice accuracy, bfloat16 - float32, with a 95% interval paired over items;
- the Dice of the two runs' kept sets (the mask), beside FastICA's own seed-to-seed Dice (float32
  masks of two ICA starts, ``c64`` and ``c64_s1``): the level below which a dtype would move the
  mask more than the ICA start does;
- the ranking of the methods by perplexity in each dtype, and which methods are tied with the best.

    snakemake --cores 2 comparison --configfile config/bf16.yaml
    python benchmarks/bf16_validate.py --f32 smol --bf16 smol_bf16 --ratio 20

Run it where bfloat16 is native (a CPU with AVX512-BF16 or AMX, or a GPU): elsewhere the bfloat16
targets take many times longer than the float32 ones (``benchmarks/bf16_kernels.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fnprune.mask import dice, kept_vector, prunable_layers
from fnprune.tables import _item_scores, _window_nll, paired_ratio, paired_t

METHODS = ["c64", "c64_bias", "c64_hybrid", "random", "magnitude", "wanda_sp", "flap", "flap_mlp"]


def metrics(results: Path, model: str, ratio: int, method: str) -> dict | None:
    target = f"{model}_dense" if method == "dense" else f"{model}_r{ratio}_{method}"
    p = results / target / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else None


def kept(results: Path, model: str, ratio: int, method: str) -> list | None:
    """The kept neurons of every layer (the pruned model's sidecar), or None when not built."""
    p = results / f"{model}_r{ratio}_{method}" / "model" / "fnprune.json"
    return json.loads(p.read_text())["kept"] if p.is_file() else None


def mask_dice(a: list | None, b: list | None, sizes: list[int], protect: tuple[int, int]) -> float | None:
    """Dice of two kept sets over the prunable layers (``sizes``: the dense layer widths)."""
    if a is None or b is None:
        return None
    layers = [i for i, p in enumerate(prunable_layers(len(sizes), *protect)) if p]
    return dice(kept_vector(a, sizes, layers), kept_vector(b, sizes, layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--f32", default="smol")
    ap.add_argument("--bf16", default="smol_bf16")
    ap.add_argument("--ratio", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ppl", default="flap_token_ppl@128")
    ap.add_argument("--mc", default="fnprune_mc:acc")
    ap.add_argument("--seed-pair", nargs=2, default=("c64", "c64_s1"), help="two ICA starts of one method (float32)")
    ap.add_argument("--protect", type=int, nargs=2, default=(3, 2), help="first and last blocks never pruned")
    args = ap.parse_args()
    res = Path(args.results)

    rows, ppl, recs, sizes, protect = [], {}, {}, None, tuple(args.protect)
    for method in ["dense", *args.methods]:
        a = metrics(res, args.f32, args.ratio, method)
        b = metrics(res, args.bf16, args.ratio, method)
        if a is None or b is None:
            print(f"{method}: missing ({'float32' if a is None else 'bfloat16'} metrics.json); skipped")
            continue
        if not rows:
            for name, rec in (("float32", a), ("bfloat16", b)):
                k = (rec.get("kernels") or {}).get("perplexity") or {}
                print(
                    f"{name}: {rec['target']} ran {k.get('dtype')} on {k.get('device')} ({k.get('cpu')}, native {k.get('cpu_native')})"
                )
            print()
        what = f"{b['target']} vs {a['target']}"
        r, lo, hi = paired_ratio(_window_nll(b, args.ppl), _window_nll(a, args.ppl), what=what)
        ia, ib = _item_scores(a, args.mc), _item_scores(b, args.mc)
        acc = paired_t(ib, ia, what=what) if ia and ib else None
        sizes = sizes or b.get("intermediate_sizes")
        d = mask_dice(kept(res, args.f32, args.ratio, method), kept(res, args.bf16, args.ratio, method), sizes, protect)
        ppl[method] = (a["perplexity"][args.ppl], b["perplexity"][args.ppl])
        recs[method] = (a, b)
        rows.append((method, r, lo, hi, acc, d))

    print(
        f"{'method':<12} {'ppl f32':>9} {'ppl bf16':>9} {'bf16/f32 [95% over windows]':>30} {'acc bf16-f32 [95% over items]':>32} {'mask Dice':>10}"
    )
    for method, r, lo, hi, acc, d in rows:
        acc_s = f"{acc[0]:+.4f} [{acc[1]:+.4f}, {acc[2]:+.4f}]" if acc else "n/a"
        print(
            f"{method:<12} {ppl[method][0]:9.3f} {ppl[method][1]:9.3f} {f'{r:.4f} [{lo:.4f}, {hi:.4f}]':>30} "
            f"{acc_s:>32} {'' if d is None else f'{d:.4f}':>10}"
        )
    a, b = args.seed_pair
    seed = mask_dice(kept(res, args.f32, args.ratio, a), kept(res, args.f32, args.ratio, b), sizes, protect)
    print(f"\nFastICA seed-to-seed Dice (float32, {a} vs {b}): {'not built' if seed is None else f'{seed:.4f}'}")

    pruned = [m for m in ppl if m != "dense"]
    orders = [sorted(pruned, key=lambda m, i=i: ppl[m][i]) for i in (0, 1)]
    for order, name in zip(orders, ("float32", "bfloat16")):
        print(f"ranking by perplexity, {name}: {' < '.join(order)}")
    print(f"same ranking: {orders[0] == orders[1]}")
    for i, name in enumerate(("float32", "bfloat16")):
        best = orders[i][0]
        nll = {m: _window_nll(recs[m][i], args.ppl) for m in pruned}
        tied = [m for m in pruned if m == best or paired_ratio(nll[m], nll[best])[1] <= 1.0]
        print(f"best and tied with it (95% paired over windows), {name}: {', '.join(tied)}")


if __name__ == "__main__":
    main()
