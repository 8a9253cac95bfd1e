"""Text corpora: the embedded one (Python's own documentation), local text files, hub datasets.

Every corpus is materialised as four JSONL splits (``train``, ``calib``, ``validation``,
``test``), one ``{"id", "text"}`` record a line, plus a manifest with the split's hash.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import platform
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from .io import atomic_path, sha256_of_strings, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "calib", "validation", "test")

# Standard-library modules whose docstrings join pydoc's topics in the embedded corpus. A fixed,
# sorted list (not sys.stdlib_module_names) so the corpus never imports a module with side
# effects (antigravity, this, idlelib) and stays the same from run to run.
STDLIB_MODULES = sorted(
    """
abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs collections
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis
email enum filecmp fnmatch fractions functools gc getopt gettext glob graphlib gzip hashlib
heapq hmac html html.parser http.client http.server imaplib inspect io ipaddress itertools json
keyword linecache locale logging lzma mailbox math mimetypes multiprocessing numbers operator
os os.path pathlib pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri
random re reprlib sched secrets select selectors shelve shlex shutil signal smtplib socket
socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys tarfile
tempfile textwrap threading time timeit token tokenize trace traceback types typing unicodedata
unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom xml.etree.ElementTree
zipfile zlib
""".split()
)


# The parts of the embedded text (config ``corpora.*.parts``): pydoc's topics are the language
# reference, ``modules`` the docstrings of STDLIB_MODULES (imported); ``docstrings`` and ``code``
# are read from the standard library's own source files (parsed, never imported): every docstring
# of a file, and the file's source text.
EMBEDDED_PARTS = ("topics", "modules", "docstrings", "code")
DEFAULT_PARTS = ("topics", "modules")  # the stdlib corpus (tiny's training text)
FILE_PARTS = ("docstrings", "code")

# Folders of the standard library left out of the file parts: tests, the bundled pip and the IDLE
# and 2to3 applications, generated data (pydoc_data holds the topics, encodings' codec tables).
SKIPPED_DIRS = frozenset(
    "site-packages dist-packages test tests idlelib lib2to3 turtledemo pydoc_data encodings ensurepip "
    "__pycache__ __phello__".split()
)


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (``sysconfig``'s ``stdlib`` path)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, :data:`SKIPPED_DIRS` left out."""
    root = stdlib_root() if root is None else Path(root)
    return sorted(
        (
            p
            for p in root.rglob("*.py")
            if not any(part in SKIPPED_DIRS or part.startswith("test") for part in p.relative_to(root).parts[:-1])
            and not p.name.startswith("test_")
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def file_docstrings(source: str, module: str) -> str:
    """Every docstring of a source file (module, classes, functions, methods) of more than 80
    characters, each under its qualified name, in source order; ``""`` when it does not parse."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                d = ast.get_docstring(child)
                if d and len(d) > 80:
                    parts.append(f"{name}\n\n{d}")
                walk(child, name)

    walk(tree, module)
    return "\n\n".join(parts)


def _file_documents(part: str) -> list[tuple[str, str, str]]:
    root = stdlib_root()
    docs = []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if part == "docstrings":
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            text = file_docstrings(source, module)
        else:
            text = source
        if text.strip():
            # One split key per file for both parts: a file's docstrings and its code fall in the
            # same split, so a corpus of one never calibrates on the other's held-out text.
            docs.append((f"{part}:{rel}", text, f"file:{rel}"))
    return docs


def embedded_documents(parts: Iterable[str] = DEFAULT_PARTS) -> list[tuple[str, str, str]]:
    """``(title, text, split key)`` triples of the embedded text's ``parts``.

    A document's split key, and so its split (:func:`split_of`), does not depend on ``parts``: a
    corpus of one part is the other documents removed, each split a subset of the full corpus's.
    The file parts key by file, so the docstrings and the code of one file share a split.
    """
    parts = set(parts)
    if unknown := parts - set(EMBEDDED_PARTS):
        raise ValueError(f"corpora.*.parts: {sorted(unknown)} unknown; expected some of {', '.join(EMBEDDED_PARTS)}")
    docs = []
    if "topics" in parts:
        from pydoc_data.topics import topics

        docs += [(f"topic:{name}", text, f"topic:{name}") for name, text in sorted(topics.items())]
    for modname in STDLIB_MODULES if "modules" in parts else ():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(modname)
            except ImportError:  # a minimal Python without e.g. sqlite3 or ssl
                continue
        texts = []
        if mod.__doc__:
            texts.append(inspect.cleandoc(mod.__doc__))
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                texts.append(f"{modname}.{name}\n\n{doc}")
        if texts:
            docs.append((f"module:{modname}", "\n\n".join(texts), f"module:{modname}"))
    for part in FILE_PARTS:
        if part in parts:
            docs += _file_documents(part)
    return docs


def chunk_document(text: str, max_chars: int, min_chars: int) -> list[str]:
    """Pack a document's paragraphs greedily into chunks of at most ``max_chars`` characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks, cur = [], ""
    for p in paragraphs:
        p = p[:max_chars]
        if cur and len(cur) + 2 + len(p) > max_chars:
            chunks.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        chunks.append(cur)
    return [c for c in chunks if len(c) >= min_chars]


def split_of(title: str, fractions: dict[str, float]) -> str:
    """Deterministic split of a document from the hash of its title (no leakage of chunks)."""
    u = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    acc = 0.0
    for name in SPLITS:
        acc += fractions[name]
        if u < acc:
            return name
    return SPLITS[-1]


def _records_from_documents(docs: Iterable[tuple], spec: dict) -> dict[str, list[dict]]:
    """Chunked records by split. ``docs`` are ``(title, text)`` or ``(title, text, split key)``;
    ``group_chunks`` neighbouring chunks share a split (0: the whole document does)."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    group = spec.get("group_chunks", 4)
    for title, text, *key in docs:
        key = key[0] if key else title
        for i, chunk in enumerate(chunk_document(text, spec["max_chars"], spec["min_chars"])):
            # Neighbouring chunks of a document stay in one split; long documents still spread.
            split = split_of(key if group == 0 else f"{key}#{i // group}", spec["fractions"])
            out[split].append({"id": f"{title}#{i}", "text": chunk})
    return out


def _hf_records(spec: dict) -> dict[str, list[dict]]:
    import datasets

    out: dict[str, list[dict]] = {}
    for split, hf_split in spec["hf_splits"].items():
        try:
            ds = datasets.load_dataset(
                spec["path"],
                spec.get("name"),
                split=hf_split,
                revision=spec.get("revision"),
                data_files=spec.get("data_files"),
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the config key that caused it
            raise RuntimeError(
                f"corpus {spec['path']!r} (config corpora.*.path), split {hf_split!r}: could not be "
                f"loaded ({type(e).__name__}: {e}). It needs the Hugging Face hub or a local "
                f"datasets cache (HF_DATASETS_OFFLINE=1 uses the cache only)."
            ) from e
        field = spec.get("text_field", "text")
        rows = [r[field] for r in ds]
        if split == "test" and spec.get("keep_empty_in_test", False):
            out[split] = [{"id": f"{hf_split}:{i}", "text": t} for i, t in enumerate(rows)]
        else:
            out[split] = [
                {"id": f"{hf_split}:{i}", "text": t} for i, t in enumerate(rows) if len(t.strip()) >= spec["min_chars"]
            ]
    return out


def build_corpus(spec: dict, out_dir: str | Path) -> dict:
    """Materialise a corpus described by a ``corpora.<name>`` config entry into ``out_dir``."""
    out_dir = Path(out_dir)
    source = spec["source"]
    if source == "embedded":
        records = _records_from_documents(embedded_documents(spec.get("parts", DEFAULT_PARTS)), spec)
    elif source == "text":
        path = Path(spec["path"])
        if not path.is_file():
            raise FileNotFoundError(f"corpora.*.path: {path} is not a readable text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"corpora.*.path: {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                f"expected a plain text file, documents separated by two blank lines"
            ) from None
        if not text.strip():
            raise ValueError(f"corpora.*.path: {path} is empty; expected text, documents separated by two blank lines")
        docs = [(f"{path.name}:{i}", d) for i, d in enumerate(re.split(r"\n\s*\n\s*\n", text))]
        records = _records_from_documents(docs, spec)
    elif source == "hf":
        records = _hf_records(spec)
    else:
        raise ValueError(f"corpora.*.source: expected one of embedded, text, hf; got {source!r}")

    manifest = {"source": source, "splits": {}}
    if source == "embedded":
        manifest["parts"] = list(spec.get("parts", DEFAULT_PARTS))
        manifest["python"] = platform.python_version()  # the file parts are its standard library
    for split in SPLITS:
        recs = records.get(split, [])
        with atomic_path(out_dir / f"{split}.jsonl") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        texts = [r["text"] for r in recs]
        manifest["splits"][split] = {
            "records": len(recs),
            "chars": sum(map(len, texts)),
            "sha256": sha256_of_strings(texts),
        }
        log.info("corpus split %s: %d records, %d chars", split, len(recs), sum(map(len, texts)))
    manifest["sha256"] = sha256_of_strings([v["sha256"] for v in manifest["splits"].values()])
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_records(path: str | Path) -> list[dict]:
    """The ``{"id", "text"}`` records of one JSONL split file."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                records.append({"id": str(rec["id"]), "text": rec["text"]})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'id' and 'text' ({e})") from None
    return records


def read_split(path: str | Path) -> list[str]:
    """Texts of one JSONL split file."""
    return [r["text"] for r in read_records(path)]
