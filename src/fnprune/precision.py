"""The arithmetic a model runs in: ``dtype: auto`` resolved, and what ran recorded.

bfloat16 is fast on a CPU only where the CPU multiplies it natively (``avx512_bf16``, AMX's
``amx_bf16``). Elsewhere torch's bfloat16 matmul takes a slow fallback, many times slower than
float32 (``benchmarks/bf16_kernels.py`` measures both side by side on the machine it runs on). So
``dtype: auto`` is bfloat16 on such a CPU (and on a GPU), float32 on any other, and a job that is
asked for a reduced precision its CPU lacks says so in its log, with the slowdown it measures.

The CPU is read from ``/proc/cpuinfo`` (no torch), so the workflow resolves ``auto`` when it builds
the DAG and the resolved dtype is part of every job's parameters (its cache key).
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
# CPU flags (Linux /proc/cpuinfo names) that decide how fast reduced precision multiplies.
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
RECORDED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and its flags of :data:`RECORDED_FLAGS` (empty where unreadable)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    p = Path(path)
    if p.is_file():
        for line in p.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "model name":
                model = value.strip()
            if flags and key == "model name":
                break
    return {"model": model, "flags": sorted(f for f in RECORDED_FLAGS if f in flags)}


def native(dtype: str = "bfloat16", info: dict | None = None) -> bool:
    """Whether the CPU multiplies ``dtype`` natively (bfloat16: AVX512-BF16 or AMX-BF16; float16:
    AVX512-FP16 or AMX-FP16; float32: always)."""
    flags = set((info or cpu_info())["flags"])
    return dtype == "float32" or any(f in flags for f in NATIVE_FLAGS.get(dtype, ()))


def resolve_dtype(name: str, gpus: int = 0, info: dict | None = None) -> str:
    """A model's ``dtype``: ``auto`` is bfloat16 on a GPU or a CPU with native bfloat16, else float32."""
    if name not in (*DTYPES, "auto"):
        raise ValueError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if gpus or native("bfloat16", info) else "float32"


def matmul_slowdown(dtype: str, size: int = 256, repeats: int = 3) -> float:
    """Seconds of one ``size``-cubed ``dtype`` matmul over one float32 matmul, measured now
    (best of ``repeats``): what a job in ``dtype`` pays per multiply on this CPU."""
    import torch

    def best(dt) -> float:
        a = torch.randn(size, size).to(dt)
        b = torch.randn(size, size).to(dt)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(getattr(torch, dtype)) / best(torch.float32)


def kernels(model_or_dtype, device: str | None = None) -> dict:
    """What a model's arithmetic ran on: dtype, device, CPU model and flags, torch's CPU kernel
    level (``cpu_capability``), whether the CPU multiplies that dtype natively, the GPU's name on CUDA."""
    import torch

    if isinstance(model_or_dtype, str):
        dtype, dev = model_or_dtype, device or "cpu"
    else:
        p = next(model_or_dtype.parameters())
        dtype, dev = str(p.dtype).removeprefix("torch."), str(p.device)
    info = cpu_info()
    rec = {
        "dtype": dtype,
        "device": dev,
        "cpu": info["model"],
        "cpu_flags": info["flags"],
        "cpu_native": native(dtype, info) if dtype in DTYPES else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.startswith("cuda"):
        rec["gpu"] = torch.cuda.get_device_name(torch.device(dev))
        rec["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return rec


def check(model_or_dtype, device: str | None = None) -> dict:
    """:func:`kernels`, with a warning in the job's log when a reduced precision runs on a CPU
    that lacks it natively (the slowdown measured by :func:`matmul_slowdown` is recorded)."""
    rec = kernels(model_or_dtype, device)
    if rec["device"] == "cpu" and rec["dtype"] in ("bfloat16", "float16") and not rec["cpu_native"]:
        slow = matmul_slowdown(rec["dtype"])
        rec["matmul_slowdown_vs_float32"] = round(slow, 2)
        log.warning(
            "dtype %s on a CPU that does not multiply it natively (%s; flags %s): a %s matmul "
            "takes %.1fx the time of a float32 one here. Set the model's dtype to float32 (or auto) "
            "on this machine.",
            rec["dtype"],
            rec["cpu"],
            ", ".join(rec["cpu_flags"]) or "none read",
            rec["dtype"],
            slow,
        )
    return rec
