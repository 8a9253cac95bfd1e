import copy

import numpy as np
import pytest
import torch

from fnprune import adapters as A
from fnprune.heads import group_channels, head_geometry, heads_layout, prune_heads, resize_heads
from helpers import logits_with_fixed_inputs, tiny_llama

LAYERS, HEADS, HEAD_DIM = 4, 4, 16


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def o_projs(model) -> list[torch.nn.Linear]:
    ad = A.adapter_for(model)
    return [A._get(A.attn_of(b, ad), ad.o) for b in A.layers(model, ad)]


@torch.no_grad()
def o_input_means(model) -> list[np.ndarray]:
    ids, mask = inputs()
    sums = []
    handles = [
        o.register_forward_pre_hook(lambda mod, args: sums.append(args[0][mask.bool()].mean(0))) for o in o_projs(model)
    ]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return [s.double().numpy() for s in sums]


KEPT = {2: [[0, 1], [1], [0], [0, 1]], 4: [[0, 1, 2, 3], [1, 3], [0, 1, 2], [2]]}


@pytest.mark.parametrize("n_kv", [2, 4])
def test_head_geometry_and_removed_parameters(n_kv):
    model = tiny_llama(n_kv)
    geo = head_geometry(model)
    n_rep = HEADS // n_kv
    assert geo["n_heads"] == [HEADS] * LAYERS and geo["n_kv_heads"] == [n_kv] * LAYERS
    assert geo["head_dim"] == HEAD_DIM
    assert geo["group_params"] == [(2 * n_rep + 2) * HEAD_DIM * HEADS * HEAD_DIM] * LAYERS
    before = A.block_parameter_count(model)
    prune_heads(model, KEPT[n_kv])
    removed_groups = sum(n_kv - len(k) for k in KEPT[n_kv])
    assert before - A.block_parameter_count(model) == removed_groups * geo["group_params"][0]
    assert head_geometry(model)["n_kv_heads"] == [len(k) for k in KEPT[n_kv]]


def test_group_channels_follow_repeat_kv():
    assert group_channels([1], n_rep=2, head_dim=3).tolist() == [6, 7, 8, 9, 10, 11]
    assert group_channels([0, 2], n_rep=1, head_dim=2).tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv", [2, 4])
@pytest.mark.parametrize("compensate", [False, True])
def test_removed_heads_equal_fixed_o_inputs(n_kv, attn, compensate):
    dense = tiny_llama(n_kv, attn=attn)
    n_rep = HEADS // n_kv
    means = o_input_means(dense)
    fixed = {}
    for layer, keep in enumerate(KEPT[n_kv]):
        dropped = group_channels(sorted(set(range(n_kv)) - set(keep)), n_rep, HEAD_DIM)
        value = torch.as_tensor(means[layer])[dropped] if compensate else torch.zeros(len(dropped))
        fixed[layer] = (dropped, value)
    ids, mask = inputs()
    linears = o_projs(dense)
    expected = logits_with_fixed_inputs(
        dense, [(linears[layer], idx, val) for layer, (idx, val) in fixed.items()], input_ids=ids, attention_mask=mask
    )
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, KEPT[n_kv], means if compensate else None)
    ids, mask = inputs()
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    ad = A.adapter_for(pruned)
    for block, keep in zip(A.layers(pruned, ad), KEPT[n_kv]):
        attn_mod = A.attn_of(block, ad)
        assert attn_mod.num_key_value_groups == n_rep
        assert attn_mod.o_proj.in_features == len(keep) * n_rep * HEAD_DIM
        assert (attn_mod.o_proj.bias is not None) == (compensate and len(keep) < n_kv)


def test_pruned_heads_generate_with_cache():
    model = tiny_llama(2)
    prune_heads(model, KEPT[2], o_input_means(model))
    ids, mask = inputs()
    out = model.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_layout_rebuilds_pruned_shapes():
    pruned = tiny_llama(4)
    prune_heads(pruned, KEPT[4], o_input_means(pruned))
    fresh = tiny_llama(4, seed=1)
    resize_heads(fresh, heads_layout(pruned))
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=0, rtol=0)


def test_invalid_kept_groups_are_rejected():
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="every attention head group"):
        prune_heads(model, [[0, 1], [], [0], [1]])
    with pytest.raises(ValueError, match="not distinct"):
        prune_heads(model, [[0, 2], [0], [0], [1]])
    with pytest.raises(ValueError, match="o_proj input mean"):
        prune_heads(model, [[0, 1], [0], [0], [1]], [np.zeros(3)] * LAYERS)
