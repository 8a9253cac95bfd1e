"""Attention-head pruning (used by FLAP): remove whole key/value head groups.

Under grouped-query attention, ``n_rep = num_heads // num_kv_heads`` query heads share one
key/value head; the unit removed is such a group (one k/v head and its query heads), so the
module's ``num_key_value_groups`` stays valid. With multi-head attention a group is one head.
Sizes come from the modules and the config, never from a hard-coded head size.
"""

from __future__ import annotations

import torch

from . import adapters as A


def head_geometry(model) -> dict:
    """Head dim, heads and k/v heads per layer, and the parameters one head group owns."""
    ad = A.adapter_for(model)
    cfg = model.config
    out = {"n_heads": [], "n_kv_heads": [], "head_dim": None, "group_params": []}
    for block in A.layers(model, ad):
        attn = A.attn_of(block, ad)
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // getattr(cfg, ad.n_heads_attr)
        o = A._get(attn, ad.o)
        n_heads = o.in_features // head_dim
        if ad.qkv is not None:
            raise NotImplementedError("head pruning of fused qkv projections is not supported yet")
        n_kv = A._get(attn, ad.k).out_features // head_dim
        n_rep = n_heads // n_kv
        hidden = o.out_features
        per_group = (n_rep + 2) * head_dim * hidden + n_rep * head_dim * hidden  # q, k, v rows + o cols
        for name in (ad.q, ad.k, ad.v):
            if A._get(attn, name).bias is not None:
                per_group += head_dim * (n_rep if name == ad.q else 1)
        out["n_heads"].append(n_heads)
        out["n_kv_heads"].append(n_kv)
        out["group_params"].append(per_group)
        out["head_dim"] = head_dim
    return out


def prune_heads(model, kept_groups: list[list[int]]) -> None:
    """Keep only the listed k/v head groups of every layer (sorted indices), in place."""
    ad = A.adapter_for(model)
    geo = head_geometry(model)
    hd = geo["head_dim"]
    for layer, (block, keep) in enumerate(zip(A.layers(model, ad), kept_groups)):
        n_kv = geo["n_kv_heads"][layer]
        if len(keep) == n_kv:
            continue
        n_rep = geo["n_heads"][layer] // n_kv
        attn = A.attn_of(block, ad)
        keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
        kv_rows = (keep_t[:, None] * hd + torch.arange(hd)).flatten()
        q_heads = (keep_t[:, None] * n_rep + torch.arange(n_rep)).flatten()
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
        dev = A._get(attn, ad.q).weight.device
        A._set(attn, ad.q, A._sliced_linear(A._get(attn, ad.q), rows=q_rows.to(dev)))
        A._set(attn, ad.k, A._sliced_linear(A._get(attn, ad.k), rows=kv_rows.to(dev)))
        A._set(attn, ad.v, A._sliced_linear(A._get(attn, ad.v), rows=kv_rows.to(dev)))
        A._set(attn, ad.o, A._sliced_linear(A._get(attn, ad.o), cols=q_rows.to(dev)))
        for attr, val in (("num_heads", len(keep) * n_rep), ("num_key_value_heads", len(keep))):
            if hasattr(attn, attr):
                setattr(attn, attr, val)


def heads_layout(model) -> dict:
    ad = A.adapter_for(model)
    if ad.qkv is not None:
        return {}
    geo = head_geometry(model)
    return {"n_heads": geo["n_heads"], "n_kv_heads": geo["n_kv_heads"],
            "o_bias": [A._get(A.attn_of(b, ad), ad.o).bias is not None for b in A.layers(model, ad)]}


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
