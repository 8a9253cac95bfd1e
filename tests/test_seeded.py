"""Models of seeded random weights built from an architecture config (``source: init``): the
architecture and its errors, the weights as written, and a tiny one through the workflow."""

import copy
import json
import re

import pytest
import torch
import yaml

from fnprune import config as C
from fnprune import seeded
from helpers import REPO, snakemake

TINY = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position": 128,
    "tie_embeddings": True,
}
TINY_MODEL = {
    "source": "init",
    "init": TINY,
    "corpus": "stdlib",
    "dtype": "float32",
    "protect_first": 1,
    "protect_last": 1,
    "calibration": {"batch_size": 4, "n_batches": 1, "max_length": 64, "micro_batch_size": 4},
    "eval": {"ppl_seqlens": [64], "ppl_max_windows": 4, "lm_eval_tasks": []},
}


@pytest.fixture
def cfg():
    return copy.deepcopy({**yaml.safe_load(open(REPO / "config" / "micro.yaml")), "corpora": _corpora()})


def _corpora():
    return yaml.safe_load(open(REPO / "config" / "config.yaml"))["corpora"]


def _with(cfg, **models):
    cfg = copy.deepcopy(cfg)
    cfg["models"] = {**cfg["models"], **copy.deepcopy(models)}
    return cfg


def test_the_bundled_llama2_7b_has_its_parameter_count():
    spec = seeded.resolve_init("llama2_7b", "models.x.init")
    assert seeded.parameter_count(spec) == 6_738_415_616  # LLaMA-2-7B
    assert seeded.weight_bytes(spec) == 2 * 6_738_415_616 and spec["dtype"] == "bfloat16"
    over = seeded.resolve_init({"preset": "llama2_7b", "num_layers": 4}, "models.x.init")
    assert over["num_layers"] == 4 and over["hidden_size"] == 4096


def test_parameter_count_is_the_models():
    from transformers import AutoModelForCausalLM

    spec = seeded.resolve_init(TINY, "k")

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(seeded.hf_config(spec, Tok()))
    assert seeded.parameter_count(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "init, needle",
    [
        ("llama3_70b", "models.s.init.preset: 'llama3_70b' is not a bundled config"),
        ({"hidden_size": 32}, "models.s.init.vocab_size: required without a preset"),
        ({**TINY, "num_heads": 5}, "models.s.init.num_heads: hidden_size 32 is not a multiple of 5"),
        ({**TINY, "num_kv_heads": 3}, "models.s.init.num_kv_heads"),
        ({**TINY, "dtype": "int8"}, "config key models.s.init"),
        ({**TINY, "width": 3}, "config key models.s.init"),
    ],
)
def test_init_errors_name_the_key(cfg, init, needle):
    with pytest.raises(ValueError, match="invalid configuration") as e:
        C.validate(_with(cfg, s={**TINY_MODEL, "init": init}))
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("num_layers", 6, "models.s.num_layers: 6, but init gives 4"),
        ("intermediate_size", 96, "models.s.intermediate_size: 96, but init gives 64"),
        ("init", None, "models.s.init: required for source init"),
        ("eval", {"ppl_seqlens": [256]}, "models.s.eval.ppl_seqlens: 256 exceeds"),
    ],
)
def test_init_model_errors_name_the_key(cfg, key, value, needle):
    model = {**TINY_MODEL, key: value}
    if value is None:
        del model[key]
    with pytest.raises(ValueError, match="invalid configuration") as e:
        C.validate(_with(cfg, s=model))
    assert needle in str(e.value)


def test_an_init_model_fills_its_shape_and_its_alias_shares_it(cfg):
    out = C.validate(_with(cfg, s=TINY_MODEL, s_a={"base": "s", "calibration": {"seed": 3}}))
    s = out["models"]["s"]
    assert (s["architecture"], s["num_layers"], s["intermediate_size"], s["num_key_value_heads"]) == (
        "LlamaForCausalLM",
        4,
        64,
        2,
    )
    assert out["models"]["s_a"]["init"] == s["init"] and s["init"]["std"] == 0.02
    with pytest.raises(ValueError, match="models.s_b.init: an alias shares the weights"):
        C.validate(_with(cfg, s=TINY_MODEL, s_b={"base": "s", "init": {**TINY, "num_layers": 2}}))
    with pytest.raises(ValueError, match="k = 200 components exceed the 128 signals"):
        C.check_target("s_r20_c200", out, list(out["models"]))


def test_weights_are_seeded_written_once_per_block_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    spec = seeded.resolve_init({**TINY, "dtype": "bfloat16", "tie_embeddings": False}, "k")
    texts = ["def f(x):\n    return x + 1\n" * 20, "The quick brown fox jumps over the lazy dog. " * 20]
    a = seeded.build_init_model(texts, spec, tmp_path / "a", seed=0)
    seeded.build_init_model(texts, spec, tmp_path / "b", seed=0)
    seeded.build_init_model(texts, spec, tmp_path / "c", seed=1)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == spec["num_layers"] + 1  # one shard per block, then the rest
    assert a["parameters"] == seeded.parameter_count(spec) and a["weights_bytes"] == seeded.weight_bytes(spec)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(tmp_path / x) for x in "abc")
    assert ma.dtype == torch.bfloat16
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = sa["model.layers.1.mlp.up_proj.weight"].float()
    assert not torch.equal(w, sc["model.layers.1.mlp.up_proj.weight"].float())
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(sa["model.norm.weight"].float(), torch.ones(32))
    out = ma(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert out.shape == (1, 4, 512) and torch.isfinite(out.float()).all()


def test_the_workflow_builds_an_init_model_with_its_own_rule(tmp_path):
    """The dry run (seconds): the init_model job makes the weights every stage of a target reads."""
    extra = tmp_path / "init.yaml"
    extra.write_text(yaml.safe_dump({"models": {"seedy": TINY_MODEL}}))
    proc = snakemake(tmp_path, "-n", "results/seedy_r20_c8/metrics.json", configs=(str(extra),))
    out = proc.stdout + proc.stderr
    assert re.search(r"^init_model\s+1$", out, re.M) and "output: results/models/seedy" in out
    assert "train_model" not in out and "convert_gguf" not in out


@pytest.mark.slow
def test_an_init_model_runs_through_the_workflow(tmp_path):
    """A tiny init model: built by its rule, pruned and evaluated, its metrics naming its source
    (2-3 minutes on 2 cores: a job's start imports torch and transformers)."""
    extra = tmp_path / "init.yaml"
    extra.write_text(yaml.safe_dump({"models": {"seedy": TINY_MODEL}}))
    proc = snakemake(tmp_path, "results/seedy_r20_c8/metrics.json", configs=(str(extra),))
    assert "init_model" in proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "results" / "seedy_r20_c8" / "metrics.json").read_text())
    assert rec["source_model"] == "init:seedy" and rec["base_model"]["seeded_random_weights"]
    assert rec["base_model"]["parameters"] == seeded.parameter_count(seeded.resolve_init(TINY, "k"))
    assert 0.15 < rec["achieved_block_ratio"] < 0.25 and "init_model" in rec["stage_wall_s"]
    assert (tmp_path / "results" / "benchmarks" / "init" / "seedy.tsv").is_file()
