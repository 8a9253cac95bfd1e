"""Configuration validation: every error names the key and what was expected."""

import copy
import subprocess

import pytest
import yaml

from fnprune import config as C
from fnprune import paper
from helpers import REPO, SNAKEMAKE


@pytest.fixture
def cfg():
    """config/config.yaml with config/tiny.yaml's targets (the toy model's keys are the ones varied)."""
    base = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    base.update(yaml.safe_load(open(REPO / "config" / "tiny.yaml")))
    return base


def test_shipped_configs_validate(cfg):
    C.validate(cfg)
    assert cfg["targets"]["models"] == ["tiny"] and cfg["comparison"]["models"] == ["tiny"]
    shipped = C.validate(yaml.safe_load(open(REPO / "config" / "config.yaml")))
    assert shipped["targets"]["models"] == ["smol"] and shipped["models"]["smol"]["source"] == "gguf"
    micro = yaml.safe_load(open(REPO / "config" / "micro.yaml"))
    merged = copy.deepcopy(cfg)
    for k, v in micro.items():
        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    merged = C.validate(merged)
    assert merged["targets"]["models"] == ["micro"] and merged["models"]["micro"]["source"] == "train"
    # defaults the schema fills in are there after validation
    assert merged["models"]["micro"]["min_keep_per_layer"] >= 1 and merged["ica"]["max_iter"] == 300


def test_defaults_are_filled(cfg):
    C.validate(cfg)
    assert cfg["models"]["tiny"]["min_keep_per_layer"] == 1
    assert cfg["models"]["vicuna7b"]["trust_remote_code"] is False


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("models", "tiny", "calibration", "batch_size"), 0, "models.tiny.calibration.batch_size"),
        (("models", "tiny", "corpus"), "nope", "models.tiny.corpus"),
        (("models", "tiny", "protect_first"), 7, "protect_first + protect_last"),
        (("targets", "methods"), ["c16_bogus"], "targets.methods"),
        (("targets", "ratios"), [120], "targets.ratios"),
        (("targets", "models"), ["llama9"], "targets.models"),
        (("ica", "backend"), "jax", "ica.backend"),
        (("models", "tiny", "num_layers"), 6, "differs from train.num_layers"),
        (
            ("models", "tiny", "architecture"),
            "GPT2LMHeadModel",
            "models.tiny.architecture: 'GPT2LMHeadModel' is not supported",
        ),
        (("models", "tiny", "eval", "ppl_seqlens"), [512], "models.tiny.eval.ppl_seqlens: 512 exceeds"),
        (("targets", "methods"), ["c2000"], "k=2000 components but model tiny has only 1024"),
        (("models", "tiny", "calibration", "n_batches"), 0, "models.tiny.calibration.n_batches"),
    ],
)
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
    cfg["targets"]["methods"] = ["flap_mlp", "flap"]
    with pytest.raises(ValueError, match="targets.methods: flap prunes attention heads.*use flap_mlp"):
        C.check(cfg)


def test_a_comparison_leaves_out_flap_where_a_model_has_one_key_value_head(tmp_path):
    """Gemma 3 270M has one key/value head: its comparison runs every other method and names the
    one it leaves out (the DAG holds no gemma flap job), while smol's keeps flap."""
    proc = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1", "comparison"]
        + ["--configfile", str(REPO / "config" / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = proc.stdout
    assert "results/gemma_r20_flap_mlp/metrics.json" in jobs and "results/smol_r20_flap/metrics.json" in jobs
    assert "results/gemma_r20_flap/" not in jobs
    refused = C.head_pruning_problems(C.load("config/config.yaml"), ["gemma", "smol"], "flap")
    assert len(refused) == 1 and "model gemma (Gemma3ForCausalLM) has one key/value head" in refused[0]


def test_target_grammar():
    t = C.parse_target("tiny_r20_c16_nilearn_bias", ["tiny"])
    assert (t["ratio"], t["k"], t["backend"], t["bias"], t["selector"]) == (0.2, 16, "nilearn", True, "c16_nilearn")
    assert C.parse_target("tiny_dense", ["tiny"])["dense"]
    assert C.parse_target("tiny_r30_flap", ["tiny"])["bias"]
    with pytest.raises(ValueError, match="expected"):
        C.parse_target("tiny_r20_c16_foo", ["tiny"])


def test_lora_is_the_last_suffix_of_any_target():
    t = C.parse_target("tiny_r20_c16_bias_lora", ["tiny"])
    assert (t["method"], t["bias"], t["lora"], t["parent"]) == ("c16_bias", True, True, "tiny_r20_c16_bias")
    d = C.parse_target("tiny_dense_lora", ["tiny"])
    assert (d["dense"], d["method"], d["lora"], d["parent"]) == (True, "dense", True, "tiny_dense")
    # an untuned target's dict is what it was (it is a param of the metrics and export rules)
    assert "lora" not in C.parse_target("tiny_r20_c16", ["tiny"]) and "parent" not in C.parse_target(
        "tiny_dense", ["tiny"]
    )
    assert C.split_lora("c16_lora") == ("c16", True) and C.split_lora("c16") == ("c16", False)
    with pytest.raises(ValueError, match="expected"):
        C.parse_target("tiny_r20_c16_lora_bias", ["tiny"])


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("rank", 0, "config key lora.rank: 0 is less than the minimum of 1"),
        ("lr", 0, "config key lora.lr"),
        ("dtype", "float16", "config key lora.dtype: 'float16' is not one of"),
        ("epochs", 2, "config key lora: Additional properties are not allowed"),
        ("tokens", 100, r"lora.tokens: 100 make no step of lora.batch_size x seq_len = 8 x 128 tokens"),
    ],
)
def test_lora_errors_name_the_key(cfg, key, value, needle):
    cfg["lora"] = {key: value}
    with pytest.raises(ValueError, match=needle):
        C.validate(cfg)


def test_lora_in_the_comparison_is_a_switch_and_in_targets_a_method_suffix(cfg):
    bad = copy.deepcopy(cfg)
    bad["comparison"]["methods"] = ["c16", "c16_lora"]
    with pytest.raises(
        ValueError, match=r"comparison.methods: c16_lora: .* comparison.lora: true; name the method \(c16\)"
    ):
        C.validate(bad)
    bad = copy.deepcopy(cfg)
    bad["comparison"]["lora"] = "yes"
    with pytest.raises(ValueError, match="config key comparison.lora: 'yes' is not of type 'boolean'"):
        C.validate(bad)
    bad = copy.deepcopy(cfg)
    bad["comparison"]["lora"], bad["lora"] = True, {"seq_len": 512}
    with pytest.raises(
        ValueError, match="lora.seq_len: 512 exceeds model tiny's maximum length train.max_position=256"
    ):
        C.validate(bad)
    cfg["targets"]["methods"] = ["c16", "c16_bias_lora", "flap_mlp_lora", "dense_lora"]
    C.validate(cfg)
    assert cfg["lora"]["seed"] is None and cfg["comparison"]["lora"] is False
    s = C.lora_settings({**cfg, "seed": 7}, "tiny")
    assert s["seed"] == 7 and s["dtype"] in ("float32", "bfloat16") and s["lr"] == 0.0003
    assert C.lora_settings({**cfg, "lora": {**cfg["lora"], "seed": 3, "dtype": "float32"}}, "tiny")["seed"] == 3


def test_alias_is_its_base_with_its_own_keys(cfg):
    C.validate(cfg)
    alias, base = cfg["models"]["tiny_langref"], cfg["models"]["tiny"]
    assert alias["base"] == "tiny" and alias["calibration"]["corpus"] == "langref"
    assert base["calibration"]["corpus"] == "stdlib" and base["calibration"]["seed"] == cfg["seed"]
    assert {k: v for k, v in alias["calibration"].items() if k != "corpus"} == {
        k: v for k, v in base["calibration"].items() if k != "corpus"
    }
    assert {k: v for k, v in alias.items() if k not in ("base", "calibration")} == {
        k: v for k, v in base.items() if k not in ("base", "calibration")
    }
    assert C.weights_of(cfg, "tiny_langref") == "tiny" and C.weights_of(cfg, "tiny") == "tiny"
    again = copy.deepcopy(cfg)
    C.validate(again)
    assert again == cfg


@pytest.mark.parametrize(
    "alias, needle",
    [
        ({"base": "nope"}, "models.bad.base: 'nope' is not a key of models"),
        ({"base": "bad"}, "models.bad.base: a model cannot be its own base"),
        ({"base": "tiny_langref"}, "models.bad.base: 'tiny_langref' is itself an alias"),
        ({"base": 3}, "models.bad.base: expected a model slug"),
        ({"base": "tiny", "train": {"steps": 10}}, "models.bad.train: an alias shares the weights of its base 'tiny'"),
        ({"base": "tiny", "corpus": "langref"}, "models.bad.corpus: an alias shares the weights"),
        (
            {"base": "tiny", "calibration": {"corpus": "nope"}},
            "models.bad.calibration.corpus: 'nope' is not a key of corpora",
        ),
        ({"base": "tiny", "calibration": {"n_batches": 0}}, "models.bad.calibration.n_batches"),
    ],
)
def test_alias_errors_name_the_key(cfg, alias, needle):
    cfg["models"]["bad"] = alias
    with pytest.raises(ValueError, match=needle):
        C.validate(cfg)


def _domains_check(cfg):
    from fnprune import domains

    C.validate(cfg)
    domains.check(cfg)


def test_shipped_domains_check(cfg):
    from fnprune import domains

    _domains_check(cfg)
    # the shipped sources are aliases of one model: one table, every source x ratio x method a point
    assert domains.bases(cfg) == ["tiny"]
    assert len(domains.pruned_points(cfg, "tiny")) == len(cfg["domains"]["models"]) * len(
        cfg["domains"]["ratios"]
    ) * len(cfg["domains"]["methods"])


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("domains", "models"), ["tiny", "nope"], "domains.models: 'nope' is not a key of models"),
        (("domains", "corpora"), ["stdlib", "nope"], "domains.corpora: 'nope' is not a key of corpora"),
        (("domains", "methods"), ["c16_bogus"], "domains.methods"),
        (("domains", "ratios"), [0], "domains.ratios"),
        (
            ("corpora", "langref", "fractions"),
            {"train": 0.7, "calib": 0.2, "validation": 0.05, "test": 0.05},
            "corpora.langref: splits the documents of corpora.stdlib .* another fractions",
        ),
        (("corpora", "libdocs", "max_chars"), 900, "corpora.libdocs: splits the documents of corpora.stdlib"),
    ],
)
def test_domains_errors_name_the_key(cfg, path, value, needle):
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=needle):
        _domains_check(cfg)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        (
            "fractions",
            {"train": 0.71, "calib": 0.2, "validation": 0.05, "test": 0.04},
            r"corpora.stdlib_docs and corpora.stdlib_code \(model smol_code calibrates on stdlib_code and is "
            r"evaluated on stdlib_docs's test split\) split the same documents with a different fractions",
        ),
        ("parts", ["modules"], "mix parts 'modules' \\(split by module\\) and \\['docstrings'\\]"),
        ("group_chunks", 4, "a different group_chunks"),
    ],
)
def test_no_model_calibrates_on_the_held_out_text_of_another_domain(key, value, needle):
    """The shipped smol domains (code vs documentation): a file's code and docstrings must share a
    split, or smol_code (calibrated on code) could calibrate on the documentation test files."""
    from fnprune import domains

    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    _domains_check(cfg)  # as shipped: no leak
    cfg["corpora"]["stdlib_code"][key] = value
    with pytest.raises(ValueError, match=needle):
        _domains_check(cfg)
    cfg["domains"]["models"] = ["smol"]  # the alias smol_code is still evaluated on stdlib_docs
    with pytest.raises(ValueError, match="model smol_code calibrates on stdlib_code"):
        domains.check(cfg)


# ---- requested targets: the grammar and impossible values, before any job ------------------------


@pytest.fixture
def micro_cfg():
    base = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    for extra in ("config/paper.yaml", "config/micro.yaml"):
        over = yaml.safe_load(open(extra))
        for key, value in over.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and key == "models" else value
    return C.validate(base)


@pytest.mark.parametrize(
    "target,nearest",
    [
        ("micro_r20_c16_bias_bias", "micro_r20_c16_bias"),
        ("micro_r20_random_bias", "micro_r20_random"),
        ("micro_r20_bias_c16", "micro_r20_c16_bias"),
        ("micor_r20_c16", "micro_r20_c16"),
        ("micro_r20_flap_mlp_m16_bias", "micro_r20_flap_mlp_m16"),
        ("micro_r20_c8_torch_torch", "micro_r20_c8_torch"),
        ("micro_r20_c8_lora_bias", "micro_r20_c8_bias_lora"),
        ("micro_r20_lora_shortgpt", "micro_r20_shortgpt_lora"),
        ("micro_lora_dense", "micro_dense_lora"),
    ],
)
def test_a_target_outside_the_grammar_gets_the_grammar_and_the_nearest_form(micro_cfg, target, nearest):
    models = list(micro_cfg["models"])
    with pytest.raises(ValueError, match="outside the path grammar") as e:
        C.check_target(target, micro_cfg, models)
    assert f"Nearest valid form: {nearest}" in str(e.value) and "Expected: results/{model}_dense" in str(e.value)
    C.check_target(nearest, micro_cfg, models)  # the suggestion itself is valid


@pytest.mark.parametrize(
    "target,match",
    [
        ("micro_r101_c8", r"ratio r101 is outside 1\.\.99"),
        ("micro_r0_random", r"ratio r0 is outside 1\.\.99"),
        ("micro_r20_c99999", r"k = 99999 components exceed the at most 512 tokens .*4 x 128"),
        ("micro_r20_c200", r"k = 200 components exceed the 192 signals of a layer"),
        ("micro_r20_c8_b3", r"_b3 uses more batches than models\.micro\.calibration\.n_batches = 2"),
        (
            "micro_r20_c8_m64",
            r"multiples of 64 \(96-wide layers, 2 prunable\) the ratio 20% cannot be reached: at best 10\.0%",
        ),
        ("micro_r20_c8_m96", r"_m96 .* layers are 96 wide"),
        ("chatglm3_6b_r20_flap", r"fused query_key_value\) does not support; use flap_mlp"),
        ("gemma_r20_flap", r"model gemma \(Gemma3ForCausalLM\) has one key/value head per layer.*use flap_mlp"),
        ("smol_r20_c4000", r"k = 4000 components exceed the 3072 signals"),
        ("micro_r20_c200_lora", r"k = 200 components exceed the 192 signals of a layer"),
        ("gemma_r20_flap_lora", r"model gemma \(Gemma3ForCausalLM\) has one key/value head per layer"),
    ],
)
def test_impossible_values_are_refused_naming_the_value(micro_cfg, target, match):
    with pytest.raises(ValueError, match=match):
        C.check_target(target, micro_cfg, list(micro_cfg["models"]))


def test_possible_targets_pass(micro_cfg):
    models = list(micro_cfg["models"])
    for t in (
        "micro_dense",
        "micro_r20_c8",
        "micro_r20_c8_m32",
        "micro_r20_flap_mlp_m16",
        "micro_r30_c8_b2_hybrid_imp_bias",
        "chatglm3_6b_r20_flap_mlp",
        "smol_r20_c64",
        "vicuna7b_r20_c128",
        "micro_dense_lora",
        "micro_r20_c8_bias_lora",
        "micro_r20_shortgpt_lora",
        "smol_r20_c64_lora",
    ):
        assert C.check_target(t, micro_cfg, models)["model"]
    t = C.check_target("micro_r20_shortgpt_lora", micro_cfg, models)
    assert t["depth"] and t["lora"] and t["parent"] == "micro_r20_shortgpt"


def test_a_lora_window_longer_than_a_trained_model_is_refused_naming_the_key(micro_cfg):
    cfg = {**micro_cfg, "lora": {**micro_cfg["lora"], "seq_len": 256}}
    with pytest.raises(ValueError, match="target 'micro_dense_lora': lora.seq_len: 256 exceeds model micro's maximum"):
        C.check_target("micro_dense_lora", cfg, list(cfg["models"]))
    C.check_target("micro_dense", cfg, list(cfg["models"]))


def test_requested_paths(micro_cfg, tmp_path):
    models = list(micro_cfg["models"])
    C.check_requested_path("results/micro_r20_c8/metrics.json", micro_cfg, models, str(tmp_path))
    C.check_requested_path("results/micro/masks/r20_c8_torch.json", micro_cfg, models, str(tmp_path))
    C.check_requested_path("comparison", micro_cfg, models, str(tmp_path))
    with pytest.raises(
        ValueError, match=r"give it relative to the working directory: results/micro_dense/metrics\.json"
    ):
        C.check_requested_path(str(tmp_path / "results/micro_dense/metrics.json"), micro_cfg, models, str(tmp_path))
    with pytest.raises(ValueError, match="outside the working directory"):
        C.check_requested_path("/elsewhere/results/x", micro_cfg, models, str(tmp_path))
    with pytest.raises(ValueError, match="outside the path grammar"):
        C.check_requested_path("results/nosuch_r20_c16/metrics.json", micro_cfg, models, str(tmp_path))
    with pytest.raises(ValueError, match=r"not 'metrics\.jsn'"):
        C.check_requested_path("results/micro_r20_c8/metrics.jsn", micro_cfg, models, str(tmp_path))


def test_command_line_targets():
    argv = [
        "/venv/bin/snakemake",
        "-s",
        "Snakefile",
        "--cores",
        "2",
        "-n",
        "results/a/metrics.json",
        "--configfile",
        "config/config.yaml",
        "config/micro.yaml",
    ]
    assert C.command_line_targets(argv) == ["results/a/metrics.json"]
    assert C.command_line_targets(["/usr/bin/python", "-m", "pytest", "results/x"]) == []


def test_a_dry_run_refuses_a_bad_target_before_any_job(tmp_path):
    """The real snakemake, a fresh workdir: the error comes at DAG build, and nothing is created."""
    from helpers import snakemake

    proc = snakemake(tmp_path, "-n", "results/micro_r20_random_bias/metrics.json", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Nearest valid form: micro_r20_random" in out, out[-3000:]
    assert "MissingRuleException" not in out and not (tmp_path / "results").exists()


def test_method_options_parse_in_order():
    m = C.parse_method("c16_exact_s3_x5_b2_hybrid_imp_m64_bias")
    assert (
        m["k"],
        m["backend"],
        m["seed"],
        m["runs"],
        m["batches"],
        m["hybrid"],
        m["selection"],
        m["multiple"],
        m["bias"],
    ) == (16, "exact", 3, 5, 2, True, "imp", 64, True)
    assert m["selector"] == "c16_exact_s3_x5_b2_hybrid_imp_m64" and m["ica_dir"] == "exact_c16_s3_x5"
    assert m["needs_stats"]
    plain = C.parse_method("c16")
    assert (plain["selector"], plain["ica_dir"], plain["selection"], plain["needs_stats"]) == (
        "c16_torch",
        "torch_c16",
        "global",
        False,
    )
    assert C.parse_method("c16_zglobal")["needs_stats"] is False
    b = C.parse_method("flap_mlp_m128")
    assert (b["kind"], b["baseline"], b["multiple"], b["bias"], b["selector"]) == (
        "baseline",
        "flap_mlp",
        128,
        True,
        "flap_mlp_m128",
    )
    assert not C.parse_method("random")["needs_stats"]


@pytest.mark.parametrize(
    "method, needle",
    [
        ("c16_x1", "at least 2"),
        ("c0", "k must be at least 1"),
        ("c16_m0", "_m<multiple> must be"),
        ("c16_b0", "at least 1"),
        ("c16_uniform_hybrid", "expected c<k>"),
        ("flap_x5", "expected"),
    ],
)
def test_bad_method_options_are_explained(method, needle):
    with pytest.raises(ValueError, match=needle):
        C.parse_method(method)


def test_method_name_round_trips_and_changes():
    for name in ("c16", "c16_nilearn_s2_x3_b4_hybrid_uniform_m64_bias", "c8_zglobal"):
        assert C.method_name(C.ICA_METHOD.fullmatch(name)) == name
    assert paper.variant("c16_x5_imp_bias", k=8, batches=2) == "c8_x5_b2_imp_bias"


def test_a_pruned_gemma_export_is_refused_at_dry_run_and_a_dense_one_planned(tmp_path):
    """llama.cpp's gemma3 loader gives every layer one MLP width, which a pruned model lacks."""

    def dry(target):
        cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1", target]
        return subprocess.run(
            cmd + ["--configfile", str(REPO / "config" / "config.yaml")], capture_output=True, text=True, timeout=600
        )

    bad = dry("results/gemma_r20_c64/model.f16.gguf")
    assert bad.returncode != 0
    assert "results/gemma_r20_c64/model.f16.gguf: Gemma3ForCausalLM with MLP widths" in bad.stdout + bad.stderr
    assert "llama.cpp's gemma3 loader" in bad.stdout + bad.stderr
    ok = dry("results/gemma_dense/model.f16.gguf")
    assert ok.returncode == 0 and "rule export_gguf" in ok.stdout, ok.stderr[-2000:]
