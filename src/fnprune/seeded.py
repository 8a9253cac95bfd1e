"""Models built from an architecture config with seeded random weights (``source: init``).

An engineering check, never a result about LLMs: a 7B-shaped model runs every stage of the
workflow at its real size (memory, disk, time) where no 7B weights can be downloaded. Its numbers
(perplexity, accuracy, masks) describe random weights and nothing else.

The weights are written once into ``results/models/{model}`` like a converted model's: config,
sharded safetensors (one shard per block, generated and written one at a time, so building a
7B-shaped model never holds more than one block in memory and never a float32 copy), a byte-level
BPE tokenizer trained on the corpus's train split (:func:`fnprune.train.train_tokenizer`, as
``source: train`` does; its vocabulary is at most the config's) and ``init.json``.

Importing this module needs no torch: the config check reads :data:`BUNDLED` and
:func:`resolve_init` when the DAG is built.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .io import atomic_dir, versions, write_json

log = logging.getLogger(__name__)

RECORD = "init.json"
ARCHITECTURE = "LlamaForCausalLM"

# Architecture configs by name (models.<m>.init: <name>, or {preset: <name>, ...overrides}).
BUNDLED = {
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf's config.json); Vicuna-7B-v1.5 has the same shape.
    "llama2_7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 32,
        "max_position": 4096,
        "rms_norm_eps": 1e-5,
        "tie_embeddings": False,
    },
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
# Keys with a default when neither the preset nor the model gives them.
DEFAULTS = {"max_position": 2048, "rms_norm_eps": 1e-5, "tie_embeddings": False, "std": 0.02, "dtype": "bfloat16"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def resolve_init(value, key: str) -> dict:
    """The full architecture of ``models.<m>.init`` (``key``): a bundled name, or a dict of keys over
    an optional ``preset``. Raises ValueError naming the key at fault."""
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a bundled config name ({', '.join(BUNDLED)}) or a mapping, got {value!r}")
    spec = dict(DEFAULTS)
    preset = value.get("preset")
    if preset is not None:
        if preset not in BUNDLED:
            raise ValueError(f"{key}.preset: {preset!r} is not a bundled config (bundled: {', '.join(BUNDLED)})")
        spec.update(BUNDLED[preset])
    spec.update(value)
    missing = [k for k in SHAPE_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{key}.{missing[0]}: required without a preset (bundled: {', '.join(BUNDLED)})")
    spec.setdefault("num_kv_heads", spec["num_heads"])
    if spec["hidden_size"] % spec["num_heads"]:
        raise ValueError(
            f"{key}.num_heads: hidden_size {spec['hidden_size']} is not a multiple of {spec['num_heads']} heads"
        )
    if spec["num_heads"] % spec["num_kv_heads"]:
        raise ValueError(
            f"{key}.num_kv_heads: {spec['num_heads']} query heads are not a multiple of {spec['num_kv_heads']}"
        )
    return spec


def parameter_count(spec: dict) -> int:
    """Parameters of the LLaMA of ``spec`` (a :func:`resolve_init` dict), embeddings and head included."""
    h, inter, n = spec["hidden_size"], spec["intermediate_size"], spec["num_layers"]
    kv = h // spec["num_heads"] * spec["num_kv_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two norms
    embed = spec["vocab_size"] * h
    return n * block + embed * (1 if spec["tie_embeddings"] else 2) + h


def weight_bytes(spec: dict) -> int:
    """Bytes of the weights as written (``spec["dtype"]``)."""
    return parameter_count(spec) * DTYPE_BYTES[spec["dtype"]]


def hf_config(spec: dict, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=[ARCHITECTURE],
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position"],
        rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_embeddings"],
        initializer_range=spec["std"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=spec["dtype"],
    )


def shard_groups(names: list[str]) -> list[list[str]]:
    """Tensor names in shards: one per block (``model.layers.<i>.``), then the rest (embeddings, norm, head)."""
    blocks: dict[int, list[str]] = {}
    rest = []
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"]:
            blocks.setdefault(int(parts[2]), []).append(name)
        else:
            rest.append(name)
    return [blocks[i] for i in sorted(blocks)] + ([rest] if rest else [])


def write_weights(config, spec: dict, seed: int, out_dir: Path) -> dict:
    """Seeded weights of ``config``'s model, written shard by shard in ``spec["dtype"]``: N(0, std)
    for every matrix, 1 for every norm (transformers' LLaMA initialisation), drawn in a fixed order
    from one generator. Returns the safetensors index (name -> shard file, total bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from .modeling import torch_dtype

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if spec["tie_embeddings"]:
        shapes.pop("lm_head.weight", None)
    dtype = torch_dtype(spec["dtype"])
    gen = torch.Generator().manual_seed(seed)
    groups = shard_groups(list(shapes))
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=dtype)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, spec["std"], generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, out_dir / fname, metadata={"format": "pt"})
        del tensors
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def build_init_model(train_texts: list[str], spec: dict, out_dir: str | Path, seed: int = 0) -> dict:
    """Tokenizer, config, seeded weights and ``init.json`` of ``spec`` (:func:`resolve_init`), atomically."""
    import torch

    from .train import train_tokenizer

    t0 = time.time()
    tokenizer = train_tokenizer(train_texts, spec["vocab_size"])
    if len(tokenizer) > spec["vocab_size"]:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens exceeds init.vocab_size {spec['vocab_size']}")
    config = hf_config(spec, tokenizer)
    with atomic_dir(out_dir) as tmp:
        index = write_weights(config, spec, seed, tmp)
        write_json(tmp / "model.safetensors.index.json", index)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "what": "seeded random weights: an engineering check of the workflow at this shape, not a language model",
            "spec": spec,
            "seed": seed,
            "parameters": parameter_count(spec),
            "weights_bytes": index["metadata"]["total_size"],
            "tokenizer": f"byte-level BPE trained on the corpus's train split ({len(tokenizer)} tokens)",
            "torch_threads": torch.get_num_threads(),
            "wall_s": time.time() - t0,
            "versions": versions(),
        }
        write_json(tmp / RECORD, info)
    log.info(
        "%s: %d parameters (%.2f GB in %s), seed %d, in %.0f s",
        out_dir,
        info["parameters"],
        info["weights_bytes"] / 1e9,
        spec["dtype"],
        seed,
        info["wall_s"],
    )
    return info
