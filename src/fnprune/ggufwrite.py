"""Writing GGUF: a dense or fnprune-pruned model and its tokenizer, as llama.cpp reads it."""

from __future__ import annotations

import json
from pathlib import Path

from .config import GGUF_EXPORT_TYPES
from .io import atomic_path

WRITE_TYPES = tuple(t.upper() for t in GGUF_EXPORT_TYPES)


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
