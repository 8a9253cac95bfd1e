"""Attention-head pruning (used by FLAP): remove whole key/value head groups.

Under grouped-query attention, ``n_rep = num_heads // num_kv_heads`` query heads share one
key/value head; the unit removed is such a group (one k/v head and its query heads), so the
module's ``num_key_value_groups`` stays valid. With multi-head attention a group is one head.
Query head ``h`` reads k/v head ``h // n_rep`` and owns the ``o_proj`` input channels
``[h * head_dim, (h + 1) * head_dim)``. Sizes come from the modules and the config, never from
a hard-coded head size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import adapters as A


def _head_dim(model, attn: nn.Module, ad: A.Adapter) -> int:
    cfg = model.config
    return getattr(attn, "head_dim", None) or cfg.hidden_size // getattr(cfg, ad.n_heads_attr)


def head_geometry(model) -> dict:
    """Head dim, heads and k/v heads per layer, and the parameters one head group owns."""
    ad = A.adapter_for(model)
    if ad.qkv is not None:
        raise NotImplementedError(
            "head pruning of fused qkv projections is not supported yet; use an MLP-only method (e.g. flap_mlp)"
        )
    out: dict = {"n_heads": [], "n_kv_heads": [], "head_dim": None, "group_params": []}
    for block in A.layers(model, ad):
        attn = A.attn_of(block, ad)
        head_dim = _head_dim(model, attn, ad)
        o = A._get(attn, ad.o)
        n_heads = o.in_features // head_dim
        n_kv = A._get(attn, ad.k).out_features // head_dim
        n_rep = n_heads // n_kv
        per_group = (2 * n_rep + 2) * head_dim * o.out_features
        for name, rows in ((ad.q, n_rep), (ad.k, 1), (ad.v, 1)):
            if A._get(attn, name).bias is not None:
                per_group += rows * head_dim
        out["n_heads"].append(n_heads)
        out["n_kv_heads"].append(n_kv)
        out["group_params"].append(per_group)
        out["head_dim"] = head_dim
    return out


def group_channels(groups: Sequence[int] | torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """``o_proj`` input channels (= ``q_proj`` output rows) of k/v head groups, in order."""
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    heads = (g[:, None] * n_rep + torch.arange(n_rep)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _kv_rows(groups: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _checked_groups(keep: Sequence[int], n_kv: int, layer: int) -> torch.Tensor:
    keep_t = torch.as_tensor(sorted(int(g) for g in keep), dtype=torch.long)
    if len(keep_t) == 0:
        raise ValueError(f"layer {layer}: every attention head group would be removed; keep at least one")
    if len(set(keep_t.tolist())) != len(keep_t) or keep_t[0] < 0 or keep_t[-1] >= n_kv:
        raise ValueError(f"layer {layer}: kept head groups {keep_t.tolist()} are not distinct indices in [0, {n_kv})")
    return keep_t


def o_bias_compensation(
    o_weight: torch.Tensor, dropped_channels: torch.Tensor, mean: np.ndarray | torch.Tensor
) -> torch.Tensor:
    """FLAP's compensation ``W_o[:, dropped] @ mean[dropped]`` (computed in float64)."""
    mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float64, device=o_weight.device)
    idx = dropped_channels.to(o_weight.device)
    return (o_weight[:, idx].double() @ mean_t[idx]).to(o_weight.dtype)


def _prune_attention(
    attn: nn.Module, ad: A.Adapter, keep: torch.Tensor, n_kv: int, n_rep: int, head_dim: int, o_mean: np.ndarray | None
) -> None:
    q_rows = group_channels(keep, n_rep, head_dim)
    kv_rows = _kv_rows(keep, head_dim)
    o = A._get(attn, ad.o)
    dev = o.weight.device
    bias = None
    if o_mean is not None:
        if o_mean.shape != (o.in_features,):
            raise ValueError(
                f"o_proj input mean of shape {o_mean.shape} for an o_proj with "
                f"{o.in_features} inputs; statistics from another model?"
            )
        dropped = torch.as_tensor(np.setdiff1d(np.arange(n_kv), keep.numpy()), dtype=torch.long)
        bias = o_bias_compensation(o.weight.data, group_channels(dropped, n_rep, head_dim), o_mean)
    for name, rows in ((ad.q, q_rows), (ad.k, kv_rows), (ad.v, kv_rows)):
        A._set(attn, name, A._sliced_linear(A._get(attn, name), rows=rows.to(dev)))
    new_o = A._sliced_linear(o, cols=q_rows.to(dev), bias=True if bias is not None else None)
    if bias is not None:
        new_o.bias.data += bias
    A._set(attn, ad.o, new_o)
    for attr, val in (("num_heads", len(keep) * n_rep), ("num_key_value_heads", len(keep))):
        if hasattr(attn, attr):
            setattr(attn, attr, val)


def prune_heads(
    model, kept_groups: Sequence[Sequence[int]], o_mean: Sequence[np.ndarray] | np.ndarray | None = None
) -> None:
    """Keep only the listed k/v head groups of every layer, in place.

    With ``o_mean`` (per layer, the calibration mean of each ``o_proj`` input channel), the
    removed heads' mean output is folded into an ``o_proj`` bias (FLAP's bias compensation):
    ``b = W_o[:, dropped] @ mean[dropped]``. Layers that keep every group are left untouched.
    """
    ad = A.adapter_for(model)
    geo = head_geometry(model)
    hd = geo["head_dim"]
    blocks = A.layers(model, ad)
    if len(kept_groups) != len(blocks):
        raise ValueError(f"kept head groups given for {len(kept_groups)} layers; the model has {len(blocks)}")
    for layer, (block, keep) in enumerate(zip(blocks, kept_groups)):
        n_kv = geo["n_kv_heads"][layer]
        keep_t = _checked_groups(keep, n_kv, layer)
        if len(keep_t) == n_kv:
            continue
        mean = None if o_mean is None else np.asarray(o_mean[layer], dtype=np.float64)
        _prune_attention(A.attn_of(block, ad), ad, keep_t, n_kv, geo["n_heads"][layer] // n_kv, hd, mean)


def heads_layout(model) -> dict:
    ad = A.adapter_for(model)
    if ad.qkv is not None:
        return {}
    geo = head_geometry(model)
    return {
        "n_heads": geo["n_heads"],
        "n_kv_heads": geo["n_kv_heads"],
        "o_bias": [A._get(A.attn_of(b, ad), ad.o).bias is not None for b in A.layers(model, ad)],
    }


def resize_heads(model, layout: dict) -> None:
    """Give a freshly built model the per-layer head counts (and o_proj biases) of ``layout``."""
    if "n_kv_heads" not in layout:
        return
    ad = A.adapter_for(model)
    prune_heads(model, [list(range(n)) for n in layout["n_kv_heads"]])
    for block, bias in zip(A.layers(model, ad), layout.get("o_bias", [])):
        attn = A.attn_of(block, ad)
        o = A._get(attn, ad.o)
        if bias and o.bias is None:
            A._set(attn, ad.o, A._sliced_linear(o, bias=True))
