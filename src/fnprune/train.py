"""Train the embedded default: a byte-level BPE tokenizer and a small LlamaForCausalLM.

The result is saved with ``save_pretrained`` and loads like any hub model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .io import atomic_dir, versions, write_json

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def pack_tokens(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate the texts (EOS between them) and cut into rows of ``seq_len`` tokens."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(spec: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec.get("num_kv_heads", spec["num_heads"]),
        max_position_embeddings=spec["max_position"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def mean_nll(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        out = model(input_ids=x, labels=x)
        total += out.loss.item() * len(x)
        n += len(x)
    return total / max(n, 1)


def train_embedded_model(
    train_texts: list[str], val_texts: list[str], spec: dict, out_dir: str | Path, seed: int = 0
) -> dict:
    """Train tokenizer and model on ``train_texts``; save both to ``out_dir`` atomically.

    ``spec`` is the ``models.<name>.train`` config entry. Training runs a fixed number of
    optimiser steps (never a wall-clock budget), so the same config gives the same weights.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(train_texts, spec["vocab_size"])
    train_rows = pack_tokens(tokenizer, train_texts, spec["seq_len"])
    val_rows = pack_tokens(tokenizer, val_texts, spec["seq_len"])
    log.info(
        "tokenizer: %d tokens in vocabulary; %d train rows, %d validation rows of %d tokens",
        len(tokenizer),
        len(train_rows),
        len(val_rows),
        spec["seq_len"],
    )
    if len(train_rows) < spec["batch_size"]:
        raise ValueError(
            f"train split has {len(train_rows)} rows of {spec['seq_len']} tokens; "
            f"models.*.train.batch_size={spec['batch_size']} needs at least that many"
        )

    model = build_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters", n_params)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    steps, warmup = spec["steps"], max(1, spec["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="train", mininterval=5):
        idx = torch.randint(len(train_rows), (spec["batch_size"],), generator=gen)
        x = train_rows[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("step %d/%d: train loss %.3f", step + 1, steps, sum(losses[-50:]) / len(losses[-50:]))

    val_nll = mean_nll(model, val_rows)
    info = {
        "parameters": n_params,
        "steps": steps,
        "train_tokens_seen": steps * spec["batch_size"] * spec["seq_len"],
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "validation_nll": val_nll,
        "validation_ppl": math.exp(val_nll),
        "seed": seed,
        "spec": spec,
        "wall_s": time.time() - t0,
        "versions": versions(),
    }
    log.info("validation perplexity %.2f after %.0f s", info["validation_ppl"], info["wall_s"])
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training.json", info)
    return info
