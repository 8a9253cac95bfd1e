# The workflow's configuration and path grammar: the config checked against its schema, the code
# keys, the models and wildcard constraints, the paths of targets and intermediates, and the named
# targets' lists. Input functions are in inputs.smk, params functions in params.smk.
import os
import sys

import fnprune.codekeys as fcodekeys
import fnprune.config as fconfig
import fnprune.domains as fdomains
import fnprune.paper as fpaper
import fnprune.replicates as freplicates

fconfig.validate(config, workflow.source_path("../schemas/config.schema.yaml"))
fpaper.check_grids(config)
fdomains.check(config)

# The code of every script (the script and the fnprune definitions it reaches), one key a script,
# given as the param `code` of the rules that run it, since Snakemake does not track what a
# script imports.
CODE = fcodekeys.workflow_keys(
    os.path.join(workflow.basedir, "workflow", "scripts"),
    cache=os.path.join(".snakemake", "fnprune-codekeys.json"),
)

MODELS = list(config["models"])
WEIGHT_OWNERS = [m for m in MODELS if fconfig.weights_of(config, m) == m]
# Models whose weights the workflow builds into results/models/{model}: trained, or converted from GGUF.
TRAINED = [m for m in WEIGHT_OWNERS if config["models"][m]["source"] == "train"]
CONVERTED = [m for m in WEIGHT_OWNERS if config["models"][m]["source"] == "gguf"]
# Models of seeded random weights built from an architecture config (an engineering check).
INITIALISED = [m for m in WEIGHT_OWNERS if config["models"][m]["source"] == "init"]
BUILT_SOURCES = (*fconfig.BUILT_SOURCES, *fconfig.SEEDED_SOURCES)
SPLITS = ["train", "calib", "validation", "test"]
BACKEND = config["ica"]["backend"]
# The comparison tables' name: results/{model}_{COMPARISON}.md
COMPARISON = config["comparison"]["name"]

# Every target named on the command line is checked against the path grammar and the config
# before any job runs: outside the grammar, the grammar and the nearest valid form; values no job
# could honour (ratio, k, _b, flap on fused qkv, _m), the value and why.
# Snakemake hands the Snakefile no list of targets while parsing: they are read from the command line.
for _requested in fconfig.command_line_targets(sys.argv):
    fconfig.check_requested_path(_requested, config, MODELS, os.getcwd(), BACKEND)

# Targets that remove whole blocks (shortgpt): their pruning and metrics rules are their own.
DEPTH_TARGET = rf"(?:{'|'.join(MODELS)})_r\d+_(?:{fconfig.DEPTH_SELECTOR})"
# A target before LoRA, and one tuned by it (_lora, the grammar's last suffix): its model is the
# lora rule's, and its metrics rule is its own.
UNTUNED_TARGET = rf"(?:{'|'.join(MODELS)})_(?:dense|r\d+_{fconfig.METHOD_PATTERN})"
LORA_TARGET = UNTUNED_TARGET + fconfig.LORA_SUFFIX


wildcard_constraints:
    model="|".join(MODELS),
    corpus="|".join(config["corpora"]),
    ratio=r"\d+",
    k=r"\d+",
    batch=r"\d+",
    backend="torch|exact|nilearn",
    icav=fconfig.ICA_VARIANT,
    ica_selector=fconfig.ICA_SELECTOR,
    fnv_selector=fconfig.FNV_SELECTOR,
    baseline_selector=fconfig.BASELINE_SELECTOR,
    depth=fconfig.DEPTH_SELECTOR,
    method=fconfig.METHOD_PATTERN,
    target=rf"{UNTUNED_TARGET}(?:{fconfig.LORA_SUFFIX})?",
    grid="|".join(config["paper"]["grids"]),
    gtype="|".join(fconfig.GGUF_EXPORT_TYPES),


def mspec(model):
    return config["models"][model]


def corpus_of(model):
    return mspec(model)["corpus"]


def split_file(corpus, split):
    return f"results/data/{corpus}/{split}.jsonl"


def trained_dir(model):
    return f"results/models/{model}"


def weights(model):
    """The model whose weights ``model`` loads: the base of an alias (models.*.base), else itself."""
    return fconfig.weights_of(config, model)


def model_input(model):
    """The model directory as a DAG input when the workflow builds it (trained, converted from GGUF
    or seeded), else nothing (an alias: its base's)."""
    return [trained_dir(weights(model))] if mspec(model)["source"] in BUILT_SOURCES else []


def model_source(model):
    """What the stages load: the built directory, a local directory or a hub id (an alias: its base's)."""
    return trained_dir(weights(model)) if mspec(model)["source"] in BUILT_SOURCES else mspec(model)["hf_id"]


def batch_ids(model):
    return range(mspec(model)["calibration"]["n_batches"])


def stats_inputs(model, needed=True):
    """The calibration statistics files of ``model`` (its ``calibration_stats`` jobs), when ``needed``."""
    return {"stats": [f"results/{model}/acts/b{b}.stats.npz" for b in batch_ids(model)] if needed else []}


def ica_files(model, ica_dir, batches=None):
    """ICA score files (``results/{model}/ica/{ica_dir}/``) of every batch, or of the first n."""
    ids = list(batch_ids(model))
    if batches:
        if batches > len(ids):
            raise ValueError(
                f"mask from {batches} batches (_b{batches}), but models.{model}.calibration.n_batches is {len(ids)}"
            )
        ids = ids[:batches]
    return [f"results/{model}/ica/{ica_dir}/b{b}.npz" for b in ids]


def target_info(wildcards):
    return fconfig.parse_target(wildcards.target, MODELS, BACKEND)


def method_info(wildcards):
    return fconfig.parse_method(wildcards.method, BACKEND)


def mask_file(model, ratio, method):
    return f"results/{model}/masks/r{ratio}_{fconfig.parse_method(method, BACKEND)['selector']}.json"


def target_name(model, ratio, method):
    """A target's name; ``dense`` and ``dense_lora`` have no ratio."""
    return f"{model}_{method}" if fconfig.split_lora(method)[0] == "dense" else f"{model}_r{ratio}_{method}"


def all_targets(wildcards):
    t = config["targets"]
    out = [f"results/{m}_dense/metrics.json" for m in t["models"]]
    out += [
        f"results/{target_name(m, r, meth)}/metrics.json"
        for m in t["models"]
        for r in t["ratios"]
        for meth in t["methods"]
    ]
    return list(dict.fromkeys(out))


def comparison_tables(wildcards):
    models = config["comparison"]["models"] or config["targets"]["models"]
    return [f"results/{m}_{COMPARISON}.md" for m in models]


def comparison_methods(model):
    """The comparison's methods a model can run, and each one it cannot with the reason (flap on a
    fused-qkv model or on one key/value head): the table names what it leaves out."""
    run, refused = [], []
    for meth in config["comparison"]["methods"]:
        why = fconfig.method_refusals(config, [model], meth)
        (refused if why else run).append(f"{meth}: {why[0]}" if why else meth)
    return run, refused


def draw_targets(model, methods, limits=None):
    """metrics.json of each method at each comparison ratio: a random method on each of the model's
    draws (the first ``limits[method]`` where given), a deterministic one on draw 0."""
    draws = fconfig.draws_of(config, model)
    return [
        f"results/{target_name(m, r, meth)}/metrics.json"
        for r in config["comparison"]["ratios"]
        for meth in methods
        for m in (draws[: (limits or {}).get(meth, len(draws))] if freplicates.is_random(meth) else draws[:1])
    ]


def model_of(wildcards):
    """The model slug of a job: its ``model`` wildcard, or the model of its ``target``."""
    return target_info(wildcards)["model"] if "target" in wildcards.keys() else wildcards.model


def influence_files(model):
    """The block influence files of ``model`` (its ``block_influence`` jobs), one per calibration batch."""
    return [f"results/{model}/influence/b{b}.npz" for b in batch_ids(model)]


def paper_metrics_files(targets):
    return [f"results/{target_name(t.model, t.ratio, t.method)}/metrics.json" for t in targets]


def figure_outputs(figure):
    """The PNG and PDF of one figure of a grid's model (fnprune.paper.FIGURES), as report items."""
    spec = fpaper.FIGURE[figure]
    return {
        fmt: report(
            f"results/paper/{{grid}}/{{model}}/{figure}.{fmt}",
            caption=f"../report/paper_{figure}.rst",
            category=spec.category,
            subcategory="{grid}",
            labels={"model": "{model}", "figure": spec.label, "format": fmt.upper()},
        )
        for fmt in ("png", "pdf")
    }


def domain_tables(wildcards):
    """One cross-domain table per model whose weights the ``domains`` sources share."""
    return [f"results/domains/{b}_domains.md" for b in fdomains.bases(config)]
