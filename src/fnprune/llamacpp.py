"""Checks of an exported GGUF in a real llama.cpp (through ``llama-cpp-python``, an optional extra).

The agreement that matters to someone who runs the exported model: next-token log-probabilities
of the same token windows in llama.cpp and in fnprune's PyTorch model, and the perplexity of
both. Speed: prompt processing and generation tokens per second at a fixed thread count.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def open_gguf(path: str | Path, n_ctx: int, n_threads: int = 2, logits_all: bool = True, f32_cache: bool = False):
    """A ``llama_cpp.Llama`` on ``path`` (CPU), or an error that says how to install llama.cpp.

    ``f32_cache`` keeps the attention K/V cache in float32 (llama.cpp's default is float16, which
    alone moves log-probabilities by about 1e-2 on a 256-token window): the agreement check
    compares the model, not the cache's precision."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(
            "llama-cpp-python is not installed: `make llamacpp` builds it from source "
            "(about 10 minutes on 2 cores) into the virtual environment"
        ) from None
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=logits_all,
        n_gpu_layers=0,
        verbose=False,
        **cache,
    )


def llamacpp_logprobs(llm, ids: list[int]) -> np.ndarray:
    """Log-probabilities of ``ids[1:]`` given their prefixes, from llama.cpp (one evaluation)."""
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    return _log_softmax(scores)[np.arange(len(ids) - 1), ids[1:]]


def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def agreement(gguf_path: str | Path, model, windows: list[list[int]], n_threads: int = 2) -> dict:
    """Largest |log p| difference of next tokens over ``windows`` and both perplexities."""
    llm = open_gguf(gguf_path, n_ctx=max(len(w) for w in windows), n_threads=n_threads, f32_cache=True)
    try:
        a = np.concatenate([llamacpp_logprobs(llm, w) for w in windows])
    finally:
        llm.close()
    b = np.concatenate([torch_logprobs(model, w) for w in windows])
    ppl_l, ppl_t = float(np.exp(-a.mean())), float(np.exp(-b.mean()))
    return {
        "tokens": int(a.size),
        "max_abs_logprob_diff": float(np.abs(a - b).max()),
        "ppl_llamacpp": ppl_l,
        "ppl_torch": ppl_t,
        "ppl_rel_diff": abs(ppl_l - ppl_t) / ppl_t,
    }


def speed(gguf_path: str | Path, prompt: list[int], n_generate: int, n_threads: int = 2) -> dict:
    """One measurement: prompt-processing and greedy generation tokens/s (llama.cpp's default
    float16 K/V cache, as users run it). Callers interleave models and keep the best of rounds."""
    llm = open_gguf(gguf_path, n_ctx=len(prompt) + n_generate + 8, n_threads=n_threads, logits_all=False)
    try:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(n_generate):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
    finally:
        llm.close()
    return {"prompt_tokens_per_s": len(prompt) / (t1 - t0), "generate_tokens_per_s": n_generate / (t2 - t1)}
