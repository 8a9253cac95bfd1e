"""lm-eval's HFLM, with a forward pass that computes logits only where lm-eval reads them.

For a log-likelihood request lm-eval reads the logits of the continuation positions only
(``_select_cont_toks``), yet HFLM computes and log-softmaxes the logits of every position: for a
short continuation after a long passage, most of the LM head's work and the
(batch x length x vocabulary) log-softmax. :class:`ContinuationLogitsHFLM` asks the model for the
logits of the last ``keep`` positions only (transformers' ``logits_to_keep``), ``keep`` covering
every row's continuation; lm-eval's own virtual-token offset (``logits.shape[0] - padding_len_inp``)
maps the shorter logits back onto the positions it slices. The rolling path (batches of whole
``max_length`` windows) is split so one pass holds at most ``LOGITS_TOKENS`` positions' logits.
Multiple-choice requests that share a context run the context once and score the continuations
on its cache. Scores equal HFLM's (``tests/test_lmeval.py`` compares every request).

This module imports torch and lm-eval: import it where a model is evaluated, never from what the
Snakefile imports (:func:`fnprune.lmeval._scoring_lm_class` imports it on first use).
"""

from __future__ import annotations

import inspect as _inspect

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm


class ContinuationLogitsHFLM(HFLM):
    _max_cont: int | None = None
    # Positions whose logits one forward pass may hold in the rolling path, where lm-eval sends
    # batch-size windows of max_length tokens at once (32 x 2048 x 49152 floats: 13 GB, twice).
    LOGITS_TOKENS = 8192
    # A shared-context block holds about this many times the batch size of continuations:
    # enough to sort them by length into chunks of about one length (little padding).
    BLOCK_CHUNKS = 4

    # Model types whose cache the shared-context path repeats over a batch (transformers' Cache).
    # Sliding-window models (Gemma 3) only where a context and its continuations fit the
    # window, so the cache drops nothing (_shared_context_tokens).
    SHARED_CONTEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if override_bs is None and getattr(self.model.config, "model_type", None) in self.SHARED_CONTEXT_TYPES:
            return self._shared_context_tokens(requests, disable_tqdm)
        return self._continuation_tokens(requests, disable_tqdm, override_bs)

    def _shared_context_tokens(self, requests, disable_tqdm: bool):
        """Requests that share a context (a multiple-choice item's choices; acc_mutual_info's
        empty contexts): the context's forward pass once, its cache reused by the choices, so an
        item of n choices costs context + n continuations, not n x (context + continuation).
        Scores equal a full forward pass to float rounding (``tests/test_lmeval.py``)."""

        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, _cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        # a block pads contexts to its longest and continuations to the longest of a chunk
        window = getattr(self.model.config, "sliding_window", None) or self.max_length + 1
        longest_cont = max((len(r[2]) for r in requests), default=0)
        shared = {
            ctx: idx
            for ctx, idx in groups.items()
            if len(idx) > 1
            and len(ctx) + max(len(requests[i][2]) for i in idx) <= self.max_length + 1
            and len(ctx) + longest_cont <= window
        }
        rest = [i for ctx, idx in groups.items() if ctx not in shared for i in idx]
        out: list = [None] * len(requests)
        if rest:
            for i, res in zip(rest, self._continuation_tokens([requests[i] for i in rest], disable_tqdm, None)):
                out[i] = res
        # ``auto`` (a GPU's probe) is not run for these blocks: they take lm-eval's max_batch_size.
        bs = self.batch_size if isinstance(self.batch_size, int) else getattr(self, "max_batch_size", 1)
        bs = max(1, int(bs or 1))
        # Continuations per pass: on the CPU half the batch size, whose logits (positions x
        # vocabulary, 16 x 10 x 49,152 floats for SmolLM2) the log-softmax reads while still in
        # cache, which full-batch chunks outgrow (benchmarks/README.md compares the two).
        chunk = bs if self.device.type == "cuda" else max(1, bs // 2)
        bar = tqdm(total=sum(map(len, shared.values())), desc="shared contexts", disable=disable_tqdm, mininterval=5)
        for block in self._shared_blocks(shared, bs):
            members = [i for c in block for i in shared[c]]
            scores = self._score_block(block, [[requests[i][2] for i in shared[c]] for c in block], chunk)
            for i, res in zip(members, scores):
                out[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            bar.update(len(members))
        bar.close()
        return out

    def _shared_blocks(self, shared: dict, bs: int) -> list[list[tuple]]:
        """Contexts longest first, cut into blocks of about ``BLOCK_CHUNKS`` x ``bs`` continuations
        (at most ``LOGITS_TOKENS`` padded context positions a block): contexts of one block have
        about one length, and a block holds enough continuations to sort them into chunks of
        about one length too, so little of either pass is padding."""
        order = sorted(shared, key=lambda c: (-len(c), shared[c][0]))
        blocks, cur, n = [], [], 0
        for ctx in order:
            if cur and (len(cur) + 1) * len(cur[0]) > self.LOGITS_TOKENS:
                blocks.append(cur)
                cur, n = [], 0
            cur.append(ctx)
            n += len(shared[ctx])
            if n >= self.BLOCK_CHUNKS * bs:
                blocks.append(cur)
                cur, n = [], 0
        return blocks + ([cur] if cur else [])

    def _score_block(self, contexts: list[tuple], conts: list[list[list[int]]], chunk: int):
        """Log-likelihood and greedy flag of every continuation ``conts[g][j]`` after context
        ``contexts[g]``. Contexts are right-padded into one pass (padding masked); the
        continuations, longest first, run ``chunk`` at a time on their context's cache rows, at
        positions continuing their own context, the context padding masked. The LM head sees
        the scored positions only (no padding)."""
        import copy

        dev = self.device
        lens = torch.tensor([len(c) for c in contexts], device=dev)
        width = int(lens.max())
        ids = torch.zeros(len(contexts), width, dtype=torch.long, device=dev)
        for g, c in enumerate(contexts):
            ids[g, : len(c)] = torch.tensor(c)
        ctx_mask = (torch.arange(width, device=dev)[None] < lens[:, None]).long()
        autocast = torch.autocast(
            device_type=dev.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
        )
        with torch.no_grad(), autocast:
            body = self.model.model(input_ids=ids, attention_mask=ctx_mask, use_cache=True)
            last = body.last_hidden_state[torch.arange(len(contexts), device=dev), lens - 1]
            head = self.model.lm_head(last).float()  # predicts each first token
        first = torch.tensor([c[0] for cs in conts for c in cs], device=dev)
        ctx_of = torch.tensor([g for g, cs in enumerate(conts) for _ in cs], device=dev)
        out_lp = torch.log_softmax(head, -1)[ctx_of, first].tolist()
        out_greedy = (head.argmax(-1)[ctx_of] == first).tolist()
        pairs = [(g, c) for g, cs in enumerate(conts) for c in cs]
        order = sorted((j for j in range(len(pairs)) if len(pairs[j][1]) > 1), key=lambda j: -len(pairs[j][1]))
        for lo in range(0, len(order), chunk):
            part = order[lo : lo + chunk]
            rows = torch.tensor([pairs[j][0] for j in part], device=dev)
            seqs = [pairs[j][1] for j in part]  # longest first: the first sets the width
            k = len(seqs[0]) - 1  # positions fed (all tokens but the last) and scored (all but the first)
            x = torch.zeros(len(part), k, dtype=torch.long, device=dev)
            inp = torch.zeros(len(part), k, dtype=torch.long, device=dev)
            for r, c in enumerate(seqs):
                x[r, : len(c) - 1] = torch.tensor(c[:-1])
                inp[r, : len(c) - 1] = torch.tensor(c[1:])
            valid = torch.arange(k, device=dev)[None] < torch.tensor([len(c) - 1 for c in seqs], device=dev)[:, None]
            cache = copy.copy(body.past_key_values)  # the selection below replaces tensors, never writes them
            cache.layers = [copy.copy(layer) for layer in cache.layers]
            cache.batch_select_indices(rows)
            mask = torch.cat([ctx_mask[rows], torch.ones(len(part), k, dtype=torch.long, device=dev)], 1)
            pos = lens[rows][:, None] + torch.arange(k, device=dev)[None]
            with torch.no_grad(), autocast:
                hidden = self.model.model(
                    input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
                ).last_hidden_state
                logits = self.model.lm_head(hidden[valid]).float()
            tgt = inp[valid]
            tok_lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
            hit = logits.argmax(-1) == tgt
            owner = torch.arange(len(part), device=dev)[:, None].expand(-1, k)[valid]
            lp = torch.zeros(len(part), device=dev).index_add_(0, owner, tok_lp).tolist()
            miss = torch.zeros(len(part), dtype=torch.long, device=dev).index_add_(0, owner, (~hit).long()).tolist()
            for r, j in enumerate(part):
                out_lp[j] += lp[r]
                out_greedy[j] = out_greedy[j] and miss[r] == 0
        return list(zip(out_lp, out_greedy))

    def _continuation_tokens(self, requests, disable_tqdm: bool, override_bs: int | None):
        self._max_cont = max((len(cont) for _, _, cont in requests), default=None)
        try:
            if override_bs and len(requests) > 1:
                longest = min(max(len(c) + len(k) for _, c, k in requests), self.max_length)
                per = max(1, self.LOGITS_TOKENS // longest)
                if per < len(requests):
                    out = []
                    for i in range(0, len(requests), per):
                        out += super()._loglikelihood_tokens(requests[i : i + per], disable_tqdm=True, override_bs=per)
                    return out
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._max_cont = None

    def _model_call(self, inps, attn_mask=None, labels=None):
        if (
            attn_mask is not None
            or labels is not None
            or self._max_cont is None
            or "logits_to_keep" not in _inspect.signature(self.model.forward).parameters
        ):
            # float32 logits whatever the model's dtype: lm-eval log-softmaxes what it gets
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels).float()
        width = inps.shape[1]
        real = inps != 0  # lm-eval right-pads with 0; a real trailing 0 only widens the window
        lengths = torch.where(real.any(1), width - real.flip(1).int().argmax(1), 0)
        keep = int(min(width, width - int(lengths.min()) + self._max_cont))
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, logits_to_keep=keep).logits.float()
