"""Writing GGUF: a dense or fnprune-pruned model and its tokenizer, as llama.cpp reads it.

Six transformers classes are written, each as the llama.cpp architecture its converter
(``convert_hf_to_gguf.py``) writes it as, so that transformers' own GGUF loader
(``from_pretrained(folder, gguf_file=name)``) rebuilds the same model:

==================  ==================  ===========================================================
class               GGUF architecture   what differs from LLaMA
==================  ==================  ===========================================================
LlamaForCausalLM    llama (deci)        q/k rows in llama.cpp's rotary order (transformers undoes it)
MistralForCausalLM  llama (deci)        nothing; transformers reads it back as LlamaForCausalLM
Qwen2ForCausalLM    qwen2               q/k/v biases; no rotary permutation
Qwen3ForCausalLM    qwen3               q_norm/k_norm; head_dim apart from hidden/heads
Phi3ForCausalLM     phi3                fused attn_qkv; gate and up fused as ffn_up
Gemma3ForCausalLM   gemma3              GeGLU; four norms a block, stored +1; sliding window
==================  ==================  ===========================================================

What llama.cpp's loader (``src/llama-model.cpp``: ``load_hparams`` and ``load_tensors``) can hold
of a pruned model decides what is written. It reads ``feed_forward_length`` and the head counts as
per-layer arrays for every architecture, but sizes the tensors from them per layer only for
``deci`` (``hparams.n_ff(i)``, ``n_head(i)``, ``n_head_kv(i)``); ``llama``, ``qwen2``, ``qwen3``,
``phi3`` and ``gemma3`` create every layer's tensors with layer 0's width and head counts
(``hparams.n_ff()``, ``n_head()``) and reject any other shape. A LLaMA or Mistral whose layers
differ is therefore written as ``deci`` (llama.cpp's LLaMA graph with per-layer shapes, same
tensor names and rotary layout); the other four refuse it. Bias compensation's
``down_proj``/``o_proj`` biases are optional tensors of ``llama`` and ``deci``
(``ffn_down.bias``, ``attn_output.bias``); the other four loaders create no such tensor, and a file
with a tensor its loader did not create fails ``done_getting_tensors`` (wrong number of tensors).
:func:`export_refusal` gives these reasons from the class name alone (no torch), for the workflow
to refuse an export target before any job runs.

Where transformers' reader falls short of the file (checked with transformers 5.23, gguf 0.19):

- Mistral is written as llama.cpp's converter writes it, ``llama``. transformers would build a
  Mistral only from a llama file whose ``general.name`` is exactly "mistral", and then fails to
  map its tensors (gguf-py knows no "mistral" architecture), so the file reads back as
  ``LlamaForCausalLM``: the same computation, without Mistral's sliding window, which llama.cpp's
  llama graph does not apply either.
- ``deci`` has no transformers config class, so a pruned LLaMA/Mistral is not rebuilt by
  ``from_pretrained``; its tensors read with transformers' GGUF reader into the pruned shape.
- transformers reads no ``key_length`` for qwen3 (Qwen3Config's head_dim 128 is assumed, as in
  every released Qwen3), ``rope.dimension_count`` for phi3, nor Gemma 3's query scale, layer
  pattern or sliding rotary base (its defaults are what llama.cpp fixes, and write_gguf refuses
  a Gemma 3 that differs).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import GGUF_EXPORT_TYPES
from .io import atomic_path

WRITE_TYPES = tuple(t.upper() for t in GGUF_EXPORT_TYPES)


@dataclass(frozen=True)
class _Layout:
    """How one transformers class is written and what llama.cpp's loader for it creates."""

    arch: str  # GGUF architecture of a model whose layers are alike
    per_layer: str | None  # architecture that sizes each layer by its own keys (None: there is none)
    tensors: dict[str, str]  # per layer: transformers module (under model.layers.{i}.) -> GGUF tensor
    biases: frozenset[str]  # GGUF tensors whose .bias the loader creates (optional or required)
    rotary_permute: bool = False  # q/k rows permuted into llama.cpp's interleaved rotary order
    norm_offset: float = 0.0  # added to every norm weight (Gemma's RMSNorm scales by 1 + weight)
    shapes: str = ""  # the loader's tensor sizing, in words, for refusals


_ATTN = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA_TENSORS = {**_ATTN, **_MLP, "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

# llama.cpp's LLaMA loader creates attn_q/k/v/output and ffn_gate/up/down biases when present.
_LLAMA = _Layout(
    "llama",
    "deci",
    _LLAMA_TENSORS,
    frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    rotary_permute=True,
)
_LAYOUTS: dict[str, _Layout] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _Layout(
        "qwen2",
        None,
        _LLAMA_TENSORS,
        frozenset({"attn_q", "attn_k", "attn_v"}),
        shapes="its ffn_gate/ffn_up/ffn_down with layer 0's feed_forward_length (hparams.n_ff()) and "
        "attn_q/attn_output as n_embd x n_embd",
    ),
    "Qwen3ForCausalLM": _Layout(
        "qwen3",
        None,
        {**_LLAMA_TENSORS, **_QK_NORM},
        frozenset(),
        shapes="its ffn_gate/ffn_up/ffn_down with layer 0's feed_forward_length (hparams.n_ff()) and "
        "its attention with layer 0's head counts (n_head(), n_head_kv())",
    ),
    "Phi3ForCausalLM": _Layout(
        "phi3",
        None,
        {
            "self_attn.qkv_proj": "attn_qkv",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
        },
        frozenset(),
        shapes="its ffn_up as n_embd x 2*n_ff() and ffn_down as n_ff() x n_embd with layer 0's "
        "feed_forward_length, and attn_qkv/attn_output for attention n_embd wide",
    ),
    "Gemma3ForCausalLM": _Layout(
        "gemma3",
        None,
        {
            **_ATTN,
            **_QK_NORM,
            **_MLP,
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        },
        frozenset(),
        norm_offset=1.0,
        shapes="its ffn_gate/ffn_up/ffn_down with layer 0's feed_forward_length (hparams.n_ff()) and "
        "its attention with layer 0's head counts (n_head(), n_head_kv())",
    ),
}


def export_refusal(architecture: str, pruned: bool, bias: bool) -> str | None:
    """Why a model of transformers class ``architecture`` cannot be exported as GGUF that llama.cpp
    loads, or None when it can. ``pruned``: its layers may differ in MLP width or head counts
    (fnprune's pruning); ``bias``: bias compensation gives ``down_proj``/``o_proj`` a bias.

    Torch-free, from the class name alone, so the workflow can refuse a target at DAG build;
    :func:`write_gguf` raises the same reasons for the model it is given.
    """
    layout = _LAYOUTS.get(architecture)
    if layout is None:
        return (
            f"GGUF export writes LLaMA-architecture models, LLaMA and the decoders built like it "
            f"({', '.join(sorted(_LAYOUTS))}); {architecture} is not one of them"
        )
    reasons = []
    if pruned and layout.per_layer is None:
        reasons.append(
            _widths_reason(architecture, layout, "MLP widths or attention head counts that differ per layer")
        )
    if bias and not {"ffn_down", "attn_output"} <= layout.biases:
        reasons.append(
            _bias_reason(
                architecture, layout, "down_proj/o_proj biases (bias compensation: ffn_down.bias, attn_output.bias)"
            )
        )
    return "; ".join(reasons) or None


def block_removal_export_refusal(architecture: str) -> str | None:
    """Why a model of ``architecture`` with whole blocks removed (shortgpt) cannot be exported as GGUF
    that llama.cpp loads, or None when it can: its layers keep one shape, so it is written as its
    architecture's plain file (a LLaMA as ``llama``), except where llama.cpp fixes the block pattern
    rather than reading it (Gemma 3: every sixth layer full attention). Torch-free, as
    :func:`export_refusal`, which gives the reasons of the other kinds of model."""
    why = export_refusal(architecture, pruned=False, bias=False)
    if why or _LAYOUTS[architecture].arch != "gemma3":
        return why
    return (
        f"{architecture} with blocks removed cannot be written as GGUF: llama.cpp's gemma3 loader "
        f"(llama-model.cpp, load_hparams) does not read the layer types but makes every sixth layer full "
        f"attention and the rest sliding (set_swa_pattern(6)), so the kept blocks' own types would be lost"
    )


def _widths_reason(architecture: str, layout: _Layout, has: str) -> str:
    return (
        f"{architecture} with {has} cannot be written as GGUF: llama.cpp's {layout.arch} loader "
        f"(llama-model.cpp, load_tensors) creates every layer's tensors with one shape, {layout.shapes}, "
        f"and refuses a tensor of another shape (of the architectures written here only deci, llama.cpp's "
        f"LLaMA graph, sizes each layer by its own feed_forward_length and head counts)"
    )


def _bias_reason(architecture: str, layout: _Layout, has: str) -> str:
    creates = ", ".join(f"{t}.bias" for t in sorted(layout.biases))
    return (
        f"{architecture} with {has} cannot be written as GGUF: llama.cpp's {layout.arch} loader "
        f"(llama-model.cpp, load_tensors) creates {'no bias tensor but ' + creates if creates else 'no bias tensor'}, "
        f"so a file holding them fails its check that every tensor was loaded "
        f"(done_getting_tensors: wrong number of tensors)"
    )


def _permute(w, n_head: int):
    """llama.cpp's rotary permutation of q/k rows (its convert_hf_to_gguf.py); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizers -----------------------------------------------------------------------------------

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
_PROBE = "Hello world, 1234!\n  indented\tline."


def _tokens_by_id(tokenizer, n_rows: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types; ids the tokenizer leaves empty up to the embedding's
    ``n_rows`` become unused ``[PAD{id}]`` tokens, as llama.cpp's converter writes them (llama.cpp
    takes the vocabulary's length for the embedding's)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise ValueError(
            f"write_gguf: the tokenizer has token ids up to {max(vocab.values())}, but the embedding has "
            f"{n_rows} rows; llama.cpp sizes the embedding by the vocabulary"
        )
    tokens: list[str | None] = [None] * n_rows
    for tok, idx in vocab.items():
        tokens[idx] = tok
    # special: the named ones and every added token marked special (<start_of_turn> and the like)
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    added = {i for i, t in added.items() if not t.special}
    types = []
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i] = f"[PAD{i}]"
            types.append(_UNUSED)
        elif i == tokenizer.unk_token_id:
            types.append(_UNKNOWN)
        elif i in special:
            types.append(_CONTROL)
        elif i in added:
            types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
    return tokens, types


def _merges(state: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]


def _split_pattern(state: dict) -> str | None:
    """The regex a byte-level tokenizer splits text with before its byte-level step (None: GPT-2's)."""
    for step in _steps(state.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Split":
            return step["pattern"].get("Regex") or step["pattern"].get("String")
    return None


def _pre_name(state: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's split regex, among those
    transformers' GGUF reader also knows; ``default`` for a plain byte-level tokenizer (GPT-2's
    split, as fnprune trains them); a regex neither knows is refused."""
    pattern = _split_pattern(state)
    if pattern is None:
        return "default"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o", "smaug-bpe", "dbrx", "deepseek-r1-qwen"):
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
            return name
    raise ValueError(
        f"write_gguf: the tokenizer splits text with {pattern!r}, which no tokenizer.ggml.pre that both "
        f"llama.cpp and transformers' GGUF reader know splits with"
    )


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with special tokens puts ``bos`` first / ``eos`` last (probed)."""
    ids = tokenizer(_PROBE)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and ids[:1] == [bos], eos is not None and ids[-1:] == [eos]


def _write_tokenizer(w, tokenizer, n_rows: int) -> str:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece-style BPE
    with byte fallback) model; returns which."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] != "BPE":
        raise ValueError(
            f"write_gguf: tokenizer model {model['type']!r}; GGUF is written for byte-level BPE (gpt2) and "
            f"SentencePiece-style BPE with byte fallback (llama), which transformers' GGUF reader rebuilds"
        )
    tokens, types = _tokens_by_id(tokenizer, n_rows)
    if model.get("byte_fallback"):
        kind = "llama"
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"write_gguf: a byte-fallback tokenizer without the byte tokens {missing[:4]}...; llama.cpp's "
                f"SentencePiece tokenizer falls back to them (and finds the line feed among them)"
            )
        types = [_BYTE if _BYTE_TOKEN.match(t) and ty == _NORMAL else ty for t, ty in zip(tokens, types)]
        merges = _merges(state)
        # llama.cpp merges the adjacent pair whose joined token scores highest, transformers by the
        # merges written beside: a token made by the r-th merge scores -r, every other one below all
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        floor = -float(len(merges) + 1)
        scores = [-float(rank[t]) if t in rank and ty == _NORMAL else floor for t, ty in zip(tokens, types)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_space_prefix(_prefix_space(state))
    else:
        if not any(s.get("type") == "ByteLevel" for s in _steps(state.get("pre_tokenizer"), "pretokenizers")):
            raise ValueError(
                "write_gguf: a BPE tokenizer without byte fallback that is not byte-level; llama.cpp reads "
                "BPE vocabularies as byte-level (gpt2)"
            )
        kind = "gpt2"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(state))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(_merges(state))
    for key, tid in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    add_bos, add_eos = _adds(tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    return kind


def _steps(node: dict | None, kind: str) -> list[dict]:
    """The steps of a tokenizer's normalizer or pre-tokenizer (a Sequence flattened)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(kind, []) for s in _steps(child, kind)]
    return [node]


def _prefix_space(state: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text: Llama's Metaspace does, Gemma's normalizer
    (spaces to "▁", nothing prepended) does not."""
    for step in _steps(state.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return any(step.get("type") == "Prepend" for step in _steps(state.get("normalizer"), "normalizers"))


# ---- the model ------------------------------------------------------------------------------------


def write_gguf(
    model, tokenizer, path: str | Path, dtype: str = "F32", name: str = "fnprune", metadata: dict | None = None
) -> dict:
    """Write ``model`` (one of the classes in the module's table, dense or pruned by fnprune) and
    its ``tokenizer`` as GGUF; returns the per-layer widths and head counts written.

    The widths and head counts are taken from each layer's tensors. A LLaMA or Mistral whose layers
    differ is written as ``deci``; for the others it is refused (ValueError), as is anything else
    llama.cpp's loader for the architecture cannot hold (a bias tensor it does not create, a rotary
    scaling it is not told of, Gemma 3's attention scale or layer pattern other than llama.cpp's),
    naming what the model has and why. ``metadata`` (for example the pruned model's sidecar
    provenance) is written as ``fnprune.*`` strings.

    ``dtype`` F32, F16 or Q8_0 (matrices; vectors stay F32); Q8_0 packs rows in blocks of 32, so a
    matrix whose rows are no multiple of 32 wide stays F16.
    """
    import gguf

    if dtype not in WRITE_TYPES:
        raise ValueError(f"write_gguf: dtype {dtype!r}; expected one of {', '.join(WRITE_TYPES)}")
    architecture = type(model).__name__
    layout = _LAYOUTS.get(architecture)
    if layout is None:
        raise ValueError(f"write_gguf: {export_refusal(architecture, False, False)}")
    shapes = _layer_shapes(model, layout)
    uniform = all(len(set(v)) == 1 for v in shapes.values())
    arch = layout.arch if uniform else layout.per_layer
    if arch is None:
        differ = ", ".join(f"{k} {v}" for k, v in shapes.items() if len(set(v)) > 1)
        raise ValueError(f"write_gguf: {export_refusal(architecture, True, False)} (this model, by layer: {differ})")
    _check(model, layout, shapes)
    with atomic_path(Path(path), suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _write(writer, model, tokenizer, layout, arch, dtype, name, metadata or {}, shapes)
    return shapes


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _layer_shapes(model, layout: _Layout) -> dict[str, list[int]]:
    """Per-layer MLP width, query heads and key-value heads; refuses a layer with none left."""
    hd = _head_dim(model.config)
    layers = model.model.layers
    heads = [layer.self_attn.o_proj.in_features // hd for layer in layers]
    if "self_attn.qkv_proj" in layout.tensors:
        kv = [(layer.self_attn.qkv_proj.out_features // hd - h) // 2 for layer, h in zip(layers, heads)]
    else:
        kv = [layer.self_attn.k_proj.out_features // hd for layer in layers]
    shapes = {
        "feed_forward_length": [layer.mlp.down_proj.in_features for layer in layers],
        "head_count": heads,
        "head_count_kv": kv,
    }
    empty = [i for i in range(len(layers)) if 0 in (shapes["feed_forward_length"][i], heads[i], kv[i])]
    if empty:
        raise ValueError(
            f"write_gguf: layers {empty} have no MLP neurons or no attention heads left; "
            f"llama.cpp cannot run an empty layer"
        )
    return shapes


def _rope(cfg, layer_type: str | None = None) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and layer_type in rope:
        rope = rope[layer_type]
    return rope


def _check(model, layout: _Layout, shapes: dict) -> None:
    """Refuse what llama.cpp's loader for the architecture cannot hold, naming it and why."""
    cfg, architecture = model.config, type(model).__name__
    problems = []
    hd = _head_dim(cfg)
    biases = sorted(
        {
            gg
            for i, layer in enumerate(model.model.layers)
            for hf, gg in layout.tensors.items()
            if getattr(layer.get_submodule(hf), "bias", None) is not None
        }
    )
    compensation = [b for b in ("ffn_down", "attn_output") if b in biases and b not in layout.biases]
    if compensation:
        problems.append(
            f"{export_refusal(architecture, False, True)} (this model: {', '.join(b + '.bias' for b in compensation)})"
        )
    extra = [b for b in biases if b not in layout.biases and b not in compensation]
    if extra:
        problems.append(_bias_reason(architecture, layout, "bias tensors " + ", ".join(f"{b}.bias" for b in extra)))
    if layout.arch in ("qwen2", "phi3") and shapes["head_count"][0] * hd != cfg.hidden_size:
        problems.append(
            f"{architecture} with {shapes['head_count'][0]} attention heads of {hd} "
            f"({shapes['head_count'][0] * hd} wide) cannot be written as GGUF: llama.cpp's {layout.arch} loader "
            f"(llama-model.cpp, load_tensors) creates {layout.shapes}, so it needs attention as wide as "
            f"hidden_size ({cfg.hidden_size})"
        )
    rope_types = {"full_attention", "sliding_attention"}
    for kind in sorted(rope_types & set(getattr(cfg, "rope_parameters", None) or {})) or [None]:
        rope_type = _rope(cfg, kind).get("rope_type", "default")
        if rope_type != "default":
            problems.append(
                f"{architecture} uses {rope_type!r} rotary scaling, which write_gguf does not write "
                f"(llama.cpp would rotate as unscaled)"
            )
    if layout.arch == "gemma3":
        problems += _gemma3_problems(cfg, architecture)
    if problems:
        raise ValueError("write_gguf: " + "; ".join(problems))


def _gemma3_problems(cfg, architecture: str) -> list[str]:
    """What llama.cpp's gemma3 hyperparameters (llama-model.cpp, load_hparams) fix rather than read."""
    problems = []
    n = cfg.num_hidden_layers
    # every sixth layer full attention, the rest sliding (hparams.set_swa_pattern(6))
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if list(cfg.layer_types) != pattern:
        problems.append(
            f"{architecture} has layer types {cfg.layer_types}, but llama.cpp's gemma3 makes every sixth "
            f"layer full attention and the rest sliding (set_swa_pattern(6)), as transformers' GGUF reader does"
        )
    # f_attention_scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer (27B) model
    scale = cfg.hidden_size // cfg.num_attention_heads if n == 62 else _head_dim(cfg)
    if cfg.query_pre_attn_scalar != scale:
        problems.append(
            f"{architecture} scales queries by query_pre_attn_scalar {cfg.query_pre_attn_scalar}**-0.5, but "
            f"llama.cpp's gemma3 takes 1/sqrt({scale}) (head_dim, or hidden/heads at 62 layers) and reads "
            f"no key for it"
        )
    local = _rope(cfg, "sliding_attention").get("rope_theta", 10000.0)
    if local != 10000.0:
        problems.append(
            f"{architecture} rotates sliding layers with base {local}, but llama.cpp's gemma3 fixes it at "
            f"10000 (rope_freq_base_train_swa) and transformers' GGUF reader assumes the same"
        )
    if cfg.sliding_window is None:
        problems.append(f"{architecture} has no sliding_window; llama.cpp's gemma3 requires one")
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, attr, None) is not None:
            problems.append(f"{architecture} sets {attr}, which llama.cpp's gemma3 graph does not apply")
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        problems.append(
            f"{architecture} uses activation {cfg.hidden_activation!r}; llama.cpp's gemma3 uses tanh-approximated GELU"
        )
    return problems


def _one_or_list(values: list[int]):
    return values[0] if len(set(values)) == 1 else values


def _write(w, model, tokenizer, layout: _Layout, arch: str, dtype: str, name: str, metadata: dict, shapes) -> None:
    import gguf
    import numpy as np

    cfg = model.config
    hd = _head_dim(cfg)
    state = model.state_dict()  # the model's own tensors: each is upcast alone when it is written
    heads, kv = shapes["head_count"], shapes["head_count_kv"]
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(_one_or_list(shapes["feed_forward_length"]))
    w.add_head_count(_one_or_list(heads))
    w.add_head_count_kv(_one_or_list(kv))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if layout.arch == "gemma3":
        w.add_rope_freq_base(float(_rope(cfg, "full_attention").get("rope_theta", 1_000_000.0)))
        w.add_rope_freq_base_swa(float(_rope(cfg, "sliding_attention").get("rope_theta", 10000.0)))
        w.add_sliding_window(int(cfg.sliding_window))
    else:
        rope = _rope(cfg)
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        w.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 1.0)))
    if layout.arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(
            getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
        )
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[dtype])
    for key, value in metadata.items():
        w.add_string(f"fnprune.{key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    _write_tokenizer(w, tokenizer, state["model.embed_tokens.weight"].shape[0])

    # GGUF name -> (HF name, transform of the float32 array); every tensor is converted when it is
    # written, one at a time, so the export holds the model once, in its own dtype.
    tensors = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "output_norm.weight": ("model.norm.weight", lambda t: t + layout.norm_offset),
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = ("lm_head.weight", None)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in layout.tensors.items():
            for suffix in ("weight", "bias"):
                src = f"model.layers.{i}.{hf}.{suffix}"
                if src not in state:
                    continue
                fix = None
                if layout.rotary_permute and gg in ("attn_q", "attn_k"):
                    n = heads[i] if gg == "attn_q" else kv[i]
                    fix = functools.partial(_permute, n_head=n)
                if gg.endswith("norm"):
                    fix = lambda t: t + layout.norm_offset  # noqa: E731
                tensors[f"blk.{i}.{gg}.{suffix}"] = (src, fix)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def kind(shape) -> str:
        if len(shape) == 1 or dtype == "F32":
            return "F32"
        # Q8_0 packs rows in blocks of 32: a pruned width that is no multiple of it stays F16
        return "F16" if dtype == "F16" or shape[-1] % 32 else "Q8_0"

    for key, (src, _) in tensors.items():
        shape, k = tuple(state[src].shape), kind(state[src].shape)
        if k == "Q8_0":
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, q8)
            w.add_tensor_info(key, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q8)
        else:
            np_dtype = np.dtype(np.float32 if k == "F32" else np.float16)
            w.add_tensor_info(key, shape, np_dtype, int(np.prod(shape)) * np_dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for src, fix in tensors.values():
        t = state[src].detach().to("cpu").float().numpy()
        t = np.ascontiguousarray(fix(t) if fix else t, dtype=np.float32)
        k = kind(t.shape)
        w.write_tensor_data(t if k == "F32" else t.astype(np.float16) if k == "F16" else gguf.quants.quantize(t, q8))
    w.close()
