"""GGUF export of every architecture fnprune reads from GGUF: a micro random model of each is
written by fnprune.ggufwrite, converted back by fnprune.ggufsource (transformers' GGUF loader) and
gives the source's logits; its tensors are the ones llama.cpp's loader for the architecture creates;
a pruned model is written where llama.cpp can hold it and refused, for the reason export_refusal
gives, where it cannot.

llama.cpp is not built here: ``llamacpp_refusals`` restates, for the six architectures, what its
loader (src/llama-model.cpp: load_hparams, load_tensors; llama-model-loader.cpp:
done_getting_tensors) requires of a file, read from its source.
"""

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fnprune import ggufsource as G
from fnprune import ggufwrite as W
from test_gguf import TEXTS, q8_reference

KINDS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]
CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# transformers builds a llama file as LlamaForCausalLM whatever wrote it (see fnprune.ggufwrite)
READ_BACK = {**CLASS, "mistral": "LlamaForCausalLM"}
GGUF_ARCH = {**{k: k for k in KINDS}, "mistral": "llama"}
# text with characters outside the micro vocabularies: byte-level BPE and byte fallback at work
SAMPLE = TEXTS[0] + TEXTS[2] + "naïve café — ünïcode ✓ 3.14159\n<start_of_turn>user\n"


def sentencepiece_style_tokenizer():
    """Gemma's tokenizer in small: BPE with byte fallback over "▁"-for-space text, with Gemma's
    special tokens first and the 256 byte tokens, adding BOS, as transformers' GemmaTokenizer builds it."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=420, special_tokens=special, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return GemmaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)


def qwen_tokenizer():
    """fnprune's trained byte-level BPE as Qwen's tokenizer class (Qwen's split regex and NFC),
    the class transformers gives a Qwen2/Qwen3 tokenizer when it loads one back."""
    from transformers import Qwen2Tokenizer

    from fnprune.train import SPECIAL_TOKENS, train_tokenizer

    model = json.loads(train_tokenizer(TEXTS, 300).backend_tokenizer.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], **SPECIAL_TOKENS)


def build(kind: str):
    """A random micro ``kind`` (hidden 64, grouped-query attention, widths Q8_0's blocks divide)
    with random norms and biases, and its tokenizer.

    Tokenizers: fnprune's trained byte-level BPE (train_tokenizer), as Qwen's class for Qwen2/3
    (transformers reloads a saved Qwen tokenizer with Qwen's own split regex, so a converted model's
    tokenizer keeps its ids only if it had that split), and a SentencePiece-style one for Gemma 3.

    Gemma 3 has head_dim 256 (4x hidden/heads) with query_pre_attn_scalar 256 and six layers
    (five sliding, window 16, then one full): llama.cpp takes the query scale as 1/sqrt(head_dim)
    and the sixth-layer pattern without reading them, transformers' GGUF reader assumes 256 and the
    same pattern, so only such a model is the same in both. Qwen3's head_dim is 128 for the same
    reason (transformers reads no head_dim for qwen3 and assumes 128).
    """
    import transformers as T
    from tokenizers import AddedToken

    from fnprune.train import train_tokenizer

    if kind == "gemma3":
        tok = sentencepiece_style_tokenizer()
    elif kind in ("qwen2", "qwen3"):
        tok = qwen_tokenizer()
    else:
        tok = train_tokenizer(TEXTS, 300)
    tok.add_tokens([AddedToken("<start_of_turn>", special=True)])  # special, but no named special token
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=[CLASS[kind]],
    )
    extra = {
        "llama": dict(tie_word_embeddings=False),
        "mistral": dict(head_dim=16),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(head_dim=128),
        "phi3": {},
        "gemma3": dict(
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=16,
        ),
    }[kind]
    config_class = T.Gemma3TextConfig if kind == "gemma3" else getattr(T, CLASS[kind].replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = getattr(T, CLASS[kind])(config_class(**{**common, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)  # Gemma's norms stored +1, Qwen2's biases: not zeros
    return model, tok


@pytest.fixture(scope="module")
def micro():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]

    return get


def llamacpp_refusals(path) -> list[str]:
    """What llama.cpp's loader for the file's architecture would refuse, read from its source: a
    key it requires missing; a tensor it creates missing or of another shape (load_tensors'
    create_tensor, with layer 0's n_ff/n_head for every layer except in deci); a tensor it does not
    create (done_getting_tensors). Shapes are ggml's, innermost first."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()

    def key(name, default=None):
        field = r.fields.get(f"{arch}.{name}")
        return default if field is None else field.contents()

    n_layer, n_embd = key("block_count"), key("embedding_length")

    def per_layer(v):
        return v if isinstance(v, list) else [v] * n_layer

    ff, heads = per_layer(key("feed_forward_length")), per_layer(key("attention.head_count"))
    kv_heads = per_layer(key("attention.head_count_kv", heads))
    hk = key("attention.key_length", n_embd // heads[0])
    hv = key("attention.value_length", n_embd // heads[0])
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    problems = []
    if key("attention.layer_norm_rms_epsilon") is None:
        problems.append("no attention.layer_norm_rms_epsilon")
    if arch in ("llama", "deci") and key("rope.dimension_count", hk) != hk:
        problems.append("invalid n_rot")
    if arch == "gemma3" and key("attention.sliding_window") is None:
        problems.append("no attention.sliding_window")
    want = {  # name -> (shape, required)
        "token_embd.weight": ((n_embd, n_vocab), True),
        "output_norm.weight": ((n_embd,), True),
        "output.weight": ((n_embd, n_vocab), False),
    }
    for i in range(n_layer):
        at = i if arch == "deci" else 0
        f, q, k, v = ff[at], hk * heads[at], hk * kv_heads[at], hv * kv_heads[at]

        def t(name, *shape, required=True, i=i):
            want[f"blk.{i}.{name}"] = (shape, required)

        t("attn_norm.weight", n_embd)
        t("ffn_norm.weight", n_embd)
        t("ffn_down.weight", f, n_embd)
        if arch == "phi3":
            t("attn_qkv.weight", n_embd, n_embd + 2 * v)
            t("attn_output.weight", n_embd, n_embd)
            t("ffn_up.weight", n_embd, 2 * f)
            continue
        q = n_embd if arch == "qwen2" else q
        t("attn_q.weight", n_embd, q)
        t("attn_k.weight", n_embd, k)
        t("attn_v.weight", n_embd, v)
        t("attn_output.weight", q, n_embd)
        t("ffn_gate.weight", n_embd, f)
        t("ffn_up.weight", n_embd, f)
        if arch in ("llama", "deci"):
            for name, n in [("attn_q", n_embd), ("attn_k", v), ("attn_v", v), ("attn_output", n_embd)]:
                t(f"{name}.bias", n, required=False)
            for name, n in [("ffn_gate", f), ("ffn_up", f), ("ffn_down", n_embd)]:
                t(f"{name}.bias", n, required=False)
        if arch == "qwen2":
            t("attn_q.bias", n_embd)
            t("attn_k.bias", v)
            t("attn_v.bias", v)
        if arch in ("qwen3", "gemma3"):
            t("attn_q_norm.weight", hk)
            t("attn_k_norm.weight", hk)
        if arch == "gemma3":
            t("post_attention_norm.weight", n_embd)
            t("post_ffw_norm.weight", n_embd)
    have = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    for name, (shape, required) in want.items():
        if name not in have:
            if required:
                problems.append(f"missing tensor {name}")
        elif have[name] != shape:
            problems.append(f"tensor {name} has wrong shape; expected {shape}, got {have[name]}")
    problems += [f"unexpected tensor {name} (wrong number of tensors)" for name in have if name not in want]
    return problems


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_converts_back_to_the_source(micro, tmp_path, kind, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = micro(kind)
    path = tmp_path / f"{kind}.gguf"
    W.write_gguf(model, tok, path, dtype=dtype, name=f"micro_{kind}")
    assert llamacpp_refusals(path) == []
    prov = G.convert({"source": "gguf", "path": str(path)}, tmp_path / "conv")
    conv = AutoModelForCausalLM.from_pretrained(tmp_path / "conv", dtype=torch.float32).eval()
    conv_tok = AutoTokenizer.from_pretrained(tmp_path / "conv")

    file_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)  # as transformers reads the file
    ids = tok(SAMPLE, add_special_tokens=False, return_tensors="pt").input_ids
    for t in (file_tok, conv_tok):
        assert t(SAMPLE, add_special_tokens=False).input_ids == ids[0].tolist()
        assert t(SAMPLE).input_ids == tok(SAMPLE).input_ids  # the same special tokens added
    ref = model if dtype == "F32" else q8_reference(model)
    diff = (logits(conv, ids) - logits(ref, ids)).abs().max().item()
    assert diff <= 1e-5, (kind, dtype, diff)
    if dtype == "Q8_0":  # the rounding is real: the dequantised model is not the float one
        assert (logits(conv, ids) - logits(model, ids)).abs().max().item() > 1e-4

    assert type(conv).__name__ == prov["architecture"] == READ_BACK[kind]
    assert prov["gguf_architecture"] == GGUF_ARCH[kind] and prov["gguf_name"] == f"micro_{kind}"
    assert set(prov["tensor_types"]) == ({"F32"} if dtype == "F32" else {"F32", "Q8_0"})
    assert prov["dequantised"] is (dtype != "F32")
    assert prov["parameters"] == sum(p.numel() for p in model.parameters())


def test_sentencepiece_style_tokenizer_is_written_as_llamas(micro, tmp_path):
    """Gemma's tokenizer as llama.cpp's ``llama`` model: byte tokens typed as bytes, the specials
    as control, scores that order merges as the tokenizer does, Gemma's BOS added, no prefix space."""
    from gguf import GGUFReader

    model, tok = micro("gemma3")
    W.write_gguf(model, tok, tmp_path / "g.gguf")
    r = GGUFReader(str(tmp_path / "g.gguf"))
    field = {k: r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("model", "token_type", "scores", "tokens")}
    assert field["model"] == "llama" and len(field["tokens"]) == len(tok)
    types = field["token_type"]
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == 6 and types[tok.unk_token_id] == 2
    assert {types[i] for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)} == {3}
    merges = [" ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    first, later = (tok.convert_tokens_to_ids(merges[i].replace(" ", "")) for i in (0, len(merges) - 1))
    assert field["scores"][first] > field["scores"][later] > field["scores"][tok.convert_tokens_to_ids("<0x41>")]
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is False


def prune(model, widths, bias: bool):
    """``model`` with layer i's MLP cut to its first ``widths[i]`` neurons (fnprune.adapters.prune_mlp),
    and with ``bias`` a down_proj bias on every layer and an o_proj bias on layer 0."""
    from fnprune.adapters import get_adapter, prune_mlp

    pruned = copy.deepcopy(model)
    ad = get_adapter("Phi3ForCausalLM" if type(model).__name__ == "Phi3ForCausalLM" else "LlamaForCausalLM")
    gen = torch.Generator().manual_seed(1)
    for layer, width in zip(pruned.model.layers, widths):
        down = torch.randn(model.config.hidden_size, generator=gen) * 0.1 if bias else None
        prune_mlp(layer, ad, torch.arange(width), down)
    if bias:
        o = pruned.model.layers[0].self_attn.o_proj
        biased = torch.nn.Linear(o.in_features, o.out_features, bias=True)
        with torch.no_grad():
            biased.weight.copy_(o.weight)
            biased.bias.copy_(torch.randn(o.out_features, generator=gen) * 0.1)
        pruned.model.layers[0].self_attn.o_proj = biased
    return pruned.eval()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_per_layer_widths_and_biases_export_as_deci_and_read_back(micro, tmp_path, monkeypatch, kind):
    """A LLaMA/Mistral pruned to different widths per layer, with bias compensation, is written as
    ``deci``. transformers has no config class for deci (from_pretrained cannot build it), so the
    model is built from the header transformers parses (per-layer widths resized by
    fnprune.adapters.resize_mlp) and filled with the tensors transformers' GGUF reader reads, with
    the tensor processor it uses for llama files (deci shares LLaMA's rotary layout; transformers
    registers none for deci, so q/k would stay permuted)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import modeling_gguf_pytorch_utils as R

    from fnprune.adapters import get_adapter, resize_mlp

    model, tok = micro(kind)
    pruned = prune(model, [96, 64], bias=True)
    path = tmp_path / "pruned.gguf"
    shapes = W.write_gguf(pruned, tok, path)
    assert shapes["feed_forward_length"] == [96, 64]
    assert W.export_refusal(CLASS[kind], pruned=True, bias=True) is None
    assert llamacpp_refusals(path) == []

    parsed = R.load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert parsed["model_type"] == "deci" and parsed["intermediate_size"] == [96, 64]
    fields = {k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path", "intermediate_size")}
    skeleton = LlamaForCausalLM(LlamaConfig(**fields, intermediate_size=128)).eval()
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(str(path)).tensors}
    for i, (layer, width) in enumerate(zip(skeleton.model.layers, parsed["intermediate_size"])):
        resize_mlp(layer, get_adapter("LlamaForCausalLM"), width, down_bias=f"blk.{i}.ffn_down.bias" in names)
        if f"blk.{i}.attn_output.bias" in names:
            o = layer.self_attn.o_proj
            layer.self_attn.o_proj = torch.nn.Linear(o.in_features, o.out_features, bias=True)
    monkeypatch.setitem(R.TENSOR_PROCESSORS, "deci", R.LlamaTensorProcessor)
    tensors = R.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(tensors) == set(skeleton.state_dict())
    skeleton.load_state_dict(tensors)
    ids = tok(SAMPLE, add_special_tokens=False, return_tensors="pt").input_ids
    assert (logits(skeleton, ids) - logits(pruned, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_pruned_alike_in_every_layer_exports_as_the_dense_architecture(micro, tmp_path, kind):
    """Pruned to one width in every layer (no bias), any architecture holds it, and transformers'
    from_pretrained rebuilds it from the file."""
    from transformers import AutoModelForCausalLM

    model, tok = micro(kind)
    pruned = prune(model, [32] * model.config.num_hidden_layers, bias=False)
    W.write_gguf(pruned, tok, tmp_path / "p.gguf")
    assert llamacpp_refusals(tmp_path / "p.gguf") == []
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="p.gguf", dtype=torch.float32).eval()
    assert back.config.intermediate_size == 32
    ids = tok(SAMPLE, add_special_tokens=False, return_tensors="pt").input_ids
    assert (logits(back, ids) - logits(pruned, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "phi3", "gemma3"])
def test_what_llamacpp_cannot_load_is_refused_with_its_reason(micro, tmp_path, monkeypatch, kind):
    model, tok = micro(kind)
    n = model.config.num_hidden_layers
    widths = [32, 48] + [model.config.intermediate_size] * (n - 2)  # two layers pruned, unlike
    per_layer, biased = prune(model, widths, bias=False), prune(model, [32] * n, bias=True)
    for pruned, flags in ((per_layer, (True, False)), (biased, (False, True))):
        reason = W.export_refusal(CLASS[kind], *flags)
        assert reason and f"llama.cpp's {kind} loader" in reason
        with pytest.raises(ValueError) as err:
            W.write_gguf(pruned, tok, tmp_path / "x.gguf")
        assert reason in str(err.value)
    assert not (tmp_path / "x.gguf").exists()

    # the reason holds: written anyway (per-layer keys, as deci would have them), the loader refuses
    layout = W._LAYOUTS[CLASS[kind]]
    monkeypatch.setitem(W._LAYOUTS, CLASS[kind], dataclasses.replace(layout, per_layer=layout.arch))
    W.write_gguf(per_layer, tok, tmp_path / "forced.gguf")
    assert any("wrong shape" in p for p in llamacpp_refusals(tmp_path / "forced.gguf"))


def test_export_refusal_without_torch():
    for name in CLASS.values():
        assert W.export_refusal(name, pruned=False, bias=False) is None
    for name in ("LlamaForCausalLM", "MistralForCausalLM"):
        assert W.export_refusal(name, pruned=True, bias=True) is None
    assert "; ChatGLMModel is not one of them" in W.export_refusal("ChatGLMModel", pruned=False, bias=False)
    both = W.export_refusal("Qwen2ForCausalLM", pruned=True, bias=True)
    assert "layer 0's feed_forward_length" in both and "ffn_down.bias" in both and "done_getting_tensors" in both
    # the workflow calls it while building the DAG: the module loads without torch
    code = "import sys, fnprune.ggufwrite as W; W.export_refusal('Phi3ForCausalLM', True, True); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(
    "kind,change,message",
    [
        ("gemma3", {"query_pre_attn_scalar": 144}, r"query_pre_attn_scalar 144\*\*-0.5.*1/sqrt\(256\)"),
        ("gemma3", {"layer_types": ["full_attention"] * 6}, r"every sixth layer full attention"),
        ("gemma3", {"final_logit_softcapping": 30.0}, r"final_logit_softcapping"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, r"'linear' rotary"),
    ],
)
def test_what_the_architecture_fixes_is_refused_when_the_model_differs(micro, tmp_path, kind, change, message):
    model, tok = micro(kind)
    changed = copy.copy(model)
    changed.config = copy.deepcopy(model.config)
    for attr, value in change.items():
        setattr(changed.config, attr, value)
    with pytest.raises(ValueError, match=message):
        W.write_gguf(changed, tok, tmp_path / "x.gguf")


def test_every_architecture_converts_through_the_workflows_rule(micro, tmp_path):
    """The real convert_gguf rule, one run for all six: entries that give only a file and a corpus
    (the header supplies architecture and shape at DAG build), logits equal to the source's."""
    import yaml

    from helpers import snakemake

    models, sources = {}, {}
    for kind in KINDS:
        model, tok = micro(kind)
        path = tmp_path / f"{kind}.gguf"
        W.write_gguf(model, tok, path, dtype="F32", name=f"micro_{kind}")
        models[f"arch{kind}"] = {"source": "gguf", "path": str(path), "corpus": "stdlib"}
        sources[f"arch{kind}"] = model
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"models": models}))
    snakemake(tmp_path, *[f"results/models/{m}" for m in models], configs=(str(overlay),))
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40)[None]
    for slug, model in sources.items():
        out = tmp_path / "results" / "models" / slug
        conv = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (logits(conv, ids) - logits(model, ids)).abs().max().item() <= 1e-5, slug
        prov = json.loads((out / "provenance.json").read_text())
        assert prov["architecture"] == READ_BACK[slug[4:]] and prov["gguf_file"] == models[slug]["path"]
