"""Helpers shared by the tests (imported as ``from helpers import ...``; fixtures live in conftest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fnprune.mask import mask_record

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CONFIGS = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "micro.yaml")]


def snakemake(
    workdir: Path,
    *args: str,
    timeout: int = 1500,
    check: bool = True,
    env: dict | None = None,
    configs: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run the real snakemake on the repository's Snakefile in ``workdir`` with the micro config
    (and ``configs`` merged over it)."""
    cmd = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "2",
        *args,
        "--configfile",
        *CONFIGS,
        *configs,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@torch.no_grad()
def logits_with_fixed_inputs(model, fixed, **inputs) -> torch.Tensor:
    """Logits of ``model`` with input channels of some linears overwritten.

    ``fixed`` is a list of ``(linear, channels, values)``: the ``channels`` of that linear's
    input are set to ``values`` (zero to drop them, a mean to compensate them).
    """

    def hook(idx, val):
        def pre(mod, args):
            x = args[0].clone()
            x[..., idx] = val.to(x.dtype)
            return (x,)

        return pre

    handles = [lin.register_forward_pre_hook(hook(idx, val)) for lin, idx, val in fixed]
    try:
        return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


def tiny_llama(
    n_kv: int,
    vocab: int = 97,
    layers: int = 4,
    heads: int = 4,
    head_dim: int = 16,
    inter: int = 128,
    attn: str = "sdpa",
    seed: int = 0,
):
    """A small random LLaMA (``n_kv`` key/value heads: grouped-query when fewer than ``heads``), float32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=64,
        initializer_range=0.1,
        architectures=["LlamaForCausalLM"],
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float().eval()


def mask_for(
    kept,
    sizes,
    prunable,
    method: str = "c16_torch",
    ratio: float = 0.2,
    neuron_params: int = 1,
    n_drop: int | None = None,
    **extra,
) -> dict:
    """A mask record (fnprune.mask.mask_record) of hand-picked kept neurons; the kind follows the method."""
    kind = "ica" if method.startswith("c") and method[1:2].isdigit() else "baseline"
    block = sum(sizes) * neuron_params
    if n_drop is None:
        n_drop = round(ratio * sum(sizes))
    return mask_record(
        [np.asarray(k, dtype=np.int64) for k in kept],
        list(sizes),
        block,
        2 * block,
        neuron_params,
        method=method,
        kind=kind,
        ratio_requested=ratio,
        prunable=list(prunable),
        n_drop=n_drop,
        min_keep=extra.pop("min_keep", 1),
        selection=extra.pop("selection", "global"),
        **extra,
    )
