"""One function per workflow stage, called by the thin scripts in ``workflow/scripts/``.

Each takes plain paths and config dicts (never the ``snakemake`` object), so tests and users
can call a stage directly. Each writes its outputs atomically and records its wall time.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from .config import BUILT_SOURCES
from .io import load_npz, read_json, setup_logging, versions, write_json, write_text

# Written by the shard pass beside the shards (tokens, wall time), carried into each ICA score file.
EXTRACT_RECORD = "extract.json"

log = logging.getLogger(__name__)


def setup(log_file: str | None, threads: int | None = None) -> None:
    """Log to the rule's log file; a stage that computes with torch gives ``threads`` (config
    ``torch_threads``) and runs on exactly that many intra-op threads, so results do not depend on
    how many cores Snakemake was given. The others never import torch (seconds a job)."""
    setup_logging(log_file)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def _hub_kwargs(model_spec: dict) -> dict:
    """Loading keywords of a hub or local model; none for a directory the workflow built."""
    if model_spec["source"] in BUILT_SOURCES:
        return {}
    return dict(revision=model_spec.get("revision"), trust_remote_code=model_spec.get("trust_remote_code", False))


def _load(model_spec: dict, source: str, device: str = "auto", stored: bool = False):
    """A model and its tokenizer: in the spec's dtype for the forward passes (what ran is checked
    and logged by :func:`fnprune.precision.check`), or with ``stored`` its weights as saved (masks
    and pruning read weights, exact in any dtype)."""
    from .modeling import load_base, load_tokenizer

    kw = _hub_kwargs(model_spec)
    model = load_base(source, dtype=None if stored else model_spec["dtype"], device=device, **kw)
    tok = load_tokenizer(source, **kw)
    return model, tok


def _run_load(model_spec: dict, source: str, device: str = "auto"):
    """:func:`_load` for a forward-pass stage, with the kernels it will run on (logged, recorded)."""
    from .precision import check

    model, tok = _load(model_spec, source, device)
    return model, tok, check(model)


def corpus(spec: dict, out_dir: str) -> None:
    from .corpus import build_corpus

    build_corpus(spec, out_dir)


def train(train_split: str, validation_split: str, spec: dict, out_dir: str, seed: int) -> None:
    from .corpus import read_split
    from .train import train_embedded_model

    train_embedded_model(read_split(train_split), read_split(validation_split), spec, out_dir, seed)


def init_model(train_split: str, spec: dict, out_dir: str, seed: int) -> None:
    """A model of seeded random weights (``source: init``): an engineering check, not a language model."""
    from .corpus import read_split
    from .seeded import build_init_model

    build_init_model(read_split(train_split), spec, out_dir, seed)


def convert_gguf(spec: dict, out_dir: str, model: str = "<model>") -> None:
    from .ggufsource import convert

    convert(spec, out_dir, architecture=spec.get("architecture"), label=f"models.{model}")


def calibration_batches(calib_split: str, spec: dict, seed: int, out: str) -> None:
    from .corpus import read_split
    from .extract import make_batches
    from .io import sha256_of_strings

    batches = make_batches(read_split(calib_split), spec["batch_size"], spec["n_batches"], seed)
    write_json(
        out,
        {
            "seed": seed,
            "corpus": spec.get("corpus"),
            "batch_size": spec["batch_size"],
            "n_batches": spec["n_batches"],
            "sha256": sha256_of_strings([t for b in batches for t in b]),
            "batches": batches,
        },
    )


def extract(batches: str, batch: int, model_spec: dict, source: str, shard_dir: str, device: str = "auto") -> None:
    """The shard pass of one batch: per-layer activation shards and ``extract.json`` (tokens, wall time)."""
    from .extract import extract_batch
    from .io import atomic_dir, write_json

    spec = model_spec["calibration"]
    texts = read_json(batches)["batches"][batch]
    model, tok, kern = _run_load(model_spec, source, device)
    n_layers = model_spec["num_layers"]
    with atomic_dir(shard_dir) as tmp:
        paths = [tmp / f"L{layer}.npy" for layer in range(n_layers)]
        info = extract_batch(
            model, tok, texts, paths, None, spec["max_length"], spec["micro_batch_size"], spec["shard_dtype"]
        )
        write_json(tmp / EXTRACT_RECORD, {**info, "kernels": kern})


def calibration_stats(batches: str, batch: int, model_spec: dict, source: str, out: str, device: str = "auto") -> None:
    """The statistics pass of one batch: ``down_proj``/``o_proj`` input moments (no shards)."""
    from .extract import extract_batch

    spec = model_spec["calibration"]
    texts = read_json(batches)["batches"][batch]
    model, tok, _ = _run_load(model_spec, source, device)
    extract_batch(model, tok, texts, None, out, spec["max_length"], spec["micro_batch_size"])


def block_influence(batches: str, batch: int, model_spec: dict, source: str, out: str, device: str = "auto") -> None:
    """ShortGPT's block influence over one calibration batch (:func:`fnprune.depth.block_influence`):
    per block the sum of ``1 - cos(h_in, h_out)`` over its tokens, and the token count."""
    from .depth import block_influence as compute
    from .io import save_npz

    spec = model_spec["calibration"]
    texts = read_json(batches)["batches"][batch]
    model, tok, kern = _run_load(model_spec, source, device)
    res = compute(model, tok, texts, spec["max_length"], spec["micro_batch_size"])
    save_npz(
        out,
        influence_sum=res["influence_sum"],
        n_tokens=np.array(res["n_tokens"]),
        wall_s=np.array(res["wall_s"]),
        dtype=np.array(kern["dtype"]),
    )


def ica(
    shard_dir: str, n_layers: int, k: int, backend: str, ica_spec: dict, seed: int, out: str, runs: int = 1
) -> None:
    from .io import save_npz
    from .modeling import resolve_device
    from .shards import ica_batch

    paths = [Path(shard_dir) / f"L{layer}.npy" for layer in range(n_layers)]
    res = ica_batch(
        paths,
        k,
        backend,
        seed,
        ica_spec["max_iter"],
        ica_spec["tol"],
        resolve_device(ica_spec["device"]),
        ica_spec["on_nonconvergence"],
        ica_spec["retries"],
        ica_spec["on_constant_layer"],
        runs,
        ica_spec["solver"],
    )
    record = Path(shard_dir) / EXTRACT_RECORD
    ext = read_json(record) if record.is_file() else {}
    save_npz(
        out,
        **res,
        k=np.array(k),
        seed=np.array(seed),
        runs=np.array(runs),
        solver=np.array(ica_spec["solver"] if backend == "torch" else backend),  # what iterated the ICA
        n_tokens=np.array(ext.get("n_tokens", -1)),
        extract_wall_s=np.array(ext.get("wall_s", np.nan)),
        extract_dtype=np.array(ext.get("kernels", {}).get("dtype", "")),
    )


def _shape(model_spec: dict, source: str) -> dict:
    from .modeling import load_config, shape_info

    kw = _hub_kwargs(model_spec)
    info = shape_info(load_config(source, **kw), trust_remote_code=kw.get("trust_remote_code", False))
    if info["n_layers"] != model_spec["num_layers"]:
        raise ValueError(
            f"models.*.num_layers is {model_spec['num_layers']} but {source} has {info['n_layers']} layers"
        )
    width = model_spec.get("intermediate_size")
    if width is not None and set(info["intermediate_sizes"]) != {width}:
        raise ValueError(
            f"models.*.intermediate_size is {width} but {source} has MLP widths "
            f"{sorted(set(info['intermediate_sizes']))}"
        )
    return info


def _fluctuation(model_spec: dict, source: str, stats_files: list[str]) -> list[np.ndarray]:
    """FLAP's fluctuation (WIFV) of every ``down_proj`` input channel, from the calibration stats."""
    from . import adapters as A
    from .baselines import stat, wifv_scores
    from .extract import load_stats

    model, _ = _load(model_spec, source, device="cpu", stored=True)
    ad = A.adapter_for(model)
    sizes = [A.intermediate_size(b, ad) for b in A.layers(model, ad)]
    return wifv_scores(model, "down", stat(load_stats(stats_files), "down_var", sizes, "hybrid/imp"))


def _ica_mask_record(
    chosen: dict,
    info: dict,
    prunable: list[bool],
    n_drop: int,
    ratio: float,
    min_keep: int,
    selector: dict,
    ica_info: dict,
    **extra,
) -> dict:
    """The mask record of an ICA-scored selection (:func:`ica_mask`, :func:`fn_variant_mask`)."""
    from .mask import mask_record

    return mask_record(
        chosen["kept"],
        info["intermediate_sizes"],
        info["block_params"],
        info["total_params"],
        info["neuron_params"],
        method=selector["selector"],
        kind="ica",
        ratio_requested=ratio,
        prunable=prunable,
        n_drop=n_drop,
        min_keep=min_keep,
        selection=selector["selection"],
        multiple=selector["multiple"],
        threshold=chosen["threshold"],
        k=selector["k"],
        backend=selector["backend"],
        ica_seed=selector["seed"],
        consensus_runs=selector["runs"],
        layer_importance=chosen["layer_importance"],
        ica=ica_info,
        **extra,
    )


def ica_mask(
    score_files: list[str],
    model_spec: dict,
    source: str,
    ratio: float,
    selector: dict,
    out: str,
    stats_files: list[str] = (),
) -> None:
    """The mask of an ICA method (``selector``: :func:`fnprune.config.parse_method` of its name)."""
    from .mask import hybrid_scores, n_to_drop, prunable_layers, select, union_neuron_scores

    t0 = time.time()
    info = _shape(model_spec, source)
    scores, ica_info = union_neuron_scores(score_files)
    prunable = prunable_layers(info["n_layers"], model_spec["protect_first"], model_spec["protect_last"])
    n_drop = n_to_drop(ratio, info["block_params"], info["neuron_params"])
    min_keep = model_spec["min_keep_per_layer"]
    fluct = _fluctuation(model_spec, source, stats_files) if selector["needs_stats"] else None
    if selector["hybrid"]:
        scores = hybrid_scores(scores, fluct)
    chosen = select(scores, selector["selection"], prunable, n_drop, ratio, min_keep, fluct, selector["multiple"])
    rec = _ica_mask_record(
        chosen, info, prunable, n_drop, ratio, min_keep, selector, ica_info, hybrid=selector["hybrid"]
    )
    rec["wall_s"] = time.time() - t0
    write_json(out, rec)
    log.info(
        "%s: keeps %s neurons per layer; achieved block ratio %.4f (threshold %s)",
        selector["selector"],
        rec["kept_counts"],
        rec["achieved_block_ratio"],
        chosen["threshold"],
    )


def _wanda(model_spec: dict, source: str, stats_files: list[str]) -> list[np.ndarray]:
    """Wanda-sp's score of every MLP neuron (``fnprune.baselines.wanda_sp_scores``), from the calibration stats."""
    from . import adapters as A
    from .baselines import stat, wanda_sp_scores
    from .extract import load_stats

    model, _ = _load(model_spec, source, device="cpu", stored=True)
    ad = A.adapter_for(model)
    sizes = [A.intermediate_size(b, ad) for b in A.layers(model, ad)]
    return wanda_sp_scores(model, stat(load_stats(stats_files), "down_sqnorm", sizes, "hwanda/core"))


def fn_variant_mask(
    score_files: list[str],
    model_spec: dict,
    source: str,
    ratio: float,
    selector: dict,
    out: str,
    stats_files: list[str],
) -> None:
    """The mask of a functional-network variant that scores inside each layer with Wanda-sp
    (``selector["within"]``: ``hwanda`` or ``core``; see :func:`fnprune.config.parse_method`).

    Its own rule (mask_fnv): these variants read Wanda-sp's scores beside the ICA's.
    """
    from .mask import hybrid_scores, n_to_drop, protect_core, prunable_layers, select, union_neuron_scores

    t0 = time.time()
    info = _shape(model_spec, source)
    network, ica_info = union_neuron_scores(score_files)
    prunable = prunable_layers(info["n_layers"], model_spec["protect_first"], model_spec["protect_last"])
    n_drop = n_to_drop(ratio, info["block_params"], info["neuron_params"])
    wanda = _wanda(model_spec, source, stats_files)
    if selector["within"] == "hwanda":
        scores = hybrid_scores(network, wanda)
    else:
        scores = protect_core(wanda, network, selector["core_pct"])
    fluct = _fluctuation(model_spec, source, stats_files) if selector["selection"] == "imp" else None
    chosen = select(
        scores,
        selector["selection"],
        prunable,
        n_drop,
        ratio,
        model_spec["min_keep_per_layer"],
        fluct,
        selector["multiple"],
    )
    lost = sum(int(np.isinf(s).sum() - np.isinf(s[k]).sum()) for s, k in zip(scores, chosen["kept"]))
    if lost:
        raise ValueError(
            f"{selector['selector']}: ratio {ratio} removes {lost} neurons of the protected network cores; "
            f"lower the ratio or the core percent"
        )
    rec = _ica_mask_record(
        chosen,
        info,
        prunable,
        n_drop,
        ratio,
        model_spec["min_keep_per_layer"],
        selector,
        ica_info,
        hybrid=False,
        within=selector["within"],
        core_pct=selector["core_pct"],
    )
    rec["wall_s"] = time.time() - t0
    write_json(out, rec)
    log.info(
        "%s: keeps %s neurons per layer; achieved block ratio %.4f",
        selector["selector"],
        rec["kept_counts"],
        rec["achieved_block_ratio"],
    )


def baseline_mask(
    method: str,
    stats_files: list[str],
    model_spec: dict,
    source: str,
    ratio: float,
    seed: int,
    out: str,
    multiple: int | None = None,
) -> None:
    from .baselines import baseline_mask as compute
    from .extract import load_stats

    t0 = time.time()
    model, _ = _load(model_spec, source, device="cpu", stored=True)
    rec = compute(
        method,
        model,
        load_stats(stats_files) if stats_files else None,
        ratio,
        model_spec["protect_first"],
        model_spec["protect_last"],
        seed,
        model_spec["min_keep_per_layer"],
        multiple=multiple,
    )
    rec["wall_s"] = time.time() - t0
    write_json(out, rec)


def shortgpt_mask(influence_files: list[str], model_spec: dict, source: str, ratio: float, out: str) -> None:
    """The mask of ``shortgpt``: the prunable blocks of least influence over every calibration batch,
    removed until their parameters reach ``ratio`` (:func:`fnprune.depth.shortgpt_mask`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .depth import INFLUENCE_KEYS, block_parameters
    from .depth import shortgpt_mask as compute
    from .modeling import load_config

    t0 = time.time()
    info = _shape(model_spec, source)
    kw = _hub_kwargs(model_spec)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(
            load_config(source, **kw), trust_remote_code=kw.get("trust_remote_code", False)
        )
    total, n_tokens, wall, dtypes = 0.0, 0, 0.0, []
    for f in influence_files:
        z = load_npz(f, "block influence", INFLUENCE_KEYS, "delete it and rerun its block_influence job")
        if len(z["influence_sum"]) != info["n_layers"]:
            raise ValueError(
                f"{f}: block influence of {len(z['influence_sum'])} blocks, the model has {info['n_layers']}"
            )
        total = total + z["influence_sum"]
        n_tokens += int(z["n_tokens"])
        wall += float(z["wall_s"])
        dtypes.append(str(z["dtype"]))
    rec = compute(
        total,
        n_tokens,
        block_parameters(meta),
        info["intermediate_sizes"],
        info["neuron_params"],
        info["total_params"],
        ratio,
        model_spec["protect_first"],
        model_spec["protect_last"],
        influence={
            "batches_used": list(range(len(influence_files))),
            "tokens": n_tokens,
            "wall_s": wall,
            "dtype": "+".join(dict.fromkeys(dtypes)),
        },
    )
    rec["wall_s"] = time.time() - t0
    write_json(out, rec)
    log.info(
        "shortgpt: removes blocks %s (influence %s); achieved block ratio %.4f",
        rec["removed_layers"],
        [round(x, 5) for x in rec["block_influence"]],
        rec["achieved_block_ratio"],
    )


def _load_read(model_spec: dict, source: str, device: str = "auto"):
    """:func:`_load` with ``stored``, the weights read into memory instead of memory-mapped.

    Pruning replaces most tensors and then writes every one: from a mapped file, the pages of the
    replaced tensors stay resident beside their pruned copies, and writing maps in the rest, so a
    7B-shaped job peaked at about 1.4-1.7x the weights' bytes; read, it holds them once (plus one
    checkpoint shard while loading)."""
    from transformers import AutoModelForCausalLM

    from .modeling import load_config, load_tokenizer, resolve_device

    kw = _hub_kwargs(model_spec)
    load_config(source, **kw)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", disable_mmap=True, **kw)
    return model.to(resolve_device(device)).eval(), load_tokenizer(source, **kw)


def prune(
    mask: str,
    model_spec: dict,
    source: str,
    stats_files: list[str],
    bias: bool,
    target: str,
    out_dir: str,
    device: str = "auto",
) -> None:
    import torch

    from .extract import load_stats
    from .ggufsource import read_provenance
    from .mask import read_mask
    from .modeling import apply_mask, save_pruned

    t0 = time.time()
    rec = read_mask(mask)
    model, tok = _load_read(model_spec, source, device)
    stats = load_stats(stats_files) if bias else {}
    apply_mask(model, rec, down_mean=stats.get("down_mean"), o_mean=stats.get("o_mean"))
    sidecar = {
        "target": target,
        "source_model": model_spec.get("hf_id", source),
        "source_revision": model_spec.get("revision"),
        "source_commit": getattr(model.config, "_commit_hash", None),
        "trust_remote_code": model_spec.get("trust_remote_code", False),
        "source_provenance": read_provenance(source) if model_spec["source"] in BUILT_SOURCES else None,
        "method": rec["method"],
        "k": rec.get("k"),
        "backend": rec.get("backend"),
        "bias_compensation": bias,
        "ratio_requested": rec["ratio_requested"],
        "achieved_block_ratio": rec["achieved_block_ratio"],
        "threshold": rec.get("threshold"),
        "seed": rec.get("seed"),
        "kept": rec["kept"],
        "kept_heads": rec.get("kept_heads"),
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        "prune_wall_s": time.time() - t0,
    }
    save_pruned(model.to("cpu"), tok, out_dir, sidecar)


def prune_blocks(mask: str, model_spec: dict, source: str, target: str, out_dir: str, device: str = "auto") -> None:
    """Remove the blocks a depth mask removes (``removed_layers``) and save the smaller model: a plain
    config with fewer layers, its weights and the sidecar (:func:`fnprune.modeling.save_pruned`)."""
    import torch

    from .adapters import keep_layers
    from .ggufsource import read_provenance
    from .mask import read_mask
    from .modeling import save_pruned

    t0 = time.time()
    rec = read_mask(mask)
    if "kept_layers" not in rec:
        raise ValueError(f"{mask}: not a depth mask (no kept_layers); {rec['method']} prunes neurons, not blocks")
    model, tok = _load(model_spec, source, device, stored=True)
    keep_layers(model, rec["kept_layers"])
    sidecar = {
        "target": target,
        "source_model": model_spec.get("hf_id", source),
        "source_revision": model_spec.get("revision"),
        "source_commit": getattr(model.config, "_commit_hash", None),
        "trust_remote_code": model_spec.get("trust_remote_code", False),
        "source_provenance": read_provenance(source) if model_spec["source"] in BUILT_SOURCES else None,
        "method": rec["method"],
        "bias_compensation": False,
        "ratio_requested": rec["ratio_requested"],
        "achieved_block_ratio": rec["achieved_block_ratio"],
        "threshold": rec["threshold"],
        "kept": rec["kept"],
        "kept_layers": rec["kept_layers"],
        "removed_layers": rec["removed_layers"],
        "block_influence": rec["block_influence"],
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        "prune_wall_s": time.time() - t0,
    }
    save_pruned(model.to("cpu"), tok, out_dir, sidecar)


def lora(
    source: str,
    model_spec: dict,
    train_split: str,
    settings: dict,
    target: str,
    parent: str,
    out_dir: str,
    device: str = "auto",
) -> None:
    """LoRA recovery of ``parent`` (its model at ``source``: a pruned directory, or the base model
    for dense), trained on ``train_split`` (the calibration corpus's train split) with the
    ``lora`` config section's ``settings``, merged into the weights and saved as ``target``.

    The tuned model runs in ``settings["dtype"]`` (adapters in float32); the update is then merged
    in float32 into the weights as loaded again, and saved in their stored dtype, with the parent's
    sidecar (a dense parent gets one) plus a ``lora`` record: settings, tokens seen, trainable
    parameters, the loss at the start (first step; mean of the first tenth) and over the last
    tenth of the steps, the loss curve and the wall time."""
    from importlib import metadata

    import torch

    from .corpus import read_split
    from .ggufsource import read_provenance
    from .lora import adapter_state, add_lora, finetune, merge, token_windows, trainable_parameters
    from .modeling import SIDECAR, save_pruned, torch_dtype

    t0 = time.time()
    s = settings
    model, tok = _load(model_spec, source, device, stored=True)
    stored = next(model.parameters()).dtype
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and s["seq_len"] > max_pos:
        raise ValueError(f"lora.seq_len: {s['seq_len']} exceeds {parent}'s maximum length {max_pos}")
    batch_tokens = s["batch_size"] * s["seq_len"]
    steps = s["tokens"] // batch_tokens
    if steps < 1:
        raise ValueError(
            f"lora.tokens: {s['tokens']} make no step of lora.batch_size x seq_len = {batch_tokens} tokens"
        )
    rows, data = token_windows(tok, read_split(train_split), s["seq_len"], steps * s["batch_size"], s["seed"])
    log.info(
        "%s: %d steps of %d x %d tokens from %s (%d of its %d texts read, %d pass(es))",
        target,
        steps,
        s["batch_size"],
        s["seq_len"],
        train_split,
        data["texts_read"],
        data["texts"],
        data["passes"],
    )
    tuned = add_lora(model.to(torch_dtype(s["dtype"])), s["rank"], s["alpha"], s["seed"])
    trainable = trainable_parameters(tuned)
    log.info("LoRA of rank %d: %d trainable parameters", s["rank"], trainable)
    curve = finetune(tuned, rows, s["lr"], s["batch_size"])
    state = adapter_state(tuned)
    del tuned, model
    base, _ = _load(model_spec, source, device, stored=True)
    merged, lost = merge(base.float(), state, s["rank"], s["alpha"], stored)
    record = {
        "settings": dict(s),
        "train_split": train_split,
        "train_texts": data["texts"],
        "train_texts_read": data["texts_read"],
        "train_passes": data["passes"],
        "tokens_seen": curve["steps"] * batch_tokens,
        "trainable_parameters": trainable,
        "target_modules": len(state) // 2,
        **curve,
        "saved_dtype": str(stored).removeprefix("torch."),
        "merge_rounding_lost": lost,
        "peft": metadata.version("peft"),
        "device": str(merged.device),
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.time() - t0,
    }
    if Path(source, SIDECAR).is_file():
        side = {k: v for k, v in read_json(Path(source) / SIDECAR).items() if k not in ("layout", "parameters")}
    else:
        side = {
            "source_model": model_spec.get("hf_id", source),
            "source_revision": model_spec.get("revision"),
            "source_commit": getattr(merged.config, "_commit_hash", None),
            "trust_remote_code": model_spec.get("trust_remote_code", False),
            "source_provenance": read_provenance(source) if model_spec["source"] in BUILT_SOURCES else None,
            "method": "dense",
            "bias_compensation": False,
            "ratio_requested": 0.0,
            "achieved_block_ratio": 0.0,
        }
    side.update({"target": target, "tuned_from": parent, "lora": record})
    log.info(
        "%s: loss %.4f over the first %d steps, %.4f over the last %d; %d tokens in %.0f s",
        target,
        curve["loss_first"],
        curve["loss_end_steps"],
        curve["loss_end"],
        curve["loss_end_steps"],
        record["tokens_seen"],
        record["wall_s"],
    )
    save_pruned(merged.to("cpu"), tok, out_dir, side)


def perplexity(
    model_dir_or_source: str,
    model_spec: dict,
    test_split: str,
    out: str,
    device: str = "auto",
    fields: dict | None = None,
) -> None:
    """Perplexity of a model on a test split at every ``eval.ppl_seqlens``; ``fields`` describe the record."""
    from .corpus import read_split
    from .perplexity import token_perplexity

    model, tok, kern = _run_load(model_spec, model_dir_or_source, device)
    texts = read_split(test_split)
    ev = model_spec["eval"]
    # Models fnprune trains saw no BOS in training (train.py), whatever their tokenizer adds.
    bos = False if model_spec.get("source") == "train" else None
    results = [
        token_perplexity(model, tok, texts, seqlen, ev["ppl_batch_size"], ev.get("ppl_max_windows"), bos=bos)
        for seqlen in ev["ppl_seqlens"]
    ]
    write_json(
        out,
        {
            **(fields or {}),
            "results": results,
            "device": str(model.device),
            "kernels": kern,
            "torch_threads": kern["torch_threads"],
            "versions": versions(),
        },
    )


def lm_eval(
    model_dir_or_source: str, model_spec: dict, tasks_dir: str | None, out: str, raw_out: str, device: str = "auto"
) -> None:
    from .lmeval import run_lm_eval

    model, tok, kern = _run_load(model_spec, model_dir_or_source, device)
    ev = model_spec["eval"]
    res = run_lm_eval(
        model,
        tok,
        ev["lm_eval_tasks"],
        num_fewshot=ev["num_fewshot"],
        batch_size=ev["lm_eval_batch_size"],
        max_batch_size=ev.get("lm_eval_max_batch_size"),
        max_length=ev.get("lm_eval_max_length"),
        limit=ev["lm_eval_limit"],
        include_path=tasks_dir,
        raw_out=raw_out,
    )
    write_json(out, {**res, "kernels": kern})


def lm_eval_tasks(test_split: str, validation_split: str, out_dir: str, seed: int, mc: dict | None = None) -> None:
    """The embedded tasks of a corpus; ``mc`` is its ``corpora.<name>.mc_task`` (item count and sizes)."""
    from .embedded_tasks import write_embedded_tasks

    write_embedded_tasks(test_split, validation_split, out_dir, seed=seed, **(mc or {}))


def metrics(
    target: str,
    model: str,
    method: str,
    model_spec: dict,
    ppl: str,
    lm_eval: str | None,
    out: str,
    mask: str | None = None,
    sidecar_dir: str | None = None,
    batches: str | None = None,
    stats_files: list[str] = (),
    base_dir: str | None = None,
    seed: int = 0,
    torch_threads: int | None = None,
) -> None:
    """Assemble one ``metrics.json`` per target from the stage outputs (no recomputation).

    ``base_dir`` is the directory the workflow built the base model into (trained, or converted
    from GGUF: its provenance is recorded)."""
    from .ggufsource import read_provenance
    from .mask import read_mask
    from .seeded import RECORD as INIT_RECORD

    weights = model_spec.get("base") or model
    source = {"train": f"trained:{weights}", "gguf": f"gguf:{weights}", "init": f"init:{weights}"}.get(
        model_spec["source"]
    )
    rec: dict = {
        "target": target,
        "model": model,
        "method": method,
        "seed": seed,
        "torch_threads": torch_threads,
        "source_model": source or model_spec.get("hf_id"),
    }
    stages: dict[str, float] = {}
    if base_dir and (Path(base_dir) / "training.json").is_file():
        tr = read_json(Path(base_dir) / "training.json")
        rec["base_model"] = {"parameters": tr["parameters"], "validation_ppl": tr["validation_ppl"]}
        stages["train_model"] = tr["wall_s"]
    if base_dir and (Path(base_dir) / INIT_RECORD).is_file():
        seeded = read_json(Path(base_dir) / INIT_RECORD)
        rec["base_model"] = {"parameters": seeded["parameters"], "seeded_random_weights": True}
        stages["init_model"] = seeded["wall_s"]
    prov = read_provenance(base_dir)
    if prov:
        rec["source_provenance"] = {k: v for k, v in prov.items() if k not in ("versions", "wall_s")}
        rec["base_model"] = {"parameters": prov["parameters"]}
        stages["convert_gguf"] = prov["wall_s"]
    if batches:
        b = read_json(batches)
        rec["calibration"] = {
            "corpus": b.get("corpus"),
            "texts": sum(len(x) for x in b["batches"]),
            "batches": b["n_batches"],
            "batch_size": b["batch_size"],
            "sha256": b["sha256"],
        }
    if stats_files:
        n_tok, ext = 0, 0.0
        for f in stats_files:
            z = load_npz(f, "calibration statistics", ("n_tokens", "wall_s"), "delete it and rerun")
            n_tok += int(z["n_tokens"])
            ext += float(z["wall_s"])
        rec.setdefault("calibration", {})["tokens"] = n_tok
        stages["calibration_stats"] = ext
    if mask:
        m = read_mask(mask)
        rec.update(
            {
                "ratio_requested": m["ratio_requested"],
                "achieved_block_ratio": m["achieved_block_ratio"],
                "achieved_total_ratio": m["achieved_total_ratio"],
                "block_params": m["block_params"],
                "neuron_params": m["neuron_params"],
                "threshold": m["threshold"],
                "k": m.get("k"),
                "backend": m.get("backend"),
                "kept_neurons_per_layer": m["kept_counts"],
                "intermediate_sizes": m["intermediate_sizes"],
                "kept_heads_per_layer": [len(h) for h in m["kept_heads"]] if m.get("kept_heads") else None,
                "mask_options": {
                    key: m.get(key)
                    for key in ("selection", "multiple", "hybrid", "consensus_runs", "ica_seed", "layer_importance")
                },
            }
        )
        if "ica" in m:
            rec["ica"] = {
                k: m["ica"].get(k)
                for k in (
                    "batches_used",
                    "nonconverged_fraction",
                    "n_iter",
                    "skipped_layers_per_batch",
                    "complete",
                    "solver",
                    "extract_dtype",
                )
            }
            stages["ica"] = m["ica"]["ica_wall_s"]
            if m["ica"].get("extract_wall_s") is not None:
                stages["extract"] = m["ica"]["extract_wall_s"]
            if m["ica"].get("tokens") is not None:
                rec.setdefault("calibration", {})["tokens"] = m["ica"]["tokens"]
        stages["mask"] = m["wall_s"]
    else:
        rec.update({"ratio_requested": 0.0, "achieved_block_ratio": 0.0, "achieved_total_ratio": 0.0})
    weights_dir = sidecar_dir or base_dir
    if weights_dir:
        rec["weights_bytes"] = sum(f.stat().st_size for f in Path(weights_dir).glob("*.safetensors"))
    if sidecar_dir:
        side = read_json(Path(sidecar_dir) / "fnprune.json")
        rec["bias_compensation"] = side["bias_compensation"]
        rec["parameters"] = side["parameters"]
        stages["prune"] = side["prune_wall_s"]
    p = read_json(ppl)
    rec["device"] = p.get("device")
    rec["kernels"] = {"perplexity": p.get("kernels")}
    rec["perplexity"] = {f"{r['protocol']}@{r['seqlen']}": r["ppl"] for r in p["results"]}
    rec["perplexity_detail"] = p["results"]
    stages["perplexity"] = sum(r["wall_s"] for r in p["results"])
    if lm_eval:
        le = read_json(lm_eval)
        rec["lm_eval"] = le["tasks"]
        rec["lm_eval_mean_acc"] = le.get("mean_acc")
        rec["lm_eval_versions"] = le.get("versions")
        rec["lm_eval_config"] = le.get("config")
        rec["lm_eval_items"] = le.get("items") or {}  # per-item scores: accuracy paired over items
        rec["kernels"]["lm_eval"] = le.get("kernels")
        stages["lm_eval"] = le.get("wall_s", math.nan)
    rec["stage_wall_s"] = stages
    rec["versions"] = versions()
    write_json(out, rec)


def depth_metrics(
    target: str, model: str, method: str, model_spec: dict, ppl: str, lm_eval: str | None, out: str, **kw
) -> None:
    """:func:`metrics` of a depth target, with what its mask decided: ``kept_layers``,
    ``removed_layers``, ``block_influence`` (mean per token, every block of the source), and the
    calibration tokens and wall time of the block influence passes."""
    from .mask import read_mask

    metrics(target, model, method, model_spec, ppl, lm_eval, out, **kw)
    rec = read_json(out)
    m = read_mask(kw["mask"])
    rec.update({k: m[k] for k in ("kept_layers", "removed_layers", "block_influence")})
    rec.setdefault("calibration", {})["tokens"] = m["influence"]["tokens"]
    rec["stage_wall_s"]["block_influence"] = m["influence"]["wall_s"]
    write_json(out, rec)


def lora_metrics(
    target: str,
    model: str,
    method: str,
    model_spec: dict,
    ppl: str,
    lm_eval: str | None,
    out: str,
    lora_dir: str,
    depth: bool = False,
    **kw,
) -> None:
    """:func:`metrics` of a ``_lora`` target (:func:`depth_metrics` when its parent removed blocks),
    with what the tuning did: ``tuned_from`` (the parent target), the sidecar's ``lora`` record,
    the tuned model's parameters and size on disk, and the tuning's wall time."""
    (depth_metrics if depth else metrics)(target, model, method, model_spec, ppl, lm_eval, out, **kw)
    rec = read_json(out)
    side = read_json(Path(lora_dir) / "fnprune.json")
    rec["tuned_from"] = side["tuned_from"]
    rec["lora"] = side["lora"]
    rec["parameters"] = side["parameters"]
    rec["weights_bytes"] = sum(f.stat().st_size for f in Path(lora_dir).glob("*.safetensors"))
    rec["stage_wall_s"]["lora"] = side["lora"]["wall_s"]
    write_json(out, rec)


def summary(dense_metrics: str, pruned_metrics: str, out: str) -> None:
    """A short dense-vs-pruned summary of one target (the demo's last output), also logged."""
    from .tables import summary_text

    text = summary_text(read_json(dense_metrics), read_json(pruned_metrics))
    write_text(out, text)
    log.info("\n%s", text)


def comparison(
    metrics_files: list[str],
    out_md: str,
    out_csv: str,
    refused: list[str] = (),
    draws: dict | None = None,
    variants: dict | None = None,
    reference: str | None = None,
) -> None:
    """The comparison table. ``variants``: a variant's draw slug -> (the compared model's draw slug
    it pairs with, the variant's name); its records join that draw as ``<method>@<variant>``."""
    from .replicates import relabel_variants
    from .tables import comparison_table

    records = relabel_variants([read_json(f) for f in metrics_files], variants or {})
    md, csv = comparison_table(records, draws or {}, reference)
    if refused:
        md += "\n## Methods left out\n\n" + "".join(f"- {r}\n" for r in refused)
    write_text(out_md, md)
    write_text(out_csv, csv)


# Sidecar keys a pruned model's GGUF carries as fnprune.* metadata (what it is and where it came from).
GGUF_METADATA = (
    "target",
    "source_model",
    "source_commit",
    "source_provenance",
    "method",
    "k",
    "backend",
    "bias_compensation",
    "ratio_requested",
    "achieved_block_ratio",
    "threshold",
    "kept_heads",
)


def export_gguf(target: str, model_spec: dict, source: str, pruned_dir: str | None, out: str, gtype: str) -> None:
    """Write a target's model (dense: the base; pruned: ``pruned_dir``) as GGUF for llama.cpp."""
    from .ggufwrite import write_gguf
    from .modeling import load_pruned, load_tokenizer, read_sidecar

    # The weights as stored: write_gguf upcasts one tensor at a time (a whole 7B model in float32 is 27 GB).
    if pruned_dir:
        model, tok = load_pruned(pruned_dir, dtype=None, device="cpu"), load_tokenizer(pruned_dir)
        side = read_sidecar(pruned_dir)
    else:
        model, tok = _load(model_spec, source, "cpu", stored=True)
        side = {"target": target, "source_model": source}
    meta = {k: side[k] for k in GGUF_METADATA if side.get(k) is not None}
    meta["versions"] = versions()
    t0 = time.time()
    widths = write_gguf(model, tok, out, gtype.upper(), name=target, metadata=meta)
    log.info(
        "%s: %s GGUF, MLP widths %s, heads %s, in %.1f s",
        out,
        gtype.upper(),
        widths["feed_forward_length"],
        widths["head_count"],
        time.time() - t0,
    )
