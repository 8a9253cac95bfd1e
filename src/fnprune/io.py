"""Atomic writes, sidecars and provenance.

Every artefact fnprune writes goes to a temporary name in the same directory and is renamed
into place, so a killed job never leaves a file that Snakemake would take as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it (``.<name>.<random>.tmp*``).

    Only the job that makes ``path`` writes these names, and Snakemake runs one such job at a
    time, so whatever exists when it starts is left over from a killed run (for a 7B model's
    shard folder, gigabytes). Returns what was removed (logged).
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp(\..*)?$")
    removed = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if pattern.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
                log.info("removed %s, left by a killed job", p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary name, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: expected a JSON file written by fnprune, found none") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and rerun the rule that makes it") from None


def load_npz(path: str | os.PathLike, what: str, keys: tuple[str, ...], recover: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file fnprune wrote, or an error naming the file and ``recover``.

    A truncated or damaged archive raises ``zipfile.BadZipFile`` or ``EOFError`` from numpy, which
    name no file; a missing key is an archive from another stage or version. Optional keys (read
    when present) are those in ``keys`` ending with ``?``.
    """
    import zipfile

    path = Path(path)
    try:
        with np.load(path) as z:
            out = {}
            for k in keys:
                name = k.rstrip("?")
                if name in z.files or not k.endswith("?"):
                    out[name] = z[name]
            return out
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); {recover}") from None


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_of_strings(items: list[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in (
        "fnprune",
        "torch",
        "transformers",
        "tokenizers",
        "numpy",
        "scikit-learn",
        "nilearn",
        "lm_eval",
        "snakemake",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Send fnprune's logging (and warnings) to ``log_file`` and stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)
