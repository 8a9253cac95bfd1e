"""LoRA recovery: peft's LoRA on every linear of the transformer blocks, trained on packed windows
of a corpus's train split, then merged into the weights.

The model that comes out is an ordinary (pruned) model: the same per-layer shapes as the one that
went in, every ``nn.Linear`` of a block changed by its low-rank update ``B A * alpha / rank``, and
no peft module left. Embeddings, norms and the LM head stay as they were.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import torch

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.1  # linear warm-up over this share of the steps, then cosine decay to zero
TAIL_FRACTION = 0.1  # the loss "at the end" is the mean over this last share of the steps
ADAPTER = "default"  # peft's name of the one adapter


def block_linear_names(model) -> list[str]:
    """Module names of every ``nn.Linear`` inside the model's transformer blocks (the adapter's
    ``layers``): attention and MLP projections, fused or not, at whatever widths pruning left."""
    from torch import nn

    from . import adapters as A

    ad = A.adapter_for(model)
    return [
        f"{ad.layers}.{i}.{name}"
        for i, block in enumerate(A.layers(model, ad))
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


def add_lora(model, rank: int, alpha: float, seed: int):
    """``model`` wrapped by peft with a LoRA adapter on :func:`block_linear_names` (dropout 0, no
    bias); A is drawn from ``seed``, B starts at zero, so the wrapped model computes what ``model``
    did. Adapter weights are float32 whatever the model's dtype (peft's default)."""
    from peft import LoraConfig, get_peft_model

    targets = block_linear_names(model)
    if not targets:
        raise ValueError(f"{type(model).__name__}: no linear layer in its blocks to put LoRA on")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, cfg)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def token_windows(tokenizer, texts: list[str], seq_len: int, n_windows: int, seed: int) -> tuple[torch.Tensor, dict]:
    """``n_windows`` rows of ``seq_len`` tokens: the texts in a seeded order, tokenised without
    special tokens, joined by EOS and cut back to back; the rows then in a seeded order. Texts are
    tokenised only until the windows are filled; when the split holds fewer tokens, another seeded
    order of it follows (``passes`` > 1 is recorded and logged)."""
    if not texts:
        raise ValueError("the train split holds no text to tune on")
    gen = torch.Generator().manual_seed(seed)
    need = n_windows * seq_len
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    passes, texts_read = 0, 0
    while len(ids) < need:
        passes += 1
        order = torch.randperm(len(texts), generator=gen).tolist()
        for start in range(0, len(order), 32):
            chunk = [texts[i] for i in order[start : start + 32]]
            for enc in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                ids.extend(enc)
                ids.extend(sep)
            texts_read += len(chunk)
            if len(ids) >= need:
                break
        if passes == 1 and len(ids) < need:
            if not ids:
                raise ValueError("the train split's texts tokenise to nothing")
            log.warning(
                "the train split holds %d tokens, fewer than the %d of the budget: it is read %.1f times",
                len(ids),
                need,
                need / len(ids),
            )
    rows = torch.tensor(ids[:need], dtype=torch.long).view(n_windows, seq_len)
    rows = rows[torch.randperm(n_windows, generator=gen)]
    return rows, {"texts": len(texts), "texts_read": texts_read, "passes": passes}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate's factor at ``step``: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _LogStream:
    """A file for tqdm that writes each refresh of the bar as one line of the job's log."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.logger.info(text)

    def flush(self) -> None:
        pass


def finetune(model, rows: torch.Tensor, lr: float, batch_size: int, clip: float = 1.0) -> dict:
    """Train the trainable (LoRA) weights of ``model`` on ``rows``, ``batch_size`` rows a step in
    order: AdamW (no weight decay), :func:`lr_factor`'s schedule, gradients clipped to norm
    ``clip``. A tqdm bar and the loss every tenth of the steps go to the log. Returns the loss
    curve (one value a step), the loss of the first step (the untuned model's, on its batch), the
    mean loss over the first and over the last tenth of the steps (``TAIL_FRACTION``: compare
    these two, a single batch is noisy), and the step counts; the model is left in eval mode."""
    from tqdm import tqdm

    steps = len(rows) // batch_size
    if steps < 1:
        raise ValueError(f"{len(rows)} windows make no step of {batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    device = next(p.device for p in model.parameters())
    every = max(1, steps // 10)
    losses: list[float] = []
    t0 = time.time()
    model.train()
    bar = tqdm(range(steps), desc="lora", file=_LogStream(log), mininterval=30, ascii=True)
    try:
        for step in bar:
            x = rows[step * batch_size : (step + 1) * batch_size].to(device)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"LoRA loss is {losses[-1]} at step {step + 1}; lower lora.lr")
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if (step + 1) % every == 0 or step + 1 == steps:
                recent = losses[-every:]
                log.info(
                    "step %d/%d: loss %.4f (mean of the last %d steps), lr %.2e",
                    step + 1,
                    steps,
                    sum(recent) / len(recent),
                    len(recent),
                    sched.get_last_lr()[0],
                )
    finally:
        bar.close()
        model.eval()
    n = max(1, math.ceil(TAIL_FRACTION * steps))
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "loss_start": losses[0],
        "loss_first": sum(losses[:n]) / n,
        "loss_end": sum(losses[-n:]) / n,
        "loss_end_steps": n,
        "loss_curve": losses,
        "train_wall_s": time.time() - t0,
    }


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights of a peft model, as float32 copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def merge(model, state: dict[str, torch.Tensor], rank: int, alpha: float, out_dtype: torch.dtype) -> tuple:
    """``model`` (float32) with the LoRA weights ``state`` merged into its block linears by peft's
    ``merge_and_unload``, then cast to ``out_dtype``. Returns the plain model and, when
    ``out_dtype`` is not float32, how much of the update the rounding lost: the norm of
    (rounded - exact merged weights) over the norm of the update, over all merged linears."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("merge expects the model in float32 (the update is added, then rounded once)")
    peft_model = add_lora(model, rank, alpha, seed=0)
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys or any("lora_" in k for k in result.missing_keys):
        raise ValueError(f"LoRA weights do not fit the model (unexpected {result.unexpected_keys[:3]})")
    lost = None
    if out_dtype != torch.float32:
        err, norm = 0.0, 0.0
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                delta = module.get_delta_weight(ADAPTER)
                exact = module.get_base_layer().weight + delta
                err += float((exact.to(out_dtype).float() - exact).pow(2).sum())
                norm += float(delta.pow(2).sum())
        lost = math.sqrt(err / norm) if norm else 0.0
    merged = peft_model.merge_and_unload()
    return merged.to(out_dtype), lost
