"""Fixtures shared by the tests; helpers to import live in tests/helpers.py."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import snakemake  # noqa: E402  (after the offline environment is set)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The micro workflow run once for the session: dense, ICA and ICA+bias targets.

    The workdir is shared by every test that takes this fixture: a test that runs jobs in it
    passes ``--notemp``, since the activation shards are ``temp()`` and other tests read them.
    """
    wd = tmp_path_factory.mktemp("micro")
    targets = [
        "results/micro_dense/metrics.json",
        "results/micro_r20_c8/metrics.json",
        "results/micro_r20_c8_bias/metrics.json",
    ]
    proc = snakemake(wd, *targets, "--notemp")
    return wd, proc


@pytest.fixture(scope="session")
def micro_lora_run(micro_run):
    """The micro run's dense and ICA targets tuned by LoRA (config/micro.yaml's lora section), built
    in the same workdir; returns it and the run's log (its job table)."""
    wd, _ = micro_run
    targets = ["results/micro_dense_lora/metrics.json", "results/micro_r20_c8_lora/metrics.json"]
    proc = snakemake(wd, *targets, "--notemp")
    return wd, proc.stdout + proc.stderr
