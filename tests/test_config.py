"""Configuration validation: every error names the key and what was expected."""

import copy

import pytest
import yaml

from fnprune import config as C


@pytest.fixture
def cfg():
    return yaml.safe_load(open("config/config.yaml"))


def test_shipped_configs_validate(cfg):
    C.validate(cfg)
    micro = yaml.safe_load(open("config/micro.yaml"))
    merged = copy.deepcopy(cfg)
    for k, v in micro.items():
        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    C.validate(merged)


def test_defaults_are_filled(cfg):
    C.validate(cfg)
    assert cfg["models"]["tiny"]["min_keep_per_layer"] == 1
    assert cfg["models"]["vicuna7b"]["trust_remote_code"] is False


@pytest.mark.parametrize("path, value, needle", [
    (("models", "tiny", "calibration", "batch_size"), 0, "models.tiny.calibration.batch_size"),
    (("models", "tiny", "corpus"), "nope", "models.tiny.corpus"),
    (("models", "tiny", "protect_first"), 7, "protect_first + protect_last"),
    (("targets", "methods"), ["c16_bogus"], "targets.methods"),
    (("targets", "ratios"), [120], "targets.ratios"),
    (("targets", "models"), ["llama9"], "targets.models"),
    (("ica", "backend"), "jax", "ica.backend"),
    (("models", "tiny", "num_layers"), 6, "differs from train.num_layers"),
    (("models", "tiny", "architecture"), "GPT2LMHeadModel", "models.tiny.architecture: 'GPT2LMHeadModel' is not supported"),
    (("models", "tiny", "eval", "ppl_seqlens"), [512], "models.tiny.eval.ppl_seqlens: 512 exceeds"),
    (("targets", "methods"), ["c2000"], "k=2000 components but model tiny has only 1024"),
    (("models", "tiny", "calibration", "n_batches"), 0, "models.tiny.calibration.n_batches"),
])
def test_errors_name_the_key(cfg, path, value, needle):
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        C.validate(cfg)


def test_flap_on_a_fused_qkv_model_is_refused_before_any_work():
    cfg = C.load("config/config.yaml")
    cfg["targets"]["models"] = ["chatglm3_6b"]
    cfg["comparison"]["methods"] = ["flap_mlp", "flap"]
    with pytest.raises(ValueError, match="comparison.methods: flap prunes attention heads.*use flap_mlp"):
        C.check(cfg)


def test_target_grammar():
    t = C.parse_target("tiny_r20_c16_nilearn_bias", ["tiny"])
    assert (t["ratio"], t["k"], t["backend"], t["bias"], t["selector"]) == (0.2, 16, "nilearn", True, "c16_nilearn")
    assert C.parse_target("tiny_dense", ["tiny"])["dense"]
    assert C.parse_target("tiny_r30_flap", ["tiny"])["bias"]
    with pytest.raises(ValueError, match="expected"):
        C.parse_target("tiny_r20_c16_foo", ["tiny"])
