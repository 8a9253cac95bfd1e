"""The calibration passes: hooked forward passes over one calibration batch.

Two passes, two jobs, because their outputs live differently:

- the **shard pass** (:func:`extract_batch` with shard paths) writes the MLP signals of every block
  (``act(gate)`` then ``up``, one column per signal, one row per non-padding token) to a
  per-layer ``.npy`` shard. Shards are large and temporary: a new ICA variant after they were
  removed runs this pass again.
- the **statistics pass** (:func:`extract_batch` with only a stats path) accumulates what the baselines, bias compensation
  and the hybrid score read (``down_proj`` and ``o_proj`` input sums and sums of squares) into a
  small file that is kept. It runs once per batch, so re-creating shards never rewrites the
  statistics, and nothing built from them goes out of date.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import adapters as A
from .io import load_npz, save_npz

STATS_KEYS = ("n_tokens", "down_sum", "down_sumsq", "o_sum", "o_sumsq")

log = logging.getLogger(__name__)


def make_batches(texts: list[str], batch_size: int, n_batches: int, seed: int) -> list[list[str]]:
    """Draw ``n_batches`` disjoint batches of ``batch_size`` texts (seeded shuffle)."""
    need = batch_size * n_batches
    if batch_size < 1 or n_batches < 1:
        raise ValueError(
            f"calibration.batch_size and calibration.n_batches must be >= 1; got {batch_size} and {n_batches}"
        )
    if len(texts) < need:
        raise ValueError(
            f"calibration split has {len(texts)} texts; calibration.batch_size x "
            f"calibration.n_batches = {batch_size} x {n_batches} = {need} needed"
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    return [[texts[i] for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(n_batches)]


def _non_finite(layer: int):
    raise FloatingPointError(
        f"layer {layer}: non-finite MLP activations in the calibration pass, or beyond the range of "
        f"the shard dtype (overflow in the model dtype? try dtype: float32, calibration.shard_dtype: float32)"
    )


class _Writer:
    """Writes staged shard blocks (``pwrite``) on a background thread while the forward pass goes on.

    On a file system whose write-back throttles writers, the pass then waits only when ``depth``
    blocks are already pending (bounding host memory); buffers come back for reuse. An error of
    the writer is raised in the pass at the next block, or at :meth:`close`.
    """

    def __init__(self, depth: int = 2):
        self.todo: queue.Queue = queue.Queue(maxsize=depth)
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fnprune-shard-writer", daemon=True)
        self.thread.start()

    def buffer(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        try:
            buf = self.free.get_nowait()
            if tuple(buf.shape) == shape and buf.dtype == dtype:
                return buf
        except queue.Empty:
            pass
        return torch.empty(shape, dtype=dtype)

    def submit(self, fd: int, buf: torch.Tensor, offset: int) -> None:
        if self.error is not None:
            raise self.error
        self.todo.put((fd, buf, offset))

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            fd, buf, offset = item
            try:
                if self.error is None:
                    data = memoryview(buf.numpy().view(np.uint8).reshape(-1))
                    while data:
                        n = os.pwrite(fd, data, offset)
                        data, offset = data[n:], offset + n
            except BaseException as e:  # raised in the pass by submit/close
                self.error = e
            self.free.put(buf)

    def stop(self) -> None:
        """Let the thread finish the pending blocks and end (idempotent; raises nothing)."""
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()

    def close(self) -> None:
        """Wait for every pending block; raise the writer's error, if any."""
        self.stop()
        if self.error is not None:
            raise self.error


class _Shard:
    """One layer's shard file: each micro-batch's rows are staged in memory, both halves (``act(gate)``
    and ``up``), checked, and written at their place in the ``.npy`` by the :class:`_Writer`: one
    sequential write per block instead of page faults on a memory map, overlapping the forward
    pass, with host memory bounded by a few micro-batches of one layer."""

    def __init__(self, path: Path, n_rows: int, width: int, dtype: np.dtype, writer: _Writer):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_rows, width))
        self.offset = header.offset
        del header
        self.fd: int | None = os.open(path, os.O_WRONLY)
        self.width, self.dtype, self.writer = width, getattr(torch, np.dtype(dtype).name), writer
        self.row_bytes = width * np.dtype(dtype).itemsize
        self.stage: torch.Tensor | None = None
        self.halves = 0

    def put(self, layer: int, row: int, col0: int, rows: torch.Tensor) -> None:
        if self.halves == 0:
            self.stage = self.writer.buffer((rows.shape[0], self.width), self.dtype)
        self.stage[:, col0 : col0 + rows.shape[1]].copy_(rows)  # device -> host and dtype cast
        self.halves += 1
        if self.halves == 2:
            # one reduction finds NaN/inf in the activations and overflow of the shard dtype
            if not torch.isfinite(self.stage.sum(dtype=torch.float32)):
                _non_finite(layer)
            self.writer.submit(self.fd, self.stage, self.offset + row * self.row_bytes)
            self.stage, self.halves = None, 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Recorder:
    """Forward hooks on every block's MLP and attention output projection."""

    def __init__(self, model, ad: A.Adapter, shard_dtype: np.dtype):
        from transformers.activations import ACT2FN

        self.model, self.ad = model, ad
        self.blocks = A.layers(model, ad)
        self.valid: torch.Tensor | None = None  # flat indices of non-padding tokens
        self.row = 0  # first shard row of the current micro-batch
        self.shards: list[_Shard] = []
        self.shard_dtype = shard_dtype
        self.handles = []
        dev = next(model.parameters()).device
        self.inter = [A.intermediate_size(b, ad) for b in self.blocks]
        heads_dim = [A._get(A.attn_of(b, ad), ad.o).in_features for b in self.blocks]
        self.down_sum = [torch.zeros(i, dtype=torch.float64, device=dev) for i in self.inter]
        self.down_sumsq = [torch.zeros(i, dtype=torch.float64, device=dev) for i in self.inter]
        self.o_sum = [torch.zeros(h, dtype=torch.float64, device=dev) for h in heads_dim]
        self.o_sumsq = [torch.zeros(h, dtype=torch.float64, device=dev) for h in heads_dim]
        self.fused_act = ACT2FN[getattr(model.config, "hidden_act", "silu")] if ad.fused else None

    def _moments(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column sum and sum of squares of a micro-batch's valid rows (float32, then float64)."""
        x = self._rows(t).float()
        return x.sum(0).double(), (x * x).sum(0).double()

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        t = A.batch_first(t, self.ad)
        return t.reshape(-1, t.shape[-1]).index_select(0, self.valid)

    def _write(self, layer: int, col0: int, t: torch.Tensor) -> None:
        self.shards[layer].put(layer, self.row, col0, self._rows(t))

    def attach(self, shards: list[_Shard] | None) -> None:
        """Hook every block: the MLP signals into ``shards`` (when given), else the statistics."""
        if shards:
            self.shards = shards
        ad = self.ad
        for i, block in enumerate(self.blocks):
            mlp = A.mlp_of(block, ad)
            inter = self.inter[i]
            if not shards:
                self._attach_stats(i, block, mlp)
            elif ad.fused:

                def gate_up_hook(mod, inp, out, i=i, inter=inter):
                    self._write(i, 0, self.fused_act(out[..., :inter]))
                    self._write(i, inter, out[..., inter:])

                self.handles.append(A._get(mlp, ad.gate_up).register_forward_hook(gate_up_hook))
            else:

                def act_hook(mod, inp, out, i=i):
                    self._write(i, 0, out)

                def up_hook(mod, inp, out, i=i, inter=inter):
                    self._write(i, inter, out)

                self.handles.append(A._get(mlp, ad.act).register_forward_hook(act_hook))
                self.handles.append(A._get(mlp, ad.up).register_forward_hook(up_hook))

    def _attach_stats(self, i: int, block, mlp) -> None:
        ad = self.ad

        def down_pre(mod, args, i=i):
            s, sq = self._moments(args[0])
            if not (torch.isfinite(s).all() and torch.isfinite(sq).all()):
                # act(gate) * up is non-finite iff a signal is (inf * 0 is NaN)
                _non_finite(i)
            self.down_sum[i] += s
            self.down_sumsq[i] += sq

        def o_pre(mod, args, i=i):
            s, sq = self._moments(args[0])
            self.o_sum[i] += s
            self.o_sumsq[i] += sq

        self.handles.append(A._get(mlp, ad.down).register_forward_pre_hook(down_pre))
        self.handles.append(A._get(A.attn_of(block, ad), ad.o).register_forward_pre_hook(o_pre))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _decoder(model):
    """The decoder without its LM head where it takes the same call: both passes read the blocks
    only, and the head's logits (a fifth of a small model's forward FLOPs: 49,152 x 576 of
    SmolLM2's 134 M parameters) are never used. Otherwise the whole model."""
    import inspect

    body = getattr(model, "base_model", model)
    params = inspect.signature(body.forward).parameters
    takes = all(p in params for p in ("input_ids", "attention_mask", "use_cache")) or any(
        p.kind is p.VAR_KEYWORD for p in params.values()
    )
    return body if takes else model


def tokenize_batch(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [ids for ids in enc["input_ids"] if len(ids) > 0]


@torch.no_grad()
def extract_batch(
    model,
    tokenizer,
    texts: list[str],
    shard_paths: list[str | Path] | None,
    stats_path: str | Path | None,
    max_length: int,
    micro_batch_size: int = 8,
    shard_dtype: str = "float16",
) -> dict:
    """Run one calibration batch through ``model``; write the per-layer shards, the stats file, or both.

    ``shard_paths[l]`` receives a (tokens x 2*intermediate) array: columns ``[0, I)`` are
    ``act(gate)`` and ``[I, 2I)`` are ``up`` of layer ``l``. Padding positions are excluded.
    Shards are ``.npy`` files filled micro-batch by micro-batch (:class:`_Shard`), so host memory stays
    bounded by one micro-batch; each is renamed into place only when complete. ``stats_path``
    receives the ``down_proj``/``o_proj`` input moments (:func:`load_stats`). The workflow runs
    the two as separate jobs (see the module docstring); giving both does them in one pass.
    """
    if shard_paths is None and stats_path is None:
        raise ValueError("extract_batch: nothing to write (no shard paths and no stats path)")
    t0 = time.time()
    ad = A.adapter_for(model)
    blocks = A.layers(model, ad)
    if shard_paths is not None and len(shard_paths) != len(blocks):
        raise ValueError(
            f"{len(shard_paths)} shard paths for a model with {len(blocks)} layers; "
            f"check models.*.num_layers in the config"
        )
    seqs = tokenize_batch(tokenizer, texts, max_length)
    n_tokens = sum(len(s) for s in seqs)
    device = next(model.parameters()).device
    rec = _Recorder(model, ad, np.dtype(shard_dtype))
    tmp_paths = [Path(p).with_name(f".{Path(p).name}.tmp.npy") for p in shard_paths or []]
    for p in tmp_paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer() if shard_paths is not None else None
    shards = [_Shard(p, n_tokens, 2 * i, np.dtype(shard_dtype), writer) for p, i in zip(tmp_paths, rec.inter)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    body = _decoder(model)
    try:
        if shards:
            rec.attach(shards)
        if stats_path is not None:
            rec.attach(None)
        desc = "extract" if shards else "statistics"
        for start in tqdm(range(0, len(seqs), micro_batch_size), desc=desc, mininterval=5):
            chunk = seqs[start : start + micro_batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            rec.valid = mask.flatten().nonzero().squeeze(1).to(device)
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            rec.row += int(mask.sum())
        if writer is not None:
            writer.close()  # every block on disk (or the writer's error) before the shards are renamed
        for s in shards:
            s.close()
        shards, rec.shards = [], []
        for tmp, final in zip(tmp_paths, shard_paths or []):
            os.replace(tmp, final)
    finally:
        rec.detach()
        if writer is not None:
            writer.stop()
        for s in shards:
            s.close()
        for p in tmp_paths:
            if p.exists():
                p.unlink()

    wall = time.time() - t0
    if stats_path is not None:
        save_npz(
            stats_path,
            n_tokens=np.array(n_tokens),
            down_sum=_stack(rec.down_sum, "down_proj"),
            down_sumsq=_stack(rec.down_sumsq, "down_proj"),
            o_sum=_stack(rec.o_sum, "o_proj"),
            o_sumsq=_stack(rec.o_sumsq, "o_proj"),
            wall_s=np.array(wall),
        )
    log.info("%s: %d texts, %d tokens, %d layers in %.1f s", desc, len(seqs), n_tokens, len(blocks), wall)
    return {"n_texts": len(seqs), "n_tokens": n_tokens, "wall_s": wall}


def _stack(xs: list[torch.Tensor], what: str) -> np.ndarray:
    """Per-layer vectors of one width as one (layers x width) array (what :func:`load_stats` reads)."""
    arrs = [x.cpu().numpy() for x in xs]
    widths = sorted({a.shape[0] for a in arrs})
    if len(widths) > 1:
        raise ValueError(
            f"calibration statistics: the {what} inputs have per-layer widths {widths}; the "
            f"statistics pass needs a model whose layers all have one width (a dense model, "
            f"not a pruned one)"
        )
    return np.stack(arrs)


def load_stats(paths: list[str | Path]) -> dict[str, np.ndarray]:
    """Sum the per-batch statistics files; return means, variances and squared norms."""
    tot: dict[str, np.ndarray] = {}
    for p in paths:
        z = load_npz(
            p, "calibration statistics", STATS_KEYS, "delete it and rerun (its calibration_stats job makes it again)"
        )
        for k in STATS_KEYS:
            tot[k] = tot.get(k, 0) + z[k]
    n = float(tot["n_tokens"])
    out = {"n_tokens": n}
    for m in ("down", "o"):
        mean = tot[f"{m}_sum"] / n
        out[f"{m}_mean"] = mean
        out[f"{m}_sqnorm"] = tot[f"{m}_sumsq"]
        out[f"{m}_var"] = np.maximum(tot[f"{m}_sumsq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return out
