import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from fnprune import adapters as A
from fnprune.baselines import METHODS, baseline_mask
from fnprune.extract import extract_batch, load_stats
from fnprune.heads import group_channels, head_geometry
from fnprune.mask import MASK_KEYS
from fnprune.modeling import apply_mask, load_pruned, save_pruned
from fnprune.train import train_tokenizer
from helpers import logits_with_fixed_inputs, tiny_llama

LAYERS, HEADS, HEAD_DIM, INTER = 4, 4, 16, 128
PROTECT = (1, 1)
WORDS = (
    "the a function returns value list of string module object class method file path error "
    "type name raises when argument default is not None and or if for in with"
).split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(texts(200, 0), vocab_size=300)


def llama_with_weak_heads(n_kv: int, vocab: int) -> LlamaForCausalLM:
    """A tiny LLaMA whose first head group of layers 1 and 2 barely contributes (FLAP should drop it)."""
    model = tiny_llama(n_kv, vocab, LAYERS, HEADS, HEAD_DIM, INTER)
    with torch.no_grad():
        for layer in (1, 2):
            cols = group_channels([0], HEADS // n_kv, HEAD_DIM)
            model.model.layers[layer].self_attn.o_proj.weight[:, cols] *= 0.05
    return model


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def setup(request, tokenizer, tmp_path_factory):
    model = llama_with_weak_heads(request.param, len(tokenizer))
    out = tmp_path_factory.mktemp(f"stats{request.param}")
    extract_batch(
        model,
        tokenizer,
        texts(24, 1),
        [out / f"layer{i}.npy" for i in range(LAYERS)],
        out / "stats.npz",
        max_length=32,
        micro_batch_size=8,
        shard_dtype="float32",
    )
    return model, load_stats([out / "stats.npz"])


def mask_of(method, setup, ratio=0.2, seed=0):
    model, stats = setup
    return baseline_mask(method, model, stats, ratio, *PROTECT, seed=seed)


def down_weight(model, layer) -> np.ndarray:
    return model.model.layers[layer].mlp.down_proj.weight.detach().double().numpy()


def o_weight(model, layer) -> np.ndarray:
    return model.model.layers[layer].self_attn.o_proj.weight.detach().double().numpy()


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def direct_flap_scores(model, stats, layer: int) -> tuple[np.ndarray, np.ndarray]:
    w_down, w_o = down_weight(model, layer), o_weight(model, layer)
    neuron = np.array([stats["down_var"][layer][j] * np.sum(w_down[:, j] ** 2) for j in range(INTER)])
    channel = np.array([(stats["o_var"][layer][c] * np.sum(w_o[:, c] ** 2)) ** 2 for c in range(HEADS * HEAD_DIM)])
    per_head = standardised(channel).reshape(HEADS, HEAD_DIM).mean(axis=1)
    n_kv = model.config.num_key_value_heads
    group = per_head.reshape(n_kv, HEADS // n_kv).mean(axis=1)
    return standardised(neuron), group


def prunable() -> list[int]:
    return list(range(PROTECT[0], LAYERS - PROTECT[1]))


def test_flap_threshold_splits_direct_scores(setup):
    model, stats = setup
    mask = mask_of("flap", setup, ratio=0.3)
    thr = mask["threshold"]
    n_kv = model.config.num_key_value_heads
    assert sum(n_kv - len(k) for k in mask["kept_heads"]) > 0
    for layer in prunable():
        neuron, group = direct_flap_scores(model, stats, layer)
        dropped = np.setdiff1d(np.arange(INTER), mask["kept"][layer])
        assert (neuron[dropped] <= thr).all() and (neuron[mask["kept"][layer]] > thr).all()
        gone = np.setdiff1d(np.arange(n_kv), mask["kept_heads"][layer])
        assert (group[gone] <= thr).all() and (group[mask["kept_heads"][layer]] > thr).all()


def test_flap_mlp_threshold_splits_direct_scores(setup):
    model, stats = setup
    mask = mask_of("flap_mlp", setup)
    assert "kept_heads" not in mask and (mask["kind"], mask["selection"]) == ("baseline", "global")
    for layer in prunable():
        neuron, _ = direct_flap_scores(model, stats, layer)
        dropped = np.setdiff1d(np.arange(INTER), mask["kept"][layer])
        thr = mask["threshold"]
        assert (neuron[dropped] <= thr).all() and (neuron[mask["kept"][layer]] > thr).all()


@pytest.mark.parametrize(
    "method,direct",
    [
        ("magnitude", lambda w, st, layer: np.linalg.norm(w, axis=0)),
        ("wanda_sp", lambda w, st, layer: np.abs(w).mean(axis=0) * np.sqrt(st["down_sqnorm"][layer])),
    ],
)
def test_uniform_methods_drop_lowest_direct_scores(setup, method, direct):
    model, stats = setup
    mask = mask_of(method, setup)
    assert mask["threshold"] is None and (mask["kind"], mask["selection"]) == ("baseline", "uniform")
    counts = {len(mask["kept"][layer]) for layer in prunable()}
    assert max(counts) - min(counts) <= 1
    for layer in prunable():
        score = direct(down_weight(model, layer), stats, layer)
        dropped = np.setdiff1d(np.arange(INTER), mask["kept"][layer])
        assert score[dropped].max() <= score[mask["kept"][layer]].min()


@pytest.mark.parametrize("ratio", [0.1, 0.25])
@pytest.mark.parametrize("method", METHODS)
def test_ratio_protection_and_parameter_accounting(setup, method, ratio):
    model, _ = setup
    mask = mask_of(method, setup, ratio=ratio)
    neuron = A.mlp_neuron_params(model.model.layers[0], A.adapter_for(model))
    unit = max(neuron, head_geometry(model)["group_params"][0]) if method == "flap" else neuron
    block = A.block_parameter_count(model)
    assert abs(mask["removed_block_params"] - ratio * block) <= unit
    assert mask["achieved_block_ratio"] == pytest.approx(mask["removed_block_params"] / block)
    assert mask["method"] == method and mask["ratio_requested"] == ratio
    assert set(MASK_KEYS) <= set(mask) and mask["prunable"] == [i in prunable() for i in range(LAYERS)]
    for layer in set(range(LAYERS)) - set(prunable()):
        assert mask["kept"][layer] == list(range(INTER))
        if "kept_heads" in mask:
            assert mask["kept_heads"][layer] == list(range(model.config.num_key_value_heads))
    pruned = copy.deepcopy(model)
    apply_mask(pruned, mask)
    assert block - A.block_parameter_count(pruned) == mask["removed_block_params"]


def test_random_is_seeded(setup):
    assert mask_of("random", setup, seed=3)["kept"] == mask_of("random", setup, seed=3)["kept"]
    assert mask_of("random", setup, seed=3)["kept"] != mask_of("random", setup, seed=4)["kept"]


def flap_pruned(setup, ratio=0.3):
    model, stats = setup
    mask = mask_of("flap", setup, ratio=ratio)
    pruned = copy.deepcopy(model)
    apply_mask(pruned, mask, down_mean=stats["down_mean"], o_mean=stats["o_mean"])
    return pruned, mask


def test_flap_pruned_model_equals_dense_with_mean_inputs(setup, tokenizer):
    model, stats = setup
    pruned, mask = flap_pruned(setup)
    n_kv = model.config.num_key_value_heads
    fixed = []
    for layer, block in enumerate(model.model.layers):
        drop = torch.as_tensor(np.setdiff1d(np.arange(INTER), mask["kept"][layer]))
        fixed.append((block.mlp.down_proj, drop, torch.as_tensor(stats["down_mean"][layer])[drop]))
        gone = group_channels(np.setdiff1d(np.arange(n_kv), mask["kept_heads"][layer]), HEADS // n_kv, HEAD_DIM)
        fixed.append((block.self_attn.o_proj, gone, torch.as_tensor(stats["o_mean"][layer])[gone]))
    ids = torch.tensor([tokenizer(t)["input_ids"][:20] for t in texts(2, 7)])
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
    torch.testing.assert_close(got, logits_with_fixed_inputs(model, fixed, input_ids=ids), atol=1e-5, rtol=0)


def test_flap_pruned_model_save_load_round_trip(setup, tokenizer, tmp_path):
    pruned, mask = flap_pruned(setup)
    save_pruned(pruned, tokenizer, tmp_path / "pruned", {"method": "flap", "mask": mask})
    loaded = load_pruned(tmp_path / "pruned", device="cpu")
    ids = torch.tensor([tokenizer(t)["input_ids"][:16] for t in texts(2, 8)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=0, rtol=0)
    assert head_geometry(loaded)["n_kv_heads"] == [len(k) for k in mask["kept_heads"]]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_errors_name_the_problem(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_mask("sparsegpt", model, None, 0.2, *PROTECT)
    with pytest.raises(ValueError, match="down_var"):
        baseline_mask("flap", model, {}, 0.2, *PROTECT)
    with pytest.raises(ValueError, match="lower the ratio"):
        baseline_mask("flap", model, setup[1], 0.9, *PROTECT)
