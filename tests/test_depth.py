"""ShortGPT's depth pruning (fnprune.depth, adapters.keep_layers): block influence, the blocks chosen
for a ratio, the smaller model it leaves, its GGUF export and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fnprune import adapters as A
from fnprune import config as C
from fnprune import ggufwrite as W
from fnprune.depth import block_influence, block_parameters, select_blocks, shortgpt_mask
from fnprune.extract import tokenize_batch
from fnprune.mask import read_mask
from fnprune.modeling import load_pruned, read_sidecar, save_pruned
from fnprune.train import train_tokenizer
from helpers import REPO

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "ok",
    "A small model, a few layers.",
    "Hello there",
    "Functional networks of neurons in a language model",
    "Pruning keeps what the networks need, and removes the rest of the block.",
    "Calibration texts have different lengths, so batches are padded.",
]
MAX_LEN = 16
LAYERS = 5
# Gemma 3's pattern in small: the kept blocks must keep their own attention type and window.
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=300)


def build(arch: str, tokenizer, seed: int = 0):
    """A random model of ``arch`` with five blocks, float32, eval; random norms (not ones)."""
    import transformers as T

    common = dict(
        architectures=[arch],
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    extra = {
        "LlamaForCausalLM": dict(tie_word_embeddings=False),
        "Qwen2ForCausalLM": {},
        "Phi3ForCausalLM": {},
        "Gemma3ForCausalLM": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=GEMMA_TYPES),
    }[arch]
    config_class = (
        T.Gemma3TextConfig if arch == "Gemma3ForCausalLM" else getattr(T, arch.replace("ForCausalLM", "Config"))
    )
    torch.manual_seed(seed)
    model = getattr(T, arch)(config_class(**common, **extra)).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def batch(tokenizer):
    seqs = tokenize_batch(tokenizer, TEXTS, MAX_LEN)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"]


# ---- block influence ------------------------------------------------------------------------------


@torch.no_grad()
def test_block_influence_is_one_minus_cos_of_the_hidden_states(tokenizer):
    """Padded micro-batches give, per block, the sum over real tokens of 1 - cos(h_l, h_{l+1}) of each
    text run alone with output_hidden_states (the last entry of which is after the final norm, so the
    last block's output is the norm's input)."""
    model = build("LlamaForCausalLM", tokenizer)
    got = block_influence(model, tokenizer, TEXTS, MAX_LEN, micro_batch_size=3)
    want = np.zeros(LAYERS)
    last = []
    handle = model.model.norm.register_forward_pre_hook(lambda mod, args: last.append(args[0]))
    try:
        for s in tokenize_batch(tokenizer, TEXTS, MAX_LEN):
            hs = model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
            outs = [*hs[1:LAYERS], last.pop()]
            for i in range(LAYERS):
                cos = torch.nn.functional.cosine_similarity(hs[i][0].double(), outs[i][0].double(), dim=-1)
                want[i] += float((1 - cos).sum())
    finally:
        handle.remove()
    assert got["n_tokens"] == sum(len(s) for s in tokenize_batch(tokenizer, TEXTS, MAX_LEN))
    np.testing.assert_allclose(got["influence_sum"], want, rtol=1e-5, atol=1e-6)
    assert (want > 0).all()


# ---- which blocks go ------------------------------------------------------------------------------


def test_blocks_go_in_ascending_influence_until_the_ratio_is_reached():
    influence = [0.0, 0.1, 0.3, 0.2, 0.9]  # block 0 has the least but is protected
    prunable = [False, True, True, True, False]
    params = [10] * 5
    assert select_blocks(influence, params, prunable, 0.2) == ([1], pytest.approx(0.15))  # exactly 20%
    assert select_blocks(influence, params, prunable, 0.25)[0] == [1, 3]  # 12.5 of 50: two blocks, never fewer
    assert select_blocks(influence, params, prunable, 0.6)[0] == [1, 2, 3]
    # sizes do not change the order: the least influential goes first, whatever it holds
    assert select_blocks(influence, [10, 5, 10, 30, 10], prunable, 0.3)[0] == [1, 3]
    with pytest.raises(ValueError, match="prunable blocks hold only 30; lower the ratio or protect fewer"):
        select_blocks(influence, params, prunable, 0.61)


def test_the_removed_blocks_are_the_fewest_that_reach_the_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 12))
        influence, params = rng.random(n), rng.integers(5, 50, n)
        prunable = [0 < i < n - 1 for i in range(n)]
        ratio = float(rng.uniform(0.01, 0.9)) * sum(params[1:-1]) / sum(params)
        removed, threshold = select_blocks(influence, params, prunable, ratio)
        gone = sum(params[removed])
        assert gone >= ratio * sum(params)
        order = sorted(removed, key=lambda i: influence[i])
        assert gone - params[order[-1]] < ratio * sum(params)  # one fewer would not reach it
        kept = [i for i in range(1, n - 1) if i not in removed]
        assert all(influence[i] <= threshold for i in removed) and all(influence[i] > threshold for i in kept)


def test_the_shortgpt_mask_record_counts_whole_blocks(tmp_path):
    sizes, neuron, params = [64] * 5, 3 * 32, [7000] * 5
    rec = shortgpt_mask(np.array([5.0, 1.0, 3.0, 2.0, 9.0]), 10, params, sizes, neuron, 40000, 0.3, 1, 1)
    assert rec["removed_layers"] == [1, 3] and rec["kept_layers"] == [0, 2, 4]
    assert rec["removed_block_params"] == 14000 and rec["achieved_block_ratio"] == pytest.approx(0.4)
    assert rec["achieved_total_ratio"] == pytest.approx(14000 / 40000)
    assert rec["kept_counts"] == [64, 0, 64, 0, 64] and rec["block_influence"] == [0.5, 0.1, 0.3, 0.2, 0.9]
    assert (rec["method"], rec["kind"], rec["selection"]) == ("shortgpt", "baseline", "blocks")
    (tmp_path / "m.json").write_text(json.dumps(rec))
    assert read_mask(tmp_path / "m.json")["kept_layers"] == [0, 2, 4]


# ---- the smaller model ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_removing_blocks_equals_the_dense_model_with_those_blocks_as_identity(arch, tokenizer):
    import copy

    dense = build(arch, tokenizer)
    ids, mask = batch(tokenizer)
    pruned = copy.deepcopy(dense)
    A.keep_layers(pruned, [0, 2, 4])

    def identity(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [dense.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in (1, 3)]
    try:
        want = dense(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    got = pruned(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    if arch == "Gemma3ForCausalLM":
        assert pruned.config.layer_types == [GEMMA_TYPES[i] for i in (0, 2, 4)]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
@torch.no_grad()
def test_the_smaller_model_saves_loads_and_generates_alike_with_and_without_cache(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(arch, tokenizer)
    A.keep_layers(model, [0, 1, 3])
    save_pruned(model, tokenizer, tmp_path / "m", {"method": "shortgpt", "kept_layers": [0, 1, 3]})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 3
    assert read_sidecar(tmp_path / "m")["kept_layers"] == [0, 1, 3]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = load_pruned(tmp_path / "m", device="cpu")
    ids, mask = batch(tokenizer)
    real = mask.bool()
    want = model(input_ids=ids, attention_mask=mask).logits[real]
    for loaded in (plain, ours):
        assert len(loaded.model.layers) == 3
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits[real], want)
    if arch == "Gemma3ForCausalLM":
        assert plain.config.layer_types == [GEMMA_TYPES[i] for i in (0, 1, 3)]
    prompt = torch.tensor([tokenize_batch(tokenizer, TEXTS[:1], MAX_LEN)[0]])
    # past the sliding window of 4 (Gemma 3): the cache of each kept block is its own
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for loaded in (model, plain):
        cached = loaded.generate(prompt, use_cache=True, **kw)
        uncached = loaded.generate(prompt, use_cache=False, **kw)
        assert cached.shape[1] == prompt.shape[1] + 12
        assert torch.equal(cached, uncached)


def test_keep_layers_refuses_what_it_cannot_do(tokenizer):
    from chatglm_tree import ChatGLMConfig, ChatGLMForConditionalGeneration

    model = build("LlamaForCausalLM", tokenizer)
    for kept in ([], [2, 1], [0, 0, 1], [0, 5]):
        with pytest.raises(ValueError, match="expected ascending distinct indices of the model's 5 blocks"):
            A.keep_layers(model, kept)
    glm = ChatGLMForConditionalGeneration(
        ChatGLMConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, padded_vocab_size=300)
    )
    with pytest.raises(ValueError, match="cannot remove blocks of ChatGLMModel: ChatGLM3 is remote code"):
        A.keep_layers(glm, [0])


def test_block_parameters_are_the_blocks_of_the_model(tokenizer):
    model = build("Qwen2ForCausalLM", tokenizer)
    assert sum(block_parameters(model)) == A.block_parameter_count(model)
    assert len(set(block_parameters(model))) == 1


# ---- GGUF -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_llama_with_blocks_removed_exports_as_plain_llama_and_reads_back(tokenizer, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = build("LlamaForCausalLM", tokenizer)
    A.keep_layers(model, [0, 2, 3])
    W.write_gguf(model, tokenizer, tmp_path / "m.gguf", "F32", metadata={"method": "shortgpt"})
    r = GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids, mask = batch(tokenizer)
    real = mask.bool()
    got = back(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)


def test_block_removal_exports_where_llamacpp_can_hold_it():
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        assert W.block_removal_export_refusal(arch) is None
    assert "makes every sixth layer full attention" in W.block_removal_export_refusal("Gemma3ForCausalLM")
    assert "GGUF export writes LLaMA-architecture models" in W.block_removal_export_refusal("ChatGLMModel")


# ---- the method's name and what it refuses -----------------------------------------------------


def test_shortgpt_is_a_baseline_without_options():
    t = C.parse_method("shortgpt")
    assert (t["kind"], t["baseline"], t["selector"], t["bias"], t["needs_stats"], t["depth"]) == (
        "baseline",
        "shortgpt",
        "shortgpt",
        False,
        False,
        True,
    )
    # the other methods' dicts (the params of their jobs) are unchanged: no depth key
    assert all("depth" not in C.parse_method(m) for m in ("c8", "random", "flap_mlp_m8"))
    with pytest.raises(ValueError, match=r"'shortgpt_bias': shortgpt removes whole blocks, so bias compensation"):
        C.parse_method("shortgpt_bias")
    with pytest.raises(ValueError, match=r"'shortgpt_m8': shortgpt removes whole blocks, so a rounding multiple"):
        C.parse_method("shortgpt_m8")
    assert C.method_problems(["shortgpt_m8"], "targets.methods")[0].startswith("targets.methods: method 'shortgpt_m8'")
    assert "shortgpt" in C.METHOD_HELP


@pytest.fixture(scope="module")
def micro_cfg():
    base = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    for extra in ("config/paper.yaml", "config/micro.yaml"):
        over = yaml.safe_load(open(REPO / extra))
        for key, value in over.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and key == "models" else value
    return C.validate(base)


def test_targets_of_shortgpt_are_checked_by_name(micro_cfg):
    models = list(micro_cfg["models"])
    assert C.check_target("micro_r20_shortgpt", micro_cfg, models)["depth"]
    assert C.check_target("gemma_r20_shortgpt", micro_cfg, models)["depth"]
    for target, option in (
        ("micro_r20_shortgpt_bias", "bias compensation"),
        ("micro_r20_shortgpt_m64", "a rounding multiple"),
    ):
        with pytest.raises(ValueError, match="outside the path grammar") as e:
            C.check_target(target, micro_cfg, models)
        assert f"shortgpt removes whole blocks, so {option}" in str(e.value)
        assert "Nearest valid form: micro_r20_shortgpt" in str(e.value)
    with pytest.raises(ValueError, match=r"model chatglm3_6b \(ChatGLMModel\) does not support: ChatGLM3 is remote"):
        C.check_target("chatglm3_6b_r20_shortgpt", micro_cfg, models)


def test_a_config_that_runs_shortgpt_on_chatglm3_is_refused(micro_cfg):
    import copy

    cfg = copy.deepcopy(micro_cfg)
    cfg["targets"] = {**cfg["targets"], "models": ["chatglm3_6b"], "methods": ["shortgpt"]}
    with pytest.raises(ValueError, match=r"targets.methods: shortgpt removes whole blocks, which model chatglm3_6b"):
        C.check(cfg)
    assert C.method_refusals(cfg, ["chatglm3_6b", "micro"], "shortgpt") == C.block_removal_problems(
        cfg, ["chatglm3_6b"], "shortgpt"
    )


# ---- the workflow ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_shortgpt_runs_through_the_workflow_and_exports_as_llama(tmp_path):
    """results/micro_r20_shortgpt: block influence of both calibration batches, one of the two
    prunable blocks (of four, each a quarter of the block parameters) removed, an ordinary
    three-layer LLaMA evaluated and written as a plain llama GGUF; a rerun has nothing to do."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from helpers import snakemake
    from test_workflow import jobs_of

    targets = ("results/micro_r20_shortgpt/metrics.json", "results/micro_r20_shortgpt/model.f32.gguf")
    jobs = jobs_of(snakemake(tmp_path, "-n", *targets).stdout)
    assert jobs["block_influence"] == 2 and "extract" not in jobs and "calibration_stats" not in jobs, jobs
    assert jobs["mask_shortgpt"] == jobs["prune_blocks"] == jobs["metrics_depth"] == 1 and "prune" not in jobs, jobs
    snakemake(tmp_path, *targets)
    res = tmp_path / "results"
    m = json.loads((res / "micro_r20_shortgpt/metrics.json").read_text())
    assert m["method"] == "shortgpt" and m["ratio_requested"] == 0.2
    assert len(m["removed_layers"]) == 1 and m["removed_layers"][0] in (1, 2)
    assert m["kept_layers"] == [i for i in range(4) if i not in m["removed_layers"]]
    assert m["achieved_block_ratio"] == pytest.approx(0.25) and not m["bias_compensation"]
    influence = m["block_influence"]
    assert len(influence) == 4 and all(0 < x < 2 for x in influence)
    assert influence[m["removed_layers"][0]] == min(influence[1:3])
    assert m["calibration"]["tokens"] > 0
    assert {"block_influence", "mask", "prune", "perplexity"} <= set(m["stage_wall_s"])
    assert np.isfinite(m["perplexity"]["flap_token_ppl@64"]) and set(m["lm_eval"]) == {"fnprune_mc", "fnprune_ppl"}
    model_dir = res / "micro_r20_shortgpt/model"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 3
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert len(plain.model.layers) == 3 and m["parameters"] == sum(p.numel() for p in plain.parameters())
    r = GGUFReader(str(res / "micro_r20_shortgpt/model.f32.gguf"))
    assert r.fields["general.architecture"].contents() == "llama" and r.fields["llama.block_count"].contents() == 3
    assert r.fields["fnprune.method"].contents() == "shortgpt"
    assert "Nothing to be done" in snakemake(tmp_path, "-n", *targets).stdout


@pytest.mark.slow
def test_what_cannot_remove_blocks_is_refused_when_the_dag_is_built(tmp_path):
    from helpers import snakemake

    for target, needle in (
        ("results/gemma_r20_shortgpt/model.f16.gguf", "llama.cpp's gemma3 loader (llama-model.cpp, load_hparams)"),
        ("results/chatglm3_6b_r20_shortgpt/metrics.json", "ChatGLM3 is remote code"),
        ("results/micro_r20_shortgpt_bias/metrics.json", "bias compensation (_bias) does not apply"),
    ):
        proc = snakemake(tmp_path, "-n", target, check=False)
        assert proc.returncode != 0 and needle in proc.stdout + proc.stderr, (target, proc.stderr[-2000:])
