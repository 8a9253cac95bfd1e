"""The adapter layer on tiny random models of every supported architecture.

Each architecture that transformers ships is built from a config (nothing is downloaded);
ChatGLM3, which is remote code, is the documented stand-in of ``chatglm_tree``, registered
with the Auto classes as ``trust_remote_code`` would resolve it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from chatglm_tree import ChatGLMConfig, ChatGLMForConditionalGeneration, register
from fnprune import adapters as A
from fnprune.extract import extract_batch, tokenize_batch
from fnprune.modeling import apply_mask, layout_of, load_config, load_pruned, read_sidecar, save_pruned
from fnprune.train import train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "ok",
    "A small model, a few layers.",
    "Hello there",
    "Functional networks of neurons in a language model",
    "Pruning keeps what the networks need.",
    "Independent components, spatial maps and masks of every layer in the model.",
    "Calibration texts have different lengths, so batches are padded.",
]
MAX_LEN = 14
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 80, 2, 4, 2

HF_MODELS = {
    "LlamaForCausalLM": ("llama", {"tie_word_embeddings": True}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Phi3ForCausalLM": ("phi3", {}),
    "Glm4ForCausalLM": ("glm4", {"head_dim": HIDDEN // HEADS, "hidden_act": "gelu_pytorch_tanh"}),
}
ARCHS = [*HF_MODELS, "ChatGLMModel"]
SEPARATE_QKV = [a for a in HF_MODELS if A.get_adapter(a).qkv is None]


@pytest.fixture(scope="module", autouse=True)
def chatglm_registered():
    register()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=300)


def _gate_act(model):
    """The activation of the gate half; ChatGLM's config names none (its MLP is swiglu)."""
    return ACT2FN[model.config.hidden_act] if hasattr(model.config, "hidden_act") else torch.nn.functional.silu


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(0.1 * noise)
            else:
                p.add_(0.1 * noise)


def build(arch: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "ChatGLMModel":
        model = ChatGLMForConditionalGeneration(
            ChatGLMConfig(
                num_layers=LAYERS,
                hidden_size=HIDDEN,
                ffn_hidden_size=INTER,
                num_attention_heads=HEADS,
                multi_query_group_num=KV_HEADS,
                kv_channels=HIDDEN // HEADS,
                padded_vocab_size=len(tokenizer),
            )
        )
    else:
        model_type, extra = HF_MODELS[arch]
        cfg = AutoConfig.for_model(
            model_type,
            architectures=[arch],
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        assert type(model).__name__ == arch
    _randomise(model, seed)
    return model.eval()


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = tokenize_batch(tokenizer, TEXTS[:4], MAX_LEN)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def _logits_with_down_inputs(model, ids, mask, kept, fill=None) -> torch.Tensor:
    """Dense logits with each layer's dropped down-projection inputs set to 0 (or ``fill``)."""
    ad = A.adapter_for(model)
    handles = []
    for layer, (block, keep) in enumerate(zip(A.layers(model, ad), kept)):
        inter = A.intermediate_size(block, ad)
        dropped = torch.as_tensor(np.setdiff1d(np.arange(inter), keep))
        value = 0.0 if fill is None else torch.as_tensor(fill[layer], dtype=torch.float32)[dropped]

        def pre(mod, args, dropped=dropped, value=value):
            x = args[0].clone()
            x[..., dropped] = value
            return (x,)

        handles.append(A.mlp_linears(block, ad)["down"].register_forward_pre_hook(pre))
    try:
        return _logits(model, ids, mask)
    finally:
        for h in handles:
            h.remove()


def _random_kept(model, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ad = A.adapter_for(model)
    sizes = [A.intermediate_size(b, ad) for b in A.layers(model, ad)]
    return [sorted(rng.choice(n, size=n - 8 * (1 + i), replace=False).tolist()) for i, n in enumerate(sizes)]


@torch.no_grad()
def _direct_signals(model, seqs: list[list[int]]) -> dict[str, list[np.ndarray]]:
    """Per layer, token by token (each sequence alone, unpadded): act(gate), up, down and o inputs."""
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    act = _gate_act(model)
    out = {k: [[] for _ in blocks] for k in ("gate", "up", "down_in", "o_in")}
    handles = []
    for i, block in enumerate(blocks):
        lin = A.mlp_linears(block, ad)

        def mlp_pre(mod, args, i=i, lin=lin):
            x = args[0].reshape(-1, args[0].shape[-1])
            if ad.fused:
                h = lin["gate_up"](x)
                g, u = h.chunk(2, dim=-1)
            else:
                g, u = lin["gate"](x), lin["up"](x)
            out["gate"][i].append(act(g))
            out["up"][i].append(u)

        def capture(key, i=i):
            def pre(mod, args):
                out[key][i].append(args[0].reshape(-1, args[0].shape[-1]))

            return pre

        handles += [
            A.mlp_of(block, ad).register_forward_pre_hook(mlp_pre),
            lin["down"].register_forward_pre_hook(capture("down_in")),
            A._get(A.attn_of(block, ad), ad.o).register_forward_pre_hook(capture("o_in")),
        ]
    try:
        for s in seqs:
            ids = torch.tensor([s])
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: [torch.cat(v).numpy() for v in per_layer] for k, per_layer in out.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_resolves_the_module_tree(arch, tokenizer):
    model = build(arch, tokenizer)
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    assert len(blocks) == LAYERS
    for block in blocks:
        lin = A.mlp_linears(block, ad)
        assert A.intermediate_size(block, ad) == INTER
        assert lin["down"].out_features == HIDDEN
        if ad.fused:
            assert lin["gate_up"].out_features == 2 * INTER
        else:
            assert lin["gate"].out_features == lin["up"].out_features == INTER
        attn = A.attn_of(block, ad)
        head_dim = HIDDEN // HEADS
        assert A._get(attn, ad.o).in_features == getattr(model.config, ad.n_heads_attr) * head_dim
        kv_rows = KV_HEADS * head_dim
        if ad.qkv is not None:
            assert A._get(attn, ad.qkv).out_features == HEADS * head_dim + 2 * kv_rows
        else:
            assert A._get(attn, ad.k).out_features == A._get(attn, ad.v).out_features == kv_rows
            assert A._get(attn, ad.q).out_features == HEADS * head_dim


@pytest.mark.parametrize("arch", [a for a in ARCHS if A.get_adapter(a).fused])
def test_fused_mlps_are_gate_then_up(arch, tokenizer):
    model = build(arch, tokenizer)
    ad = A.adapter_for(model)
    block = A.layers(model, ad)[0]
    lin = A.mlp_linears(block, ad)
    x = torch.randn(3, HIDDEN)
    g, u = lin["gate_up"](x).chunk(2, dim=-1)
    expected = lin["down"](_gate_act(model)(g) * u)
    torch.testing.assert_close(A.mlp_of(block, ad)(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_extraction_writes_gate_and_up_of_real_tokens(arch, tokenizer, tmp_path):
    model = build(arch, tokenizer)
    texts = TEXTS[:6]
    seqs = tokenize_batch(tokenizer, texts, MAX_LEN)
    assert len({len(s) for s in seqs[:3]}) > 1
    paths = [tmp_path / f"layer{i}.npy" for i in range(LAYERS)]
    info = extract_batch(
        model,
        tokenizer,
        texts,
        paths,
        tmp_path / "stats.npz",
        max_length=MAX_LEN,
        micro_batch_size=3,
        shard_dtype="float32",
    )
    n_tokens = sum(len(s) for s in seqs)
    assert info["n_tokens"] == n_tokens
    direct = _direct_signals(model, seqs)
    with np.load(tmp_path / "stats.npz") as z:  # plain arrays: load_stats reads them without pickle
        stats = {k: z[k] for k in z.files}
    assert int(stats["n_tokens"]) == n_tokens
    for i, path in enumerate(paths):
        shard = np.load(path)
        assert shard.shape == (n_tokens, 2 * INTER)
        np.testing.assert_allclose(shard[:, :INTER], direct["gate"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(shard[:, INTER:], direct["up"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(direct["gate"][i] * direct["up"][i], direct["down_in"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(stats["down_sum"][i], direct["down_in"][i].sum(0), rtol=0, atol=1e-4)
        np.testing.assert_allclose(stats["down_sumsq"][i], (direct["down_in"][i] ** 2).sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats["o_sum"][i], direct["o_in"][i].sum(0), rtol=0, atol=1e-4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in paths), "stats.npz"])


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_mask_equals_dense_with_dropped_neurons_zeroed(arch, tokenizer):
    model = build(arch, tokenizer)
    ids, mask = _batch(tokenizer)
    kept = _random_kept(model, seed=1)
    dense = _logits(model, ids, mask)
    expected = _logits_with_down_inputs(model, ids, mask, kept)
    assert not torch.allclose(dense, expected, atol=1e-3)
    apply_mask(model, {"kept": kept})
    ad = A.adapter_for(model)
    assert [A.intermediate_size(b, ad) for b in A.layers(model, ad)] == [len(k) for k in kept]
    torch.testing.assert_close(_logits(model, ids, mask), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bias_compensation_equals_dense_with_dropped_inputs_at_their_mean(arch, tokenizer):
    model = build(arch, tokenizer)
    ids, mask = _batch(tokenizer)
    kept = _random_kept(model, seed=2)
    rng = np.random.default_rng(3)
    down_mean = rng.normal(0.0, 0.5, size=(LAYERS, INTER))
    expected = _logits_with_down_inputs(model, ids, mask, kept, fill=down_mean)
    assert not torch.allclose(expected, _logits_with_down_inputs(model, ids, mask, kept), atol=1e-3)
    apply_mask(model, {"kept": kept}, down_mean=down_mean)
    torch.testing.assert_close(_logits(model, ids, mask), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tokenizer, tmp_path):
    model = build(arch, tokenizer)
    ids, mask = _batch(tokenizer)
    kept = _random_kept(model, seed=4)
    apply_mask(model, {"kept": kept}, down_mean=np.random.default_rng(5).normal(size=(LAYERS, INTER)))
    expected = _logits(model, ids, mask)
    save_pruned(model, tokenizer, tmp_path / "pruned", {"source": f"tiny-{arch}", "kept": kept})
    side = read_sidecar(tmp_path / "pruned")
    assert side["layout"]["intermediate_sizes"] == [len(k) for k in kept]
    loaded = load_pruned(tmp_path / "pruned", device="cpu")
    assert type(loaded) is type(model)
    assert layout_of(loaded) == side["layout"]
    torch.testing.assert_close(_logits(loaded, ids, mask), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", SEPARATE_QKV)
def test_head_pruning_round_trip(arch, tokenizer, tmp_path):
    model = build(arch, tokenizer)
    ids, mask = _batch(tokenizer)
    apply_mask(model, {"kept": _random_kept(model, seed=6), "kept_heads": [[1], [0]]})
    expected = _logits(model, ids, mask)
    save_pruned(model, tokenizer, tmp_path / "pruned", {"source": f"tiny-{arch}"})
    loaded = load_pruned(tmp_path / "pruned", device="cpu")
    torch.testing.assert_close(_logits(loaded, ids, mask), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", [a for a in ARCHS if A.get_adapter(a).qkv is not None])
def test_head_pruning_of_fused_qkv_fails_loudly(arch, tokenizer):
    model = build(arch, tokenizer)
    with pytest.raises(NotImplementedError, match="fused qkv"):
        apply_mask(model, {"kept": _random_kept(model, seed=9), "kept_heads": [[1], [0]]})


def test_statistics_of_per_layer_widths_fail_naming_them(tokenizer, tmp_path):
    """The statistics file holds one (layers x width) array per moment; a pruned model has no such width."""
    model = build("LlamaForCausalLM", tokenizer)
    ad = A.adapter_for(model)
    A.prune_mlp(A.layers(model, ad)[0], ad, torch.arange(INTER // 2))
    with pytest.raises(ValueError, match=rf"down_proj inputs have per-layer widths \[{INTER // 2}, {INTER}\]"):
        extract_batch(model, tokenizer, TEXTS[:4], None, tmp_path / "stats.npz", MAX_LEN)
    assert not (tmp_path / "stats.npz").exists()


def test_unknown_architecture_fails_before_any_work(tokenizer, tmp_path):
    cfg = GPT2Config(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=len(tokenizer), architectures=["GPT2LMHeadModel"]
    )
    model = GPT2LMHeadModel(cfg).eval()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'") as err:
        extract_batch(model, tokenizer, TEXTS, [out / "l0.npy", out / "l1.npy"], out / "stats.npz", MAX_LEN)
    assert all(arch in str(err.value) for arch in A.REGISTRY)
    assert not out.exists()
    with pytest.raises(ValueError, match="supported: "):
        apply_mask(model, {"kept": [[0], [0]]})
    cfg.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture") as err:
        load_config(str(tmp_path / "gpt2"))
    assert all(arch in str(err.value) for arch in A.REGISTRY)


def test_config_without_architectures_fails_listing_supported():
    cfg = GPT2Config(n_embd=HIDDEN, n_layer=1, n_head=HEADS)
    cfg.architectures = None
    with pytest.raises(ValueError, match="names no architectures") as err:
        A.architecture_of(cfg)
    assert all(arch in str(err.value) for arch in A.REGISTRY)
