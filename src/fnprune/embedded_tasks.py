"""The embedded lm-eval tasks, built from held-out text: they need no network.

``fnprune_mc`` picks a passage's true continuation among ``n_choices`` (the others being
continuations of passages of other records); ``fnprune_ppl`` is document-level rolling
log-likelihood, as lm-eval's ``wikitext``. :func:`write_embedded_tasks` writes their data and
lm-eval YAMLs (from the templates in ``fnprune/tasks/``) into a folder that
:func:`fnprune.lmeval.run_lm_eval` takes as ``include_path``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .corpus import read_records
from .io import atomic_path, sha256_of_strings, write_json

log = logging.getLogger(__name__)

MC_TASK, PPL_TASK = "fnprune_mc", "fnprune_ppl"
TEMPLATES = Path(__file__).parent / "tasks"

_CUT = re.compile(r"(?<=\S) (?=\S)")
_CHUNK_ID = re.compile(r"(.*)#(\d+)")


def _last_cut(cuts: list[int], lo: int, hi: int) -> int | None:
    """The last word boundary in ``(lo, hi]``."""
    i = bisect.bisect_right(cuts, hi) - 1
    return cuts[i] if i >= 0 and cuts[i] > lo else None


def passage_windows(text: str, passage_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """Consecutive ``(context, continuation)`` pairs of a text, both cut at single spaces."""
    cuts = [m.start() for m in _CUT.finditer(text)]
    out, start = [], 0
    while True:
        a = _last_cut(cuts, start + passage_chars // 2, start + passage_chars)
        if a is None:
            return out
        b = _last_cut(cuts, a + 1 + continuation_chars // 2, a + 1 + continuation_chars)
        if b is None:
            return out
        out.append((text[start:a], text[a + 1 : b]))
        start = b + 1


def _passages(records: Iterable[dict], passage_chars: int, continuation_chars: int) -> list[dict]:
    seen: set[str] = set()
    out = []
    for rec in records:
        for k, (context, gold) in enumerate(passage_windows(rec["text"], passage_chars, continuation_chars)):
            if gold not in seen:
                seen.add(gold)
                out.append({"id": f"{rec['id']}@{k}", "source": rec["id"], "context": context, "gold": gold})
    return out


def mc_items(passages: list[dict], n_choices: int, n_items: int | None, seed: int) -> list[dict]:
    """Multiple-choice items; the distractors are the continuations of passages of other records."""
    rng = np.random.default_rng(seed)
    chosen = range(len(passages))
    if n_items is not None and n_items > len(passages):
        raise ValueError(
            f"mc_task.n_items = {n_items}, but the held-out text holds {len(passages)} passages; "
            f"lower n_items or passage_chars, or give the corpus larger validation/test fractions"
        )
    if n_items is not None and n_items < len(passages):
        chosen = sorted(rng.choice(len(passages), size=n_items, replace=False).tolist())
    items = []
    for i in chosen:
        p = passages[i]
        others = [j for j, q in enumerate(passages) if q["source"] != p["source"]]
        if len(others) < n_choices - 1:
            raise ValueError(
                f"passage {p['id']}: only {len(others)} passages of other records, "
                f"{n_choices - 1} distractors needed; give more held-out text"
            )
        picked = [passages[j] for j in rng.choice(others, size=n_choices - 1, replace=False).tolist()]
        label = int(rng.integers(n_choices))
        picked.insert(label, p)
        items.append(
            {
                "id": p["id"],
                "context": p["context"],
                "choices": [q["gold"] for q in picked],
                "label": label,
                "sources": [q["source"] for q in picked],
            }
        )
    return items


def ppl_documents(records: Iterable[dict]) -> list[dict]:
    """Non-blank records joined back into documents: consecutive chunks ``<doc>#<i>`` of one document."""
    docs: list[dict] = []
    last: tuple[str, int] | None = None
    for rec in records:
        if not rec["text"].strip():
            last = None
            continue
        m = _CHUNK_ID.fullmatch(rec["id"])
        key = (m.group(1), int(m.group(2))) if m else None
        if key and last and key == (last[0], last[1] + 1):
            docs[-1]["text"] += "\n\n" + rec["text"]
        else:
            docs.append({"id": key[0] if key else rec["id"], "text": rec["text"]})
        last = key
    return docs


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


MC_METRICS = ("acc", "acc_norm", "acc_mutual_info")


def _write_task_yaml(name: str, data: Path, out_dir: Path, metrics: Iterable[str] | None = None) -> Path:
    cfg = yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data.resolve())}}
    if metrics is not None:  # acc_mutual_info costs one more pass per choice (its unconditional scores)
        cfg["metric_list"] = [m for m in cfg["metric_list"] if m["metric"] in set(metrics)]
    path = out_dir / f"{name}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_embedded_tasks(
    test_jsonl: str | Path,
    validation_jsonl: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    n_choices: int = 4,
    passage_chars: int = 384,
    continuation_chars: int = 48,
    n_items: int | None = None,
    metrics: Iterable[str] = MC_METRICS,
) -> dict:
    """Write the data and lm-eval YAMLs of ``fnprune_mc`` and ``fnprune_ppl`` into ``out_dir``.

    Multiple-choice passages come from the validation and test splits (windows of
    ``passage_chars`` context and ``continuation_chars`` continuation); perplexity documents
    from the test split only. Returns the paths, item counts and sha256 of the data.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices={n_choices}: need at least 2")
    metrics = list(metrics)
    if not metrics or set(metrics) - set(MC_METRICS):
        raise ValueError(f"mc_task.metrics: {metrics}; expected some of {', '.join(MC_METRICS)}")
    out_dir = Path(out_dir).resolve()
    test, validation = read_records(test_jsonl), read_records(validation_jsonl)
    try:
        items = mc_items(_passages(validation + test, passage_chars, continuation_chars), n_choices, n_items, seed)
    except ValueError as e:
        raise ValueError(f"{validation_jsonl} + {test_jsonl}: {e}") from None
    if not items:
        raise ValueError(
            f"{test_jsonl}, {validation_jsonl}: no passage of {passage_chars}+"
            f"{continuation_chars} characters; lower passage_chars"
        )
    docs = ppl_documents(test)
    if not docs:
        raise ValueError(f"{test_jsonl}: empty test split, nothing to compute perplexity on")
    info: dict[str, Any] = {"dir": str(out_dir), "seed": seed, "tasks": {}}
    for name, rows in ((MC_TASK, items), (PPL_TASK, docs)):
        data = out_dir / f"{name}.jsonl"
        sha = _write_jsonl(data, rows)
        info["tasks"][name] = {
            "yaml": str(_write_task_yaml(name, data, out_dir, metrics if name == MC_TASK else None)),
            "data": str(data),
            "items": len(rows),
            "sha256": sha,
        }
    info["tasks"][MC_TASK].update(
        n_choices=n_choices, passage_chars=passage_chars, continuation_chars=continuation_chars, metrics=metrics
    )
    info["sha256"] = sha256_of_strings([t["sha256"] for t in info["tasks"].values()])
    write_json(out_dir / "manifest.json", info)
    log.info("embedded tasks in %s: %d multiple-choice items, %d perplexity documents", out_dir, len(items), len(docs))
    return info
