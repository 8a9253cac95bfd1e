"""Faults and bad input: killed jobs, determinism, and clear errors before work."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, snakemake

STABLE_EXCLUDED = {"stage_wall_s", "wall_s", "versions", "perplexity_detail", "lm_eval_versions"}


def stable(metrics: dict) -> dict:
    """A metrics record without wall times, so two runs can be compared for equality."""
    out = {k: v for k, v in metrics.items() if k not in STABLE_EXCLUDED}
    if "lm_eval" in out:
        out["lm_eval"] = json.loads(json.dumps(out["lm_eval"]))
    return out


@pytest.mark.slow
def test_sigkill_mid_write_loses_nothing_and_rerun_matches(micro_run, tmp_path):
    """Kill the extraction, then the ICA, with SIGKILL mid-write; rerun on one core; compare."""
    ref_wd, _ = micro_run
    faults = str(REPO / "tests" / "faults")
    base = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [faults, os.environ.get("PYTHONPATH")])))
    target = "results/micro_r20_c8/metrics.json"
    acts = tmp_path / "results" / "micro" / "acts"

    killed = snakemake(tmp_path, target, "--cores", "1", check=False, env=dict(base, FNPRUNE_KILL="extract"))
    assert killed.returncode != 0
    assert (tmp_path / "results/models/micro/config.json").exists()
    assert not any(p.is_dir() for p in acts.glob("b[0-9]"))
    left = list(acts.glob(".b*.tmp"))
    assert left, "the killed extraction should have left its temporary shard folder"

    killed = snakemake(tmp_path, target, "--cores", "1", check=False, env=dict(base, FNPRUNE_KILL="ica"))
    assert killed.returncode != 0
    assert not any((tmp_path / "results/micro/ica").rglob("b*.npz"))
    assert "rule train_model" not in killed.stdout + killed.stderr

    assert not any(p.exists() for p in left), "the next extraction of that batch removes what the killed one left"
    finished = sorted(p.name for p in acts.glob("b[0-9]") if p.is_dir())
    assert finished, "the second run should have finished at least one extraction before the ICA kill"

    rerun = snakemake(tmp_path, target, "--cores", "1", env=base)
    log = rerun.stdout + rerun.stderr
    assert "rule train_model:" not in log and "rule corpus:" not in log
    for batch in finished:
        assert f"output: results/micro/acts/{batch}\n" not in log, f"{batch} was extracted again"
    ours = json.loads((tmp_path / target).read_text())
    ref = json.loads((ref_wd / target).read_text())
    assert stable(ours) == stable(ref)
    mask_a = json.loads((tmp_path / "results/micro/masks/r20_c8_torch.json").read_text())
    mask_b = json.loads((ref_wd / "results/micro/masks/r20_c8_torch.json").read_text())
    assert mask_a["kept"] == mask_b["kept"] and mask_a["threshold"] == mask_b["threshold"]


def test_too_few_calibration_texts_is_explained():
    from fnprune.extract import make_batches

    with pytest.raises(ValueError, match=r"calibration split has 5 texts; .* 4 x 2 = 8 needed"):
        make_batches(["t"] * 5, batch_size=4, n_batches=2, seed=0)


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fnprune.modeling import load_tokenizer

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        load_tokenizer(str(tmp_path))


def test_missing_local_model_directory_is_named():
    import yaml

    from fnprune import config as C

    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["models"]["mine"] = {
        "source": "local",
        "hf_id": "/nonexistent/model",
        "architecture": "LlamaForCausalLM",
        "num_layers": 2,
        "corpus": "stdlib",
    }
    with pytest.raises(ValueError, match="models.mine.hf_id: /nonexistent/model is not a directory"):
        C.validate(cfg)


def test_non_finite_activations_stop_extraction(tmp_path):
    import torch

    from fnprune.extract import extract_batch
    from fnprune.train import build_model, train_tokenizer

    texts = [f"text number {i} about neurons" for i in range(6)]
    tok = train_tokenizer(texts, 280)
    model = build_model(dict(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, max_position=32), tok)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(float("inf"))
    paths = [tmp_path / f"L{i}.npy" for i in range(2)]
    with pytest.raises(FloatingPointError, match="layer 1: non-finite MLP activations"):
        extract_batch(model, tok, texts, paths, tmp_path / "stats.npz", max_length=16)
    assert not any(p.exists() for p in paths) and not (tmp_path / "stats.npz").exists()


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_or_missing_shard_names_its_folder(tmp_path):
    """The raw mmap error ("mmap length is greater than file size") names no file: ours names the folder."""
    from fnprune.shards import ica_batch

    shards = tmp_path / "acts" / "b0"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = [shards / f"L{i}.npy" for i in range(2)]
    for p in paths:
        np.save(p, rng.standard_normal((64, 16)).astype(np.float16))
    _truncate(paths[1])
    with pytest.raises(ValueError, match=rf"{paths[1]}: missing or unreadable .* delete its folder {shards} "):
        ica_batch(paths, 2, "torch", 0)
    paths[1].unlink()
    with pytest.raises(ValueError, match=rf"{paths[1]}: missing or unreadable .*FileNotFoundError"):
        ica_batch(paths, 2, "torch", 0)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_statistics_and_scores_name_the_file(tmp_path, keep):
    """A damaged .npz raises BadZipFile/EOFError without a path; ours names it and the recovery."""
    from fnprune.extract import STATS_KEYS, load_stats
    from fnprune.io import save_npz
    from fnprune.mask import union_neuron_scores

    stats = tmp_path / "b0.stats.npz"
    save_npz(stats, **{k: np.ones((2, 4)) for k in STATS_KEYS[1:]}, n_tokens=np.array(3))
    assert load_stats([stats])["n_tokens"] == 3
    _truncate(stats, keep)
    with pytest.raises(ValueError, match=rf"{stats}: unreadable calibration statistics .*delete it and rerun"):
        load_stats([stats])

    scores = tmp_path / "b0.npz"
    save_npz(scores, scores=np.ones((2, 8)), converged=np.ones(2, bool), n_iter=np.ones(2), wall_s=np.ones(2))
    assert len(union_neuron_scores([scores])[0]) == 2
    _truncate(scores, keep)
    with pytest.raises(ValueError, match=rf"{scores}: unreadable ICA scores .*rerun its ICA job"):
        union_neuron_scores([scores])


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """Leftovers of exactly this output go; a neighbour's temporaries (a running job's) stay."""
    import tempfile

    from fnprune.io import atomic_dir, write_json

    left_dir = Path(tempfile.mkdtemp(prefix=".b1.", suffix=".tmp", dir=tmp_path))
    (left_dir / "L0.npy").write_bytes(b"x" * 100)
    left_file = Path(tempfile.mkstemp(prefix=".m.json.", suffix=".tmp", dir=tmp_path)[1])
    neighbour = Path(tempfile.mkstemp(prefix=".b1.stats.npz.", suffix=".tmp.npz", dir=tmp_path)[1])
    other = Path(tempfile.mkdtemp(prefix=".b10.", suffix=".tmp", dir=tmp_path))
    with atomic_dir(tmp_path / "b1") as d:
        (d / "L0.npy").write_bytes(b"y")
    write_json(tmp_path / "m.json", {})
    assert not left_dir.exists() and not left_file.exists()
    assert neighbour.exists() and other.exists()
    assert (tmp_path / "b1" / "L0.npy").read_bytes() == b"y"
