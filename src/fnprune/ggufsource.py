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
# GGUF architectures fnprune converts and prunes: the transformers class each becomes (what
# transformers 5.23 reads and fnprune has an adapter for). llama.cpp writes Mistral models as
# `llama` (the same computation within Mistral's sliding window), and gguf has no `mistral`.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
    "gemma3": ("Gemma3ForCausalLM",),
}
# Tensor types the gguf package dequantises (gguf.quants), plus the plain float types.
PLAIN_TYPES = ("F32", "F16", "BF16")


def supported_types() -> list[str]:
    from gguf.quants import _type_traits

    return sorted(set(PLAIN_TYPES) | {t.name for t in _type_traits})


def _package_dir(package: str, key: str) -> Path:
    """An installed package's directory, located without importing it (its imports may be missing)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"{key}: Python package {package!r} is not installed (install it with the project's set-up: make venv)"
        )
    return Path(next(iter(found.submodule_search_locations)))


def resolve_files(spec: dict, key: str = "models.<model>") -> list[Path]:
    """The file(s) of a ``source: gguf`` model, in order: ``path``; ``file`` inside installed
    ``package``; or ``parts``, pieces of one GGUF file (each a path or a package and a file) whose
    concatenation is the file. Each must exist; the first must start with GGUF's magic."""
    if spec.get("parts"):
        files = []
        for i, part in enumerate(spec["parts"]):
            where = f"{key}.parts[{i}]"
            if isinstance(part, str):
                files.append((Path(part).expanduser(), where))
            else:
                files.append((_package_dir(part["package"], f"{where}.package") / part["file"], f"{where}.file"))
    elif spec.get("path"):
        files = [(Path(spec["path"]).expanduser(), f"{key}.path")]
    elif spec.get("package") and spec.get("file"):
        files = [(_package_dir(spec["package"], f"{key}.package") / spec["file"], f"{key}.file")]
    else:
        raise ValueError(
            f"{key}: source gguf needs path (a .gguf file), package and file (a file inside an installed "
            f"Python package), or parts (pieces of one file, in order) with sha256"
        )
    for p, where in files:
        if not p.is_file():
            raise ValueError(f"{where}: {p} is not a file")
    first, where = files[0]
    with open(first, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{where}: {first} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return [p for p, _ in files]


class _Stream:
    """Sequential reads over the concatenation of ``files``, in large blocks (a header holds a
    vocabulary of up to a few hundred thousand strings)."""

    def __init__(self, files: list[Path]):
        self.files, self.i, self.f = files, 0, open(files[0], "rb")
        self.buf, self.pos, self.offset = b"", 0, 0  # offset: bytes of the stream before buf

    def _fill(self, n: int) -> None:
        chunks, have = [self.buf[self.pos :]], len(self.buf) - self.pos
        while have < n:
            block = self.f.read(max(n - have, 1 << 22))
            if not block:
                if self.i + 1 == len(self.files):
                    break
                self.f.close()
                self.i += 1
                self.f = open(self.files[self.i], "rb")
                continue
            chunks.append(block)
            have += len(block)
        self.offset += self.pos
        self.buf, self.pos = b"".join(chunks), 0
        if have < n:
            raise EOFError

    def read(self, n: int) -> bytes:
        if len(self.buf) - self.pos < n:
            self._fill(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        import struct

        size = struct.calcsize(fmt)
        if len(self.buf) - self.pos < size:
            self._fill(size)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def tell(self) -> int:
        return self.offset + self.pos

    def close(self) -> None:
        self.f.close()


# GGUF metadata value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_KEEP_ARRAY = 1024  # arrays longer than this (vocabularies, scores, merges) are skipped, their length kept


def _string(s: _Stream) -> str:
    (n,) = s.unpack("<Q")
    return s.read(n).decode("utf-8", errors="replace")


def _value(s: _Stream, vtype: int):
    import struct

    if vtype in _SCALARS:
        return s.unpack(_SCALARS[vtype])[0]
    if vtype == 8:
        return _string(s)
    if vtype == 9:
        etype, n = s.unpack("<IQ")
        if n > _KEEP_ARRAY:
            if etype == 8:
                for _ in range(n):
                    (k,) = s.unpack("<Q")
                    s.read(k)
            elif etype in _SCALARS:
                s.read(n * struct.calcsize(_SCALARS[etype]))
            else:
                raise ValueError(f"array of value type {etype}")
            return {"array_length": n}
        return [_value(s, etype) for _ in range(n)]
    raise ValueError(f"value type {vtype}")


def read_header(files: list[Path], label: str | None = None) -> dict:
    """Metadata and tensor table of a GGUF file (given as one path or as its parts), read without
    torch and without mapping the weights; refuses a truncated or corrupt file, an architecture
    fnprune cannot convert or a tensor type it cannot dequantise, naming the file and what was
    expected.

    Returns architecture, name, the transformers class it becomes, the block shape (layers,
    hidden, MLP widths, heads, key/value heads, head_dim), tensor types and byte counts.
    """
    import gguf

    files = [Path(f) for f in files]
    label = label or (str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} parts)")
    total = sum(f.stat().st_size for f in files)
    s = _Stream(files)
    try:
        if s.read(4) != GGUF_MAGIC:
            raise ValueError(f"{label}: not a GGUF file (expected the magic {GGUF_MAGIC!r})")
        (version,) = s.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{label}: GGUF version {version}; expected 2 or 3")
        n_tensors, n_kv = s.unpack("<QQ")
        kv = {}
        for _ in range(n_kv):
            key = _string(s)
            (vtype,) = s.unpack("<I")
            kv[key] = _value(s, vtype)
        tensors = []
        for _ in range(n_tensors):
            name = _string(s)
            (n_dims,) = s.unpack("<I")
            dims = s.unpack(f"<{n_dims}Q")
            ttype, offset = s.unpack("<IQ")
            tensors.append((name, dims, ttype, offset))
        header_end = s.tell()
    except EOFError:
        raise ValueError(
            f"{label}: truncated GGUF file: its header runs past the end of the file ({total:,} bytes)"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        if str(e).startswith(label):
            raise
        raise ValueError(f"{label}: corrupt GGUF header ({e})") from None
    finally:
        s.close()
    align = int(kv.get("general.alignment", 32))
    data_start = header_end + (-header_end % align)
    arch = kv.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{label}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    types, end, last = Counter(), data_start, None
    known = {t.value: t.name for t in gguf.GGMLQuantizationType}
    for name, dims, ttype, offset in tensors:
        tname = known.get(ttype, f"type {ttype}")
        types[tname] += 1
        if tname not in supported_types():
            raise ValueError(
                f"{label}: tensor {name} is of type {tname}, which cannot be dequantised; "
                f"supported: {', '.join(supported_types())}"
            )
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n = 1
        for d in dims:
            n *= d
        stop = data_start + offset + n // block * size
        if stop > end:
            end, last = stop, name
    if end > total:
        raise ValueError(
            f"{label}: truncated GGUF file: tensor {last} ends at byte {end:,} "
            f"(data start {data_start:,} + its offset), but the file has {total:,} bytes"
        )
    name = kv.get("general.name")
    if arch == "llama" and name == "mistral":
        raise ValueError(
            f"{label}: a llama file whose general.name is 'mistral' is read by transformers 5.23 as model "
            f"type 'mistral', which its GGUF loader cannot build; rename it (general.name) to load it as LLaMA"
        )
    built = ARCHITECTURES[arch][0]

    def arch_key(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    heads = arch_key("attention.head_count")
    hidden = arch_key("embedding_length")
    shape = {
        "num_layers": arch_key("block_count"),
        "hidden_size": hidden,
        "intermediate_size": arch_key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": arch_key("attention.head_count_kv", heads),
        "head_dim": arch_key("attention.key_length") or (hidden // heads if hidden and heads else None),
    }
    gguf_keys = {
        "num_layers": "block_count",
        "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length",
        "num_attention_heads": "attention.head_count",
    }
    missing = [f"{arch}.{key}" for attr, key in gguf_keys.items() if not shape[attr]]
    if missing:
        raise ValueError(f"{label}: GGUF metadata lacks {', '.join(missing)}")
    return {
        "file": label,
        "bytes": total,
        "architecture": arch,
        "name": name,
        "transformers_class": built,
        "shape": shape,
        "tensor_types": dict(sorted(types.items())),
        "n_tensors": len(tensors),
    }


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    return sha256_files([path], chunk)


def sha256_files(files: list, chunk: int = 1 << 22, copy_to: Path | None = None) -> str:
    """sha256 of the concatenation of ``files`` (written to ``copy_to`` on the way when given)."""
    h = hashlib.sha256()
    with open(copy_to, "wb") if copy_to else contextlib.nullcontext() as out:
        for path in files:
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
                    if out:
                        out.write(block)
    return h.hexdigest()


@contextlib.contextmanager
def _one_file(files: list[Path], sha256: str | None, scratch: Path, label: str):
    """The GGUF file as one path, its sha256 checked against ``sha256`` (when given) before any
    other work: the file itself, or the parts concatenated into ``scratch`` (removed after)."""
    if len(files) == 1:
        digest = sha256_files(files)
        path = files[0]
    else:
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / "model.gguf"
        digest = sha256_files(files, copy_to=path)
    try:
        if sha256 and digest != sha256.lower():
            raise ValueError(
                f"{label}.sha256: the {'file' if len(files) == 1 else f'concatenation of {len(files)} parts'} "
                f"has sha256 {digest}, expected {sha256.lower()} (damaged or different file)"
            )
        yield path, digest
    finally:
        if len(files) > 1:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                scratch.rmdir()


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
    its merges, seconds each for SmolLM2) and builds gguf's tensor-name map once per module
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


def convert(spec: dict, out_dir: str | Path, architecture: str | None = None, label: str = "models.<model>") -> dict:
    """Dequantise the GGUF file of ``spec`` (a file, or parts concatenated) into a transformers
    directory ``out_dir`` (atomically). The sha256 (``spec.sha256``, required for parts) is checked
    first; ``architecture`` (the config's ``models.*.architecture``) must be what transformers builds.
    Returns the provenance record written beside the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling import _materialise_buffers

    t0 = time.time()
    out_dir = Path(out_dir)
    files = resolve_files(spec, label)
    scratch = out_dir.parent / f".{out_dir.name}.gguf-parts"
    with _one_file(files, spec.get("sha256"), scratch, label) as (path, digest), _parse_once():
        info = read_header(files, label)
        folder, name = str(path.parent), path.name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        built = type(loaded).__name__
        if built not in ARCHITECTURES[info["architecture"]] or (architecture and built != architecture):
            raise ValueError(
                f"{label}: transformers builds {built} from {info['file']}, but {label}.architecture is "
                f"{architecture!r}"
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
            f"{label}: dequantised tensors do not match {built} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    _materialise_buffers(plain, cfg)
    packages = [spec.get("package")] if spec.get("package") else []
    packages += [p["package"] for p in spec.get("parts") or [] if isinstance(p, dict)]
    prov = {
        "source": "gguf",
        "gguf_file": str(files[0]) if len(files) == 1 else None,
        "gguf_parts": [str(f) for f in files] if len(files) > 1 else None,
        "gguf_package": spec.get("package"),
        "gguf_package_versions": [_package_version(p) for p in packages],
        "gguf_sha256": digest,
        "gguf_bytes": info["bytes"],
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
        "converted %s (%s, %s) into %s in %.1f s",
        info["file"],
        info["name"],
        info["tensor_types"],
        out_dir,
        time.time() - t0,
    )
    return prov


def read_provenance(model_dir: str | Path | None) -> dict | None:
    """The provenance record of a converted model directory (None for any other source)."""
    from .io import read_json

    if model_dir is None:
        return None
    p = Path(model_dir) / PROVENANCE
    return read_json(p) if p.is_file() else None
