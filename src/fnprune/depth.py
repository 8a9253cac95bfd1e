"""Depth pruning, ShortGPT's baseline (Men et al., 2024): remove the blocks that change their input least.

A block's influence on the calibration tokens is ``BI = mean over tokens of 1 - cos(h_in, h_out)``,
``h_in`` the hidden state entering the block and ``h_out`` the one leaving it (padding excluded).
The calibration pass (:func:`block_influence`) records per block the sum of ``1 - cos`` and the
token count, so batches add up. The prunable blocks of lowest influence are removed, in one shot,
until the removed block parameters reach the ratio (:func:`select_blocks`): whole blocks, so the
achieved ratio is at least the requested one and is recorded. The pruned model
(:func:`fnprune.adapters.keep_layers`) is an ordinary model of the same architecture with fewer
layers; bias compensation does not apply (nothing of a kept block is removed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import adapters as A
from .extract import _decoder, tokenize_batch
from .mask import mask_record, n_to_drop, prunable_layers, threshold_between

# What a block influence file (one calibration batch) holds; ``dtype``: the dtype the pass ran in.
INFLUENCE_KEYS = ("influence_sum", "n_tokens", "wall_s", "dtype")

log = logging.getLogger(__name__)


def _padded(seqs: list[list[int]], micro_batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded micro-batches of token ids and their attention masks."""
    for start in range(0, len(seqs), micro_batch_size):
        chunk = seqs[start : start + micro_batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        yield ids, mask


def _hidden(t) -> torch.Tensor:
    """A block's hidden state: its output tensor, or the first element of the tuple it returns."""
    return t[0] if isinstance(t, (tuple, list)) else t


@torch.no_grad()
def block_influence(model, tokenizer, texts: list[str], max_length: int, micro_batch_size: int = 8) -> dict:
    """ShortGPT's block influence of every block of ``model`` over ``texts``.

    Returns ``influence_sum`` (per block, the sum over non-padding tokens of ``1 - cos(h_in,
    h_out)``, float64), ``n_tokens`` and ``wall_s``. Texts are tokenised and truncated as the
    extraction does (:func:`fnprune.extract.tokenize_batch`); each block's input and output are
    taken by a forward hook, reduced at once and never stored.
    """
    t0 = time.time()
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    seqs = tokenize_batch(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    sums = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    valid: list[torch.Tensor] = []  # flat indices of the current micro-batch's non-padding tokens

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = A.batch_first(t, ad)
        return t.reshape(-1, t.shape[-1]).index_select(0, valid[0]).float()

    def hook(i: int):
        def after(mod, args, kwargs, out):
            h_in = rows(args[0] if args else kwargs["hidden_states"])
            cos = torch.nn.functional.cosine_similarity(h_in, rows(_hidden(out)), dim=-1)
            sums[i] += (1.0 - cos).double().sum()

        return after

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    body = _decoder(model)
    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for ids, mask in _padded(seqs, micro_batch_size, pad_id):
            valid[:] = [mask.flatten().nonzero().squeeze(1).to(device)]
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = sums.cpu().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError(
            f"blocks {np.flatnonzero(~np.isfinite(out)).tolist()}: non-finite block influence "
            f"(overflow in the model dtype? try dtype: float32)"
        )
    n_tokens = sum(len(s) for s in seqs)
    wall = time.time() - t0
    log.info("block influence: %d texts, %d tokens, %d blocks in %.1f s", len(seqs), n_tokens, len(blocks), wall)
    return {"influence_sum": out, "n_tokens": n_tokens, "wall_s": wall}


def block_parameters(model) -> list[int]:
    """Parameters of every block (attention, MLP, norms), in order; works on the meta device."""
    return [sum(p.numel() for p in b.parameters()) for b in A.layers(model)]


def select_blocks(
    influence: Sequence[float], block_params: Sequence[int], prunable: Sequence[bool], ratio: float
) -> tuple[list[int], float]:
    """The blocks to remove: prunable blocks in ascending influence (ties: the earlier block first)
    until their parameters reach ``ratio`` of all block parameters, never fewer.

    Returns the removed blocks (ascending) and the influence threshold between the last removed
    and the first kept candidate. Raises when the prunable blocks together hold less than the ratio.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1); got {ratio}")
    influence = np.asarray(influence, dtype=np.float64)
    if len(influence) != len(block_params) or len(influence) != len(prunable):
        raise ValueError(
            f"{len(influence)} block influences, {len(block_params)} block sizes and {len(prunable)} "
            f"prunable flags: one of each per block"
        )
    total = int(sum(block_params))
    candidates = [i for i in np.argsort(influence, kind="stable") if prunable[i]]
    available = sum(block_params[i] for i in candidates)
    if available < ratio * total * (1 - 1e-12):
        raise ValueError(
            f"ratio {ratio} needs {ratio * total:.0f} block parameters removed but the {len(candidates)} "
            f"prunable blocks hold only {available}; lower the ratio or protect fewer layers "
            f"(protect_first / protect_last)"
        )
    removed, n = 0, 0
    while removed < ratio * total * (1 - 1e-12):
        removed += block_params[candidates[n]]
        n += 1
    threshold = threshold_between(influence[candidates], n)
    return sorted(int(i) for i in candidates[:n]), threshold


def shortgpt_mask(
    influence_sum: Sequence[float],
    n_tokens: int,
    block_params: Sequence[int],
    intermediate_sizes: Sequence[int],
    neuron_params: int,
    total_params: int,
    ratio: float,
    protect_first: int,
    protect_last: int,
    **extra,
) -> dict:
    """The mask record of ``shortgpt`` (:func:`fnprune.mask.mask_record`): a removed block keeps no
    neuron, a kept one all of them, and ``removed_other_params`` counts the removed blocks'
    attention and norms, so the achieved ratios are those of the removed blocks. Adds
    ``kept_layers``, ``removed_layers``, ``block_influence`` (mean per token, every block),
    ``block_params`` of each block (``layer_params``) and ``extra``."""
    if n_tokens < 1:
        raise ValueError("block influence over no calibration tokens")
    influence = np.asarray(influence_sum, dtype=np.float64) / n_tokens
    n = len(influence)
    prunable = prunable_layers(n, protect_first, protect_last)
    removed, threshold = select_blocks(influence, block_params, prunable, ratio)
    kept = [np.zeros(0, dtype=np.int64) if i in removed else np.arange(s) for i, s in enumerate(intermediate_sizes)]
    other = sum(block_params[i] - intermediate_sizes[i] * neuron_params for i in removed)
    return mask_record(
        kept,
        list(intermediate_sizes),
        int(sum(block_params)),
        total_params,
        neuron_params,
        method="shortgpt",
        kind="baseline",
        ratio_requested=ratio,
        prunable=prunable,
        n_drop=n_to_drop(ratio, int(sum(block_params)), neuron_params),
        min_keep=0,
        selection="blocks",
        threshold=threshold,
        removed_other_params=int(other),
        kept_layers=[i for i in range(n) if i not in removed],
        removed_layers=removed,
        block_influence=influence.tolist(),
        layer_params=[int(p) for p in block_params],
        **extra,
    )
