"""Token perplexity, the FLAP / LLM-Pruner protocol.

The test texts are joined with ``"\\n\\n"``, tokenised once and cut into non-overlapping windows
of ``seqlen`` tokens (the last partial window is dropped; ``max_windows`` keeps that many, evenly
spaced); each window is scored on its own and PPL = exp(mean over windows of the window's mean next-token NLL).
A model whose tokenizer starts every text with BOS sees one before each window (:func:`bos_prefix`).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)

PROTOCOL = "flap_token_ppl"


def windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"test text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def bos_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it by default, else None.

    Such a model (Gemma) was trained with BOS at the start of every sequence and predicts badly
    without it, so each window is scored after a BOS; the tokens predicted are the same as
    without it (the window's second to last), so the protocol is unchanged for other models."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


@torch.no_grad()
def token_perplexity(
    model,
    tokenizer,
    texts: list[str],
    seqlen: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    bos: bool | None = None,
) -> dict:
    """FLAP-protocol perplexity of ``model`` on ``texts``; returns the value and its provenance, with
    every window's mean token NLL (``window_nll``: the pairing of two models' perplexities).
    ``bos``: a BOS before each window; None: where the tokenizer adds one (:func:`bos_prefix`)."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    bos = bos_prefix(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    if max_len is not None and seqlen + (bos is not None) > max_len:
        raise ValueError(
            f"perplexity seqlen {seqlen}{' + BOS' if bos is not None else ''} exceeds the model's "
            f"max_position_embeddings {max_len}"
        )
    t0 = time.time()
    rows = windows(tokenizer, texts, seqlen)
    available = len(rows)
    if max_windows and max_windows < available:
        # Evenly spaced over the whole text, so every part of the test split is represented.
        rows = rows[torch.linspace(0, available - 1, max_windows).round().long()]
    device = next(model.parameters()).device
    model.eval()
    nlls = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"ppl seqlen={seqlen}", mininterval=5):
        x = rows[i : i + batch_size].to(device)
        if bos is None:
            logits = model(input_ids=x, use_cache=False).logits.float()
        else:
            x_in = torch.cat([torch.full_like(x[:, :1], bos), x], 1)
            logits = model(input_ids=x_in, use_cache=False).logits[:, 1:].float()
        nll = (
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            .view(x.shape[0], -1)
            .mean(1)
        )
        nlls.append(nll.double().cpu())
    mean_nll = float(torch.cat(nlls).mean())
    out = {
        "protocol": PROTOCOL,
        "seqlen": seqlen,
        "windows": len(rows),
        "windows_available": available,  # windows of the whole test text (max_windows: evenly spaced)
        "bos_prefix": bos is not None,
        "tokens": int(rows.numel()),
        "nll": mean_nll,
        "ppl": math.exp(mean_nll),
        "wall_s": time.time() - t0,
        "window_nll": torch.cat(nlls).tolist(),
    }
    log.info("%s seqlen=%d: %.3f over %d windows", PROTOCOL, seqlen, out["ppl"], len(rows))
    return out
