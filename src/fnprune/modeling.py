"""Loading base models, applying masks, saving and loading pruned models (never pickled).

A pruned model directory holds ``model.safetensors``, the base ``config.json``, the tokenizer
and ``fnprune.json``: the sidecar with the source model, method, ratio, seed, the kept neurons
(and heads) of every layer and the library versions. :func:`load_pruned` rebuilds the
architecture from the config, resizes each layer as the sidecar says, and loads the weights.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import adapters as A
from .io import atomic_dir, versions, write_json

log = logging.getLogger(__name__)

SIDECAR = "fnprune.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(_DTYPES)}") from None


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_config(source: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    A.get_adapter(A.architecture_of(cfg))  # fail before any work on an unknown architecture
    return cfg


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(
                f"tokenizer of {source} has neither a pad nor an eos token; "
                f"fnprune needs one to batch calibration texts"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    source: str,
    dtype: str | None = "float32",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """A base (dense) model from a local directory or a hub id, in eval mode; ``dtype`` None keeps
    the weights as stored (the checkpoint's own dtype)."""
    from transformers import AutoModelForCausalLM

    if Path(source).exists() and Path(source, SIDECAR).exists():
        return load_pruned(source, dtype=dtype, device=device)
    load_config(source, revision, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=revision, dtype=torch_dtype(dtype) if dtype else "auto", trust_remote_code=trust_remote_code
    )
    return model.to(resolve_device(device)).eval()


def shape_info(config, trust_remote_code: bool = False) -> dict:
    """Parameter counts of a dense architecture, without allocating its weights (remote-code
    architectures such as ChatGLM3 need ``trust_remote_code``, as when loading them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    return {
        "n_layers": len(blocks),
        "intermediate_sizes": [A.intermediate_size(b, ad) for b in blocks],
        "block_params": A.block_parameter_count(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "neuron_params": A.mlp_neuron_params(blocks[0], ad),
    }


def apply_mask(
    model, mask: dict, down_mean: np.ndarray | list | None = None, o_mean: np.ndarray | list | None = None
) -> None:
    """Physically remove the MLP neurons (and attention heads) that ``mask`` drops, in place.

    With ``down_mean`` (per layer, the calibration mean of each ``down_proj`` input), the
    dropped neurons' mean contribution is folded into a ``down_proj`` bias (FLAP's bias
    compensation): ``b = W_down[:, dropped] @ mean[dropped]``; ``o_mean`` does the same for the
    ``o_proj`` inputs of removed attention heads.
    """
    ad = A.adapter_for(model)
    heads = mask.get("kept_heads")
    if heads is not None:
        from .heads import head_geometry

        head_geometry(model)  # fails now, before any change, on attention it cannot prune
    for layer, (block, keep) in enumerate(zip(A.layers(model, ad), mask["kept"])):
        keep_t = torch.as_tensor(keep, dtype=torch.long)
        inter = A.intermediate_size(block, ad)
        bias = None
        if down_mean is not None:
            dropped = np.setdiff1d(np.arange(inter), np.asarray(keep, dtype=np.int64))
            w = A.mlp_linears(block, ad)["down"].weight.data
            mean = torch.as_tensor(np.asarray(down_mean[layer])[dropped], dtype=torch.float64, device=w.device)
            bias = (w[:, torch.as_tensor(dropped, device=w.device)].double() @ mean).to(w.dtype)
        if len(keep) < inter or bias is not None:
            A.prune_mlp(block, ad, keep_t, bias)
    if heads is not None:
        from .heads import prune_heads

        prune_heads(model, heads, o_mean=o_mean)


def layout_of(model) -> dict:
    """Per-layer sizes that :func:`load_pruned` needs to rebuild the module tree."""
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    out = {
        "intermediate_sizes": [A.intermediate_size(b, ad) for b in blocks],
        "down_bias": [A.mlp_linears(b, ad)["down"].bias is not None for b in blocks],
    }
    from .heads import heads_layout

    out.update(heads_layout(model))
    return out


def save_pruned(model, tokenizer, out_dir: str | Path, sidecar: dict) -> None:
    """Save weights (safetensors), config, tokenizer and the sidecar, atomically."""
    t0 = time.time()
    sidecar = dict(sidecar)
    sidecar["layout"] = layout_of(model)
    sidecar["parameters"] = sum(p.numel() for p in model.parameters())
    sidecar["versions"] = versions()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SIDECAR, sidecar)
    log.info("saved pruned model to %s in %.1f s", out_dir, time.time() - t0)


def read_sidecar(path: str | Path) -> dict:
    p = Path(path) / SIDECAR
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not a pruned-model directory (no {SIDECAR} sidecar)")
    return json.loads(p.read_text())


def load_pruned(path: str | Path, dtype: str | None = None, device: str = "auto"):
    """Rebuild a pruned model saved by :func:`save_pruned` (per-layer sizes) and load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    side = read_sidecar(path)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=side.get("trust_remote_code", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=side.get("trust_remote_code", False))
    ad = A.adapter_for(model)
    lay = side["layout"]
    for block, size, bias in zip(A.layers(model, ad), lay["intermediate_sizes"], lay["down_bias"]):
        A.resize_mlp(block, ad, size, bias)
    from .heads import resize_heads

    resize_heads(model, lay)
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    if getattr(cfg, "tie_word_embeddings", False):
        emb_key = next(k for k in state if k.endswith("embed_tokens.weight"))
        state.setdefault("lm_head.weight", state[emb_key])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the sidecar's layout (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    _materialise_buffers(model, cfg)
    target = torch_dtype(dtype) if dtype else None
    model = model.to(device=resolve_device(device), dtype=target) if target else model.to(resolve_device(device))
    return model.eval()


def _materialise_buffers(model, cfg) -> None:
    """Buffers that are not saved (rotary inverse frequencies) are rebuilt off the meta device."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent, _, attr = name.rpartition(".")
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            setattr(model.get_submodule(parent) if parent else model, attr, fresh)
        scale = getattr(module, "scalar_embed_scale", None)  # Gemma 3's embedding scale, not saved
        if scale is not None and getattr(module, "embed_scale", None) is not None and module.embed_scale.is_meta:
            module.embed_scale = torch.tensor(scale, device="cpu")
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise ValueError(f"buffer {name} was not restored when loading the pruned model")
