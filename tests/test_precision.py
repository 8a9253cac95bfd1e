"""The dtype a model runs in: ``auto`` resolved from the CPU's flags, what ran recorded, a warning
where a reduced precision runs without native kernels, and float32 accumulation of the scores."""

import logging
import math

import pytest
import torch

from fnprune import precision as P
from fnprune.config import spec_for

AMX = {"model": "Intel Xeon (test)", "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
AVX2 = {"model": "AMD EPYC (test)", "flags": ["avx2", "fma", "f16c"]}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 fma avx512_bf16 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2\n"
    )
    info = P.cpu_info.__wrapped__(str(path))
    assert info == {"model": "Some CPU", "flags": ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "fma"]}
    assert P.native("bfloat16", info) and not P.native("float16", info) and P.native("float32", info)
    assert P.cpu_info.__wrapped__(str(tmp_path / "missing"))["flags"] == []


@pytest.mark.parametrize(
    "name,gpus,info,expected",
    [
        ("auto", 0, AMX, "bfloat16"),
        ("auto", 0, AVX2, "float32"),
        ("auto", 1, AVX2, "bfloat16"),
        ("float32", 0, AMX, "float32"),
        ("bfloat16", 0, AVX2, "bfloat16"),
        ("float16", 1, AMX, "float16"),
    ],
)
def test_auto_is_what_the_machine_multiplies_fast(name, gpus, info, expected):
    assert P.resolve_dtype(name, gpus, info) == expected


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        P.resolve_dtype("fp8")


def test_the_run_dtype_decides_forward_passes_not_masks_or_pruning():
    spec = {"source": "gguf", "base": None, "package": "p", "file": "f", "dtype": "bfloat16", "protect_first": 3}
    for stage in ("extract", "stats", "perplexity", "lm_eval", "metrics"):
        assert spec_for(spec, stage)["dtype"] == "bfloat16", stage
    for stage in ("mask", "prune"):
        assert "dtype" not in spec_for(spec, stage), stage


def test_a_reduced_precision_without_native_kernels_is_warned_with_its_measured_slowdown(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_info", lambda: AVX2)
    monkeypatch.setattr(P, "matmul_slowdown", lambda dtype: 37.5)
    with caplog.at_level(logging.WARNING, logger="fnprune.precision"):
        rec = P.check("bfloat16", "cpu")
    assert rec["cpu_native"] is False and rec["matmul_slowdown_vs_float32"] == 37.5
    assert "37.5x" in caplog.text and "AMD EPYC (test)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fnprune.precision"):
        rec = P.check("float32", "cpu")
    assert rec["cpu_native"] is True and "matmul_slowdown_vs_float32" not in rec and not caplog.text
    monkeypatch.setattr(P, "cpu_info", lambda: AMX)
    with caplog.at_level(logging.WARNING, logger="fnprune.precision"):
        assert P.check("bfloat16", "cpu")["cpu_native"] is True
    assert not caplog.text


def test_the_kernels_record_names_dtype_device_and_cpu():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    rec = P.kernels(model)
    assert rec["dtype"] == "bfloat16" and rec["device"] == "cpu"
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["torch_threads"] == torch.get_num_threads() and isinstance(rec["cpu_flags"], list)


def test_matmul_slowdown_is_a_measured_ratio():
    r = P.matmul_slowdown("float32", size=64, repeats=2)
    assert math.isfinite(r) and r > 0
