"""GGUF models as a source: locate, inspect, dequantise into a transformers directory; write GGUF.

``source: gguf`` models (what llama.cpp and Ollama users keep on disk) are converted once, by the
``convert_gguf`` rule, into ``results/models/{model}/``: fp32 safetensors, config and tokenizer,
plus ``provenance.json`` (the GGUF file's sha256, its tensor quantisation types, ``dequantised``),
which every pruned model's sidecar and every metrics file built on it carries.

:func:`write_gguf` writes a dense LLaMA-family model (and its byte-level BPE tokenizer) as GGUF,
F32, F16 or Q8_0, with llama.cpp's tensor names and its rotary permutation of q/k.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections import Counter
from pathlib import Path

from .config import GGUF_EXPORT_TYPES
from .io import atomic_dir, atomic_path, versions, write_json

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
GGUF_MAGIC = b"GGUF"
# GGUF architectures fnprune converts and prunes (transformers reads more; fnprune's adapters and
# tests cover these). transformers turns a llama file whose general.name says mistral into Mistral.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM")}
# Tensor types the gguf package dequantises (gguf.quants), plus the plain float types.
PLAIN_TYPES = ("F32", "F16", "BF16")
WRITE_TYPES = tuple(t.upper() for t in GGUF_EXPORT_TYPES)


def supported_types() -> list[str]:
    from gguf.quants import _type_traits

    return sorted(set(PLAIN_TYPES) | {t.name for t in _type_traits})


def resolve_file(spec: dict, key: str = "models.<model>") -> Path:
    """The GGUF file of a ``source: gguf`` model: ``path``, or ``file`` inside installed ``package``.

    The package is located without being imported (its own imports may not be installed).
    """
    if spec.get("path"):
        p = Path(spec["path"]).expanduser()
        where = f"{key}.path"
    elif spec.get("package") and spec.get("file"):
        found = importlib.util.find_spec(spec["package"])
        if found is None or not found.submodule_search_locations:
            raise ValueError(
                f"{key}.package: Python package {spec['package']!r} is not installed "
                f"(install it with the project's set-up: make venv)"
            )
        p = Path(next(iter(found.submodule_search_locations))) / spec["file"]
        where = f"{key}.file"
    else:
        raise ValueError(
            f"{key}: source gguf needs path (a .gguf file) or package and file (a file inside an "
            f"installed Python package)"
        )
    if not p.is_file():
        raise ValueError(f"{where}: {p} is not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{where}: {p} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return p


def inspect(path: str | Path) -> dict:
    """Architecture, name and tensor types of a GGUF file (header only); refuses what fnprune cannot
    convert, naming it and listing what is supported."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    bad = sorted(set(types) - set(supported_types()))
    if bad:
        raise ValueError(
            f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantised; supported: {', '.join(supported_types())}"
        )
    return {
        "architecture": arch,
        "name": name,
        "tensor_types": dict(sorted(types.items())),
        "n_tensors": len(reader.tensors),
    }


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_version(package: str | None) -> str | None:
    if not package:
        return None
    dists = importlib.metadata.packages_distributions().get(package, [])
    return f"{dists[0]}=={importlib.metadata.version(dists[0])}" if dists else None


@contextlib.contextmanager
def _parse_once():
    """Within one conversion, read each GGUF file's header once and build each tensor-name map once.

    transformers opens the file anew for the model, the config and the tokenizer (four
    ``GGUFReader`` objects, each walking every metadata field: the vocabulary's 49,152 strings and
    its merges, about 2.5 s each for SmolLM2) and builds gguf's tensor-name map once per module
    (397 times, the same map). Both are read-only after construction, so one of each is shared
    for the duration of the block; the weights read are the same bytes.
    """
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def convert(spec: dict, out_dir: str | Path, architecture: str | None = None) -> dict:
    """Dequantise the GGUF file of ``spec`` into a transformers directory ``out_dir`` (atomically).

    ``architecture`` (the config's ``models.*.architecture``) must be what transformers builds.
    Returns the provenance record written beside the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling import _materialise_buffers

    t0 = time.time()
    path = resolve_file(spec)
    with _parse_once():
        info = inspect(path)
        folder, name = str(path.parent), path.name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        built = type(loaded).__name__
        if built not in ARCHITECTURES[info["architecture"]] or (architecture and built != architecture):
            raise ValueError(
                f"{path}: transformers builds {built} from it, but models.*.architecture is {architecture!r}"
            )
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    cfg.architectures = [built]
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = "float32"
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and move the weights over.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: dequantised tensors do not match {built} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    _materialise_buffers(plain, cfg)
    prov = {
        "source": "gguf",
        "gguf_file": str(path),
        "gguf_package": spec.get("package"),
        "gguf_package_version": _package_version(spec.get("package")),
        "gguf_sha256": sha256_file(path),
        "gguf_bytes": path.stat().st_size,
        "gguf_name": info["name"],
        "gguf_architecture": info["architecture"],
        "tensor_types": info["tensor_types"],
        "dequantised": any(t not in PLAIN_TYPES for t in info["tensor_types"]),
        "saved_dtype": "float32",
        "architecture": built,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "versions": versions(),
    }
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
        tok.save_pretrained(tmp)
        prov["wall_s"] = time.time() - t0
        write_json(tmp / PROVENANCE, prov)
    log.info(
        "converted %s (%s, %s) into %s in %.1f s", path, info["name"], info["tensor_types"], out_dir, time.time() - t0
    )
    return prov


def read_provenance(model_dir: str | Path | None) -> dict | None:
    """The provenance record of a converted model directory (None for any other source)."""
    from .io import read_json

    if model_dir is None:
        return None
    p = Path(model_dir) / PROVENANCE
    return read_json(p) if p.is_file() else None


def _permute(w, n_head: int):
    """llama.cpp's rotary permutation of q/k rows (its convert_hf_to_gguf.py); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF types (1 normal, 3 control) and the BPE merges of a byte-level tokenizer."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"write_gguf: tokenizer model {state['model']['type']!r}; only byte-level BPE is written")
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for tok, idx in vocab.items():
        tokens[idx] = tok
    special = set(tokenizer.all_special_ids)
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


def write_gguf(
    model, tokenizer, path: str | Path, dtype: str = "F32", name: str = "fnprune", metadata: dict | None = None
) -> dict:
    """Write a LLaMA-architecture ``model`` (dense, or pruned by fnprune) and its byte-level BPE
    ``tokenizer`` as GGUF; returns the per-layer widths written.

    The widths and head counts are taken from each layer's tensors. llama.cpp's ``llama``
    architecture sizes every layer by layer 0's, so a model whose layers differ (pruned) is
    written as ``deci``: llama.cpp's LLaMA graph with per-layer ``feed_forward_length`` and head
    counts (DeciLM, Nemotron-51B), the same tensor names and rotary layout. Bias compensation's
    ``down_proj``/``o_proj`` biases are written as ``ffn_down.bias``/``attn_output.bias``, which
    that graph adds when present. ``metadata`` (for example the pruned model's sidecar
    provenance) is written as ``fnprune.*`` strings.
    """
    import gguf

    if dtype not in WRITE_TYPES:
        raise ValueError(f"write_gguf: dtype {dtype!r}; expected one of {', '.join(WRITE_TYPES)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"write_gguf: model_type {cfg.model_type!r}; only llama is written")
    shapes = _layer_shapes(model)
    arch = "llama" if all(len(set(v)) == 1 for v in shapes.values()) else "deci"
    with atomic_path(Path(path), suffix=".gguf") as tmp:
        _write_llama(gguf.GGUFWriter(str(tmp), arch), model, tokenizer, dtype, name, metadata or {}, shapes)
    return shapes


def _layer_shapes(model) -> dict[str, list[int]]:
    """Per-layer MLP width, query heads and key-value heads; refuses a layer with none left."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = model.model.layers
    shapes = {
        "feed_forward_length": [layer.mlp.gate_proj.out_features for layer in layers],
        "head_count": [layer.self_attn.q_proj.out_features // head_dim for layer in layers],
        "head_count_kv": [layer.self_attn.k_proj.out_features // head_dim for layer in layers],
    }
    empty = [
        i
        for i in range(len(layers))
        if 0 in (shapes["feed_forward_length"][i], shapes["head_count"][i], shapes["head_count_kv"][i])
    ]
    if empty:
        raise ValueError(
            f"write_gguf: layers {empty} have no MLP neurons or no attention heads left; "
            f"llama.cpp cannot run an empty layer"
        )
    return shapes


_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _one_or_list(values: list[int]):
    return values[0] if len(set(values)) == 1 else values


def _write_llama(w, model, tokenizer, dtype: str, name: str, metadata: dict, shapes: dict) -> None:
    import gguf
    import numpy as np

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    state = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    layers = range(cfg.num_hidden_layers)
    heads, kv = shapes["head_count"], shapes["head_count_kv"]
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(_one_or_list(shapes["feed_forward_length"]))
    w.add_head_count(_one_or_list(heads))
    w.add_head_count_kv(_one_or_list(kv))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[dtype])
    for key, value in metadata.items():
        w.add_string(f"fnprune.{key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    tokens, types, merges = _byte_level_vocab(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, tid in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    w.add_add_bos_token(False)
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in layers:
        for hf, gg in _LAYER_TENSORS.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, heads[i])
            elif gg == "attn_k":
                t = _permute(t, kv[i])
            tensors[f"blk.{i}.{gg}.weight"] = t
            bias = state.get(f"model.layers.{i}.{hf}.bias")
            if bias is not None:
                if gg in ("attn_q", "attn_k"):
                    bias = _permute(bias, heads[i] if gg == "attn_q" else kv[i])
                tensors[f"blk.{i}.{gg}.bias"] = bias
    for key, t in tensors.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or dtype == "F32":
            w.add_tensor(key, t)
        elif dtype == "F16" or t.shape[-1] % 32:
            # Q8_0 packs rows in blocks of 32: a pruned width that is no multiple of it stays F16
            w.add_tensor(key, t.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(key, gguf.quants.quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
