import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CONFIGS = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "micro.yaml")]


def snakemake(workdir: Path, *args: str, timeout: int = 1500, check: bool = True,
              env: dict | None = None, configs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the real snakemake on the repository's Snakefile in ``workdir`` with the micro config
    (and ``configs`` merged over it)."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
           "--configfile", *CONFIGS, *configs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The micro workflow run once for the session: dense, ICA and ICA+bias targets.

    The workdir is shared by every test that takes this fixture: a test that runs jobs in it
    passes ``--notemp``, since the activation shards are ``temp()`` and other tests read them.
    """
    wd = tmp_path_factory.mktemp("micro")
    targets = ["results/micro_dense/metrics.json", "results/micro_r20_c8/metrics.json",
               "results/micro_r20_c8_bias/metrics.json"]
    proc = snakemake(wd, *targets, "--notemp")
    return wd, proc


@torch.no_grad()
def logits_with_fixed_inputs(model, fixed, **inputs) -> torch.Tensor:
    """Logits of ``model`` with input channels of some linears overwritten.

    ``fixed`` is a list of ``(linear, channels, values)``: the ``channels`` of that linear's
    input are set to ``values`` (zero to drop them, a mean to compensate them).
    """
    def hook(idx, val):
        def pre(mod, args):
            x = args[0].clone()
            x[..., idx] = val.to(x.dtype)
            return (x,)
        return pre

    handles = [lin.register_forward_pre_hook(hook(idx, val)) for lin, idx, val in fixed]
    try:
        return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
