"""GGUF models as a source: locate, inspect, dequantise into a transformers directory; write GGUF.

``source: gguf`` models (what llama.cpp and Ollama users keep on disk) are converted once, by the
``convert_gguf`` rule, into ``results/models/{model}/``: fp32 safetensors, config and tokenizer,
plus ``provenance.json`` (the GGUF file's sha256, its tensor quantisation types, ``dequantised``),
which every pruned model's sidecar and every metrics file built on it carries.

Writing GGUF (the ``export_gguf`` rule) is :mod:`fnprune.ggufwrite`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import time
from collections import Counter
from pathlib import Path

from .io import atomic_dir, versions, write_json

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
GGUF_MAGIC = b"GGUF"
# GGUF architectures fnprune converts and prunes (transformers reads more; fnprune's adapters and
# tests cover these). transformers turns a llama file whose general.name says mistral into Mistral.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM")}
# Tensor types the gguf package dequantises (gguf.quants), plus the plain float types.
PLAIN_TYPES = ("F32", "F16", "BF16")


def supported_types() -> list[str]:
    from gguf.quants import _type_traits

    return sorted(set(PLAIN_TYPES) | {t.name for t in _type_traits})


def resolve_file(spec: dict, key: str = "models.<model>") -> Path:
    """The GGUF file of a ``source: gguf`` model: ``path``, or ``file`` inside installed ``package``.

    The package is located without being imported (its own imports may not be installed).
    """
    if spec.get("path"):
        p = Path(spec["path"]).expanduser()
        where = f"{key}.path"
    elif spec.get("package") and spec.get("file"):
        found = importlib.util.find_spec(spec["package"])
        if found is None or not found.submodule_search_locations:
            raise ValueError(
                f"{key}.package: Python package {spec['package']!r} is not installed "
                f"(install it with the project's set-up: make venv)"
            )
        p = Path(next(iter(found.submodule_search_locations))) / spec["file"]
        where = f"{key}.file"
    else:
        raise ValueError(
            f"{key}: source gguf needs path (a .gguf file) or package and file (a file inside an "
            f"installed Python package)"
        )
    if not p.is_file():
        raise ValueError(f"{where}: {p} is not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{where}: {p} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return p


def inspect(path: str | Path) -> dict:
    """Architecture, name and tensor types of a GGUF file (header only); refuses what fnprune cannot
    convert, naming it and listing what is supported."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else None
    types = Counter(t.tensor_type.name for t in reader.tensors)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    bad = sorted(set(types) - set(supported_types()))
    if bad:
        raise ValueError(
            f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantised; supported: {', '.join(supported_types())}"
        )
    return {
        "architecture": arch,
        "name": name,
        "tensor_types": dict(sorted(types.items())),
        "n_tensors": len(reader.tensors),
    }


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_version(package: str | None) -> str | None:
    if not package:
        return None
    dists = importlib.metadata.packages_distributions().get(package, [])
    return f"{dists[0]}=={importlib.metadata.version(dists[0])}" if dists else None


@contextlib.contextmanager
def _parse_once():
    """Within one conversion, read each GGUF file's header once and build each tensor-name map once.

    transformers opens the file anew for the model, the config and the tokenizer (four
    ``GGUFReader`` objects, each walking every metadata field: the vocabulary's 49,152 strings and
    its merges, about 2.5 s each for SmolLM2) and builds gguf's tensor-name map once per module
    (397 times, the same map). Both are read-only after construction, so one of each is shared
    for the duration of the block; the weights read are the same bytes.
    """
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def convert(spec: dict, out_dir: str | Path, architecture: str | None = None) -> dict:
    """Dequantise the GGUF file of ``spec`` into a transformers directory ``out_dir`` (atomically).

    ``architecture`` (the config's ``models.*.architecture``) must be what transformers builds.
    Returns the provenance record written beside the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling import _materialise_buffers

    t0 = time.time()
    path = resolve_file(spec)
    with _parse_once():
        info = inspect(path)
        folder, name = str(path.parent), path.name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        built = type(loaded).__name__
        if built not in ARCHITECTURES[info["architecture"]] or (architecture and built != architecture):
            raise ValueError(
                f"{path}: transformers builds {built} from it, but models.*.architecture is {architecture!r}"
            )
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    cfg.architectures = [built]
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = "float32"
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and move the weights over.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: dequantised tensors do not match {built} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    _materialise_buffers(plain, cfg)
    prov = {
        "source": "gguf",
        "gguf_file": str(path),
        "gguf_package": spec.get("package"),
        "gguf_package_version": _package_version(spec.get("package")),
        "gguf_sha256": sha256_file(path),
        "gguf_bytes": path.stat().st_size,
        "gguf_name": info["name"],
        "gguf_architecture": info["architecture"],
        "tensor_types": info["tensor_types"],
        "dequantised": any(t not in PLAIN_TYPES for t in info["tensor_types"]),
        "saved_dtype": "float32",
        "architecture": built,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "versions": versions(),
    }
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
        tok.save_pretrained(tmp)
        prov["wall_s"] = time.time() - t0
        write_json(tmp / PROVENANCE, prov)
    log.info(
        "converted %s (%s, %s) into %s in %.1f s", path, info["name"], info["tensor_types"], out_dir, time.time() - t0
    )
    return prov


def read_provenance(model_dir: str | Path | None) -> dict | None:
    """The provenance record of a converted model directory (None for any other source)."""
    from .io import read_json

    if model_dir is None:
        return None
    p = Path(model_dir) / PROVENANCE
    return read_json(p) if p.is_file() else None
