"""Evaluation with lm-evaluation-harness: the embedded tasks and hub tasks, on a model object.

:func:`run_lm_eval` checks the task names, loads every task (a hub task whose dataset cannot be
loaded fails naming it), scores the model with a continuation-logits HFLM and summarises
lm-eval's results. The embedded tasks ``fnprune_mc`` and ``fnprune_ppl``, which need no network,
are built by :mod:`fnprune.embedded_tasks`; hub tasks (``wikitext``, the zero-shot suite) run
through the same call.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .embedded_tasks import MC_TASK, PPL_TASK
from .io import write_json

log = logging.getLogger(__name__)

ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
HUB_TASKS = (*ZERO_SHOT_TASKS, "wikitext")


class TaskUnavailableError(RuntimeError):
    """An lm-eval task whose dataset could not be loaded."""


def _check_names(names: Sequence[str], known: set[str] | frozenset[str], include_path: str | Path | None) -> None:
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for n in unknown:
        close = difflib.get_close_matches(n, known, n=3, cutoff=0.6)
        hints.append(f"{n!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    where = f" or in {include_path}" if include_path else ""
    raise ValueError(f"unknown lm-eval task(s): {'; '.join(hints)}. Not in lm-eval's task registry{where}.")


def _check_list(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"tasks: expected a non-empty list of lm-eval task names, got {names!r}")
    return list(names)


def _task_manager(names: Sequence[str], include_path: str | Path | None):
    """lm-eval's own tasks are indexed (seconds) only when a name needs them."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    _check_names(names, set(manager.all_tasks), include_path)
    return manager


def _unavailable(name: str, err: Exception) -> TaskUnavailableError:
    import datasets

    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    how = (
        f"{' and '.join(offline)} {'is' if len(offline) == 1 else 'are'} set, so only the local "
        f"datasets cache ({datasets.config.HF_DATASETS_CACHE}) is used. "
        if offline
        else ""
    )
    return TaskUnavailableError(
        f"lm-eval task {name!r} is unavailable: its dataset could not be loaded "
        f"({type(err).__name__}: {err}). {how}To make it available, run once with the Hugging Face "
        f"hub reachable (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to fill the datasets cache, or copy "
        f"a filled cache to HF_HOME on this machine; or drop {name!r} from the task list "
        f"(the embedded tasks {MC_TASK} and {PPL_TASK} need no network)."
    )


def _load_tasks(manager, names: Sequence[str]) -> list:
    """Task (and group) objects, each loaded alone so a failure names its task."""
    objs: list = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 - re-raised naming the task
            raise _unavailable(name, e) from e
        groups = loaded.get("groups") or {}
        objs.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return objs


def _leaf_names(objs: list) -> list[str]:
    return [t.task_name for o in objs for t in (o.get_all_tasks() if hasattr(o, "get_all_tasks") else [o])]


def _jsonable(obj: Any) -> Any:
    """lm-eval's results as plain JSON: callables by name, non-finite floats as null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return str(obj)


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float, np.number)) and not isinstance(x, bool) else None


def task_metrics(task_results: dict) -> dict[str, dict]:
    """``{metric: {"value", "stderr"}}`` from one task's entry of lm-eval's ``results``."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or _number(value) is None:
            continue
        name = metric if filt == "none" else key
        out[name] = {"value": _number(value), "stderr": _number(task_results.get(f"{metric}_stderr,{filt}"))}
    return out


def item_scores(samples: dict) -> dict[str, dict[str, list[float]]]:
    """Per task and metric, every item's score in ``doc_id`` order (``{task: {metric: [...]}}``),
    from lm-eval's logged samples: the pairing of two models' accuracies. Only metrics with one
    number per item are kept (acc, acc_norm, acc_mutual_info); perplexity tasks log pairs."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        metrics = {}
        for name in rows[0].get("metrics", []) if rows else []:
            values = [_number(r.get(name)) for r in rows]
            if all(v is not None for v in values):
                metrics[name] = values
        if metrics:
            out[task] = metrics
    return out


def summarise(raw: dict, expected: Iterable[str]) -> dict:
    """Metrics per task, the mean accuracy and versions; every expected task must be present."""
    results = raw.get("results", {})
    missing = [t for t in expected if t not in results]
    if missing:
        raise RuntimeError(f"lm-eval returned no results for task(s) {', '.join(missing)}")
    tasks = {t: task_metrics(r) for t, r in results.items()}
    acc_tasks = [t for t in expected if "acc" in tasks[t]]
    return {
        "tasks": tasks,
        "mean_acc": float(np.mean([tasks[t]["acc"]["value"] for t in acc_tasks])) if acc_tasks else None,
        "mean_acc_tasks": acc_tasks,
        "n_samples": {t: n.get("effective") for t, n in raw.get("n-samples", {}).items()},
        "versions": {
            "lm_eval": metadata.version("lm_eval"),
            "tasks": {t: _jsonable(v) for t, v in raw.get("versions", {}).items()},
        },
    }


@functools.cache
def _scoring_lm_class():
    """The HFLM subclass fnprune scores with (:class:`fnprune.scoring_lm.ContinuationLogitsHFLM`).

    Imported on first use: it imports torch and lm-eval, which the workflow's DAG must not.
    Benchmarks replace this function to run stock HFLM side by side.
    """
    from .scoring_lm import ContinuationLogitsHFLM

    return ContinuationLogitsHFLM


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    num_fewshot: int = 0,
    batch_size: int | str = "auto",
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    raw_out: str | Path | None = None,
    device: str | None = None,
    max_batch_size: int | None = None,
    max_length: int | None = None,
) -> dict:
    """Evaluate a model object on lm-eval tasks; write lm-eval's raw results to ``raw_out``.

    Every task is loaded before the model is touched; one that cannot be raises
    :class:`TaskUnavailableError` naming it. ``batch_size`` is an int or ``"auto"`` (largest
    batch up to ``max_batch_size``: 64 on a GPU, 32 on CPU; on CPU ``auto`` takes ``max_batch_size``
    as it is, without lm-eval's probing). ``max_length`` (the context of every request, rolling
    log-likelihood windows included) is capped at the model's maximum positions, its default. ``mean_acc`` is the mean ``acc`` of the tasks that report one.
    """
    from lm_eval import simple_evaluate

    from .modeling import resolve_device

    t0 = time.time()
    names = _check_list(tasks)
    manager = _task_manager(names, include_path)
    loaded = _load_tasks(manager, names)
    if device is not None:
        model = model.to(resolve_device(device))
    if max_batch_size is None:
        max_batch_size = 64 if model.device.type == "cuda" else 32
    requested = batch_size
    if batch_size == "auto" and model.device.type != "cuda":
        # lm-eval's probe runs full-length batches until one fits: minutes on CPU, where memory is no limit.
        batch_size = max_batch_size
    model_max = next(
        (
            getattr(model.config, a)
            for a in ("max_position_embeddings", "seq_length", "n_positions")
            if isinstance(getattr(model.config, a, None), int)
        ),
        None,
    )
    if max_length is not None and model_max is not None:
        max_length = min(max_length, model_max)
    lm = _scoring_lm_class()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_batch_size=max_batch_size,
        max_length=max_length,
    )
    raw = simple_evaluate(
        model=lm,
        tasks=loaded,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        limit=limit,
        task_manager=manager,
        log_samples=True,
        device=str(model.device),
    )
    if raw is None:
        raise RuntimeError("lm-eval returned no results (not the main process)")
    # The logged samples carry every prompt and response: only their per-item scores are kept.
    items = item_scores(raw.pop("samples", None) or {})
    raw = _jsonable(raw)
    if raw_out is not None:
        write_json(raw_out, raw)
    out = summarise(raw, _leaf_names(loaded))
    out["items"] = items
    out["config"] = {
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "batch_size_requested": requested,
        "batch_sizes": raw.get("config", {}).get("batch_sizes", []),
        "max_batch_size": max_batch_size,
        "max_length": lm.max_length,
        "limit": limit,
        "device": str(model.device),
    }
    out["wall_s"] = time.time() - t0
    log.info("lm-eval %s: mean acc %s in %.0f s", ", ".join(names), out["mean_acc"], out["wall_s"])
    return out
