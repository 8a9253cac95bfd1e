"""benchmarks/scale_7b.py: what it computes from snakemake's benchmark TSVs and its own samples."""

import importlib.util
import os

import pytest

from helpers import REPO

_spec = importlib.util.spec_from_file_location("scale_7b", REPO / "benchmarks" / "scale_7b.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _tsv(path, s, max_rss, end):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:{int(s):02d}\t{max_rss}\t1\t1\t1\t0\t0\t50\t{s}\n")
    os.utime(path, (end, end))


def test_job_records_read_the_benchmark_tsvs_in_the_order_jobs_ended(tmp_path):
    _tsv(tmp_path / "prune" / "m_r20_c8.tsv", 12.5, 1024.0, 2000.0)
    _tsv(tmp_path / "extract" / "m_b0.tsv", 30.0, 2048.0, 1000.0)
    _tsv(tmp_path / "ica" / "old.tsv", 3.0, "NA", 10.0)
    jobs = scale.job_records(tmp_path, since=500.0)
    assert [(j["rule"], j["job"]) for j in jobs] == [("extract", "m_b0"), ("prune", "m_r20_c8")]
    assert jobs[0]["max_rss_bytes"] == 2048 * 2**20 and jobs[0]["start"] == pytest.approx(970.0)
    assert scale.job_records(tmp_path)[0]["max_rss_bytes"] is None  # "NA": a job too short to sample


def test_stage_rows_take_the_larger_peak_and_compare_it_with_the_model(tmp_path):
    _tsv(tmp_path / "prune" / "m.tsv", 10.0, 1000.0, 110.0)  # snakemake sampled 1000 MiB
    _tsv(tmp_path / "perplexity" / "m.tsv", 10.0, 500.0, 130.0)
    jobs = scale.job_records(tmp_path)
    for j in jobs:
        j["script"] = j["rule"]
    model = 1000 * 2**20
    samples = {
        # the sampler saw prune at 1400 MiB (a peak between snakemake's samples), and another script
        "rss": {
            1: {"script": "prune", "first": 101.0, "last": 109.0, "max": 1400 * 2**20},
            2: {"script": "extract", "first": 101.0, "last": 109.0, "max": 9000 * 2**20},
        },
        "disk": [(105.0, 7e9), (125.0, 5e9), (200.0, 9e9)],
        "gpu": [],
    }
    prune, ppl = scale.stage_rows(jobs, samples, model)
    assert prune["peak_rss_bytes"] == 1400 * 2**20 and prune["rss_ratio"] == pytest.approx(1.4)
    assert not prune["within_limit"] and prune["disk_peak_bytes"] == 7e9 and prune["gpu_peak_bytes"] is None
    assert ppl["rss_ratio"] == pytest.approx(0.5) and ppl["within_limit"] and ppl["disk_peak_bytes"] == 5e9


def test_plan_comparison_scales_shards_to_the_plans_tokens():
    rows = scale.plan_comparison(13.48e9, [2_000 * 22016 * 2 * 32], [2_000], {"t": 10.9e9})
    weights, shards, pruned = rows
    assert weights["ratio"] == pytest.approx(13.48 / 13.5)
    # 5,000 tokens x 22,016 signals x 2 B x 32 layers is the plan's 7 GB (7.04 exactly)
    assert shards["measured"] == pytest.approx(5000 * 22016 * 2 * 32) and shards["ratio"] == pytest.approx(1.006, 1e-3)
    assert shards["bytes_per_token"] == 22016 * 2 * 32 and pruned["ratio"] == pytest.approx(10.9 / 10.8)
    text = scale.render([], rows, {"command": "x"})
    assert "# command: x" in text and "scaled to 5000 tokens" in text
