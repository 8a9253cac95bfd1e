# Helper functions of the workflow: config access, the path grammar and input functions.
import os
import platform
import re
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
    baseline_selector=fconfig.BASELINE_SELECTOR,
    depth=fconfig.DEPTH_SELECTOR,
    method=fconfig.METHOD_PATTERN,
    target=rf"{UNTUNED_TARGET}(?:{fconfig.LORA_SUFFIX})?",
    grid="|".join(config["paper"]["grids"]),
    gtype="|".join(fconfig.GGUF_EXPORT_TYPES),


def mspec(model):
    return config["models"][model]


def corpus_python(wildcards):
    """Embedded corpora are read from the running Python's own documentation and source files."""
    spec = config["corpora"][wildcards.corpus]
    return platform.python_version() if spec["source"] == "embedded" else None


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


def gguf_file(wildcards):
    """The GGUF file a ``source: gguf`` model is converted from (``path``, ``file`` of ``package``,
    or every one of its ``parts``)."""
    import fnprune.ggufsource as fgguf

    return [str(f) for f in fgguf.resolve_files(mspec(wildcards.model), f"models.{wildcards.model}")]


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
    return [f"results/{m}_comparison.md" for m in models]


def comparison_methods(model):
    """The comparison's methods a model can run, and each one it cannot with the reason (flap on a
    fused-qkv model or on one key/value head): the table names what it leaves out."""
    run, refused = [], []
    for meth in config["comparison"]["methods"]:
        why = fconfig.method_refusals(config, [model], meth)
        (refused if why else run).append(f"{meth}: {why[0]}" if why else meth)
    return run, refused


def comparison_metrics(wildcards):
    """Dense, and every method x ratio of the comparison; a random method on each of the model's
    draws (models.<m>.draws, or the first comparison.draws[method]), a deterministic one
    (magnitude) once; then the variants' methods on each of their draws. With comparison.lora,
    dense_lora and every method's _lora twin of the first draw."""
    c = config["comparison"]
    out = [f"results/{wildcards.model}_dense/metrics.json"]
    out += draw_targets(wildcards.model, comparison_methods(wildcards.model)[0], c["draws"])
    if c["lora"]:
        out.append(f"results/{wildcards.model}_dense_lora/metrics.json")
        out += [
            f"results/{target_name(wildcards.model, r, meth)}_lora/metrics.json"
            for r in c["ratios"]
            for meth in comparison_methods(wildcards.model)[0]
        ]
    for name, v in c["variants"].items():
        if v["of"] == wildcards.model:
            out += draw_targets(name, v["methods"])
    return out


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


def comparison_draws(wildcards):
    """Draw alias slug -> (model, draw) for the comparison's tables across draws."""
    return {m: [wildcards.model, d] for d, m in enumerate(fconfig.draws_of(config, wildcards.model)) if d}


def comparison_variants(wildcards):
    """Each draw of a variant of the compared model (comparison.variants) -> the model's draw it
    is paired with, and the variant's name (its methods are labelled <method>@<variant>)."""
    out = {}
    for name, v in config["comparison"]["variants"].items():
        if v["of"] == wildcards.model:
            mine = fconfig.draws_of(config, wildcards.model)
            for d, m in enumerate(fconfig.draws_of(config, name)):
                out[m] = [mine[d], name]
    return out


def dense_metrics(wildcards):
    """The dense model's metrics beside a pruned target's (its summary compares the two)."""
    return f"results/{target_info(wildcards)['model']}_dense/metrics.json"


def eval_model(wildcards):
    """The model a target evaluates: its pruned (or tuned) directory, or the base model for dense."""
    t = target_info(wildcards)
    if t["dense"] and not t.get("lora"):
        return model_input(t["model"])
    return [f"results/{wildcards.target}/model"]


def export_inputs(wildcards):
    """A GGUF export's model; what llama.cpp's loader for the architecture cannot hold (per-layer
    widths of a pruned model, bias compensation's biases, a block pattern it fixes) is refused here,
    before any job. A depth target (shortgpt) has the source's widths in fewer blocks."""
    import fnprune.ggufwrite as fgguf_write

    t = target_info(wildcards)
    arch = mspec(t["model"])["architecture"]
    depth = bool(t.get("depth"))
    why = fgguf_write.export_refusal(arch, pruned=not t["dense"] and not depth, bias=bool(t.get("bias")))
    if depth and not why:
        why = fgguf_write.block_removal_export_refusal(arch)
    if why:
        raise ValueError(f"results/{wildcards.target}/model.{wildcards.gtype}.gguf: {why}")
    return {"model": eval_model(wildcards)}


def eval_source(wildcards):
    t = target_info(wildcards)
    return model_source(t["model"]) if t["dense"] and not t.get("lora") else f"results/{wildcards.target}/model"


def lm_eval_tasks_dir(wildcards):
    """The generated embedded task directory, when the model's tasks include fnprune's own."""
    t = target_info(wildcards)
    tasks = mspec(t["model"])["eval"]["lm_eval_tasks"]
    if any(x.startswith("fnprune_") for x in tasks):
        return [f"results/data/{corpus_of(t['model'])}/lm_eval_tasks"]
    return []


def metrics_inputs(wildcards):
    t = target_info(wildcards)
    m = t["model"]
    inp = {"ppl": f"results/{wildcards.target}/ppl.json"}
    if mspec(m)["eval"]["lm_eval_tasks"]:
        inp["lm_eval"] = f"results/{wildcards.target}/lm_eval.json"
    if mspec(m)["source"] in BUILT_SOURCES:
        inp["base_dir"] = trained_dir(weights(m))
    if not t["dense"]:
        inp["batches"] = f"results/{m}/calib/batches.json"
        inp["mask"] = mask_file(m, t["ratio_pct"], t["method"])
        inp["model"] = f"results/{wildcards.target}/model"
        inp.update(stats_inputs(m, t["needs_stats"] or t["bias"]))
    return inp


def lora_metrics_inputs(wildcards):
    """:func:`metrics_inputs` of a _lora target, its model as ``lora`` (read for the sidecar)."""
    inp = metrics_inputs(wildcards)
    inp.pop("model", None)
    return {**inp, "lora": f"results/{wildcards.target}/model"}


def lora_inputs(wildcards):
    """The model a _lora target tunes (its parent's: pruned, or the base for dense) and the train
    split of the model's calibration corpus; never its validation or test split."""
    corpus = mspec(model_of(wildcards))["calibration"]["corpus"]
    return {"model": eval_model(wildcards), "train": split_file(corpus, "train")}


def lora_settings(wildcards):
    """The lora section as the job's model runs it (seed and dtype resolved)."""
    return fconfig.lora_settings(config, model_of(wildcards))


def lora_target(wildcards):
    """The target a lora job makes (its ``target`` wildcard is the parent's)."""
    return wildcards.target + fconfig.LORA_SUFFIX


def model_of(wildcards):
    """The model slug of a job: its ``model`` wildcard, or the model of its ``target``."""
    return target_info(wildcards)["model"] if "target" in wildcards.keys() else wildcards.model


def gpus_of_model(wildcards):
    """GPUs a model's heavy rules ask for (resources gpu; the SLURM profile turns it into --gpus)."""
    return mspec(model_of(wildcards))["gpus"]


def stage_spec(stage):
    """Params function: the keys of the job's model that decide ``stage``'s output (fnprune.config.STAGE_KEYS)."""

    def params(wildcards):
        return fconfig.spec_for(mspec(model_of(wildcards)), stage)

    return params


ICA_PARAMS = {k: config["ica"][k] for k in fconfig.ICA_OUTPUT_KEYS}


def ica_params(wildcards):
    """The ica section with the model's own ica keys over it (models.<m>.ica)."""
    return {**ICA_PARAMS, **mspec(wildcards.model).get("ica", {})}


TORCH_THREADS = config["torch_threads"]


def model_src(wildcards):
    return model_source(model_of(wildcards))


def train_spec(wildcards):
    return mspec(wildcards.model)["train"]


def init_spec(wildcards):
    """The resolved architecture of a ``source: init`` model (fnprune.seeded.resolve_init)."""
    return mspec(wildcards.model)["init"]


def calibration_spec(wildcards):
    """What decides the draw of calibration texts into batches (the seed is a param of its own)."""
    c = mspec(wildcards.model)["calibration"]
    return {k: c[k] for k in ("batch_size", "n_batches", "corpus")}


def corpus_source(wildcards):
    """The local file of a ``source: text`` corpus, an input of its corpus job (so editing it re-runs it)."""
    c = config["corpora"][wildcards.corpus]
    return [c["path"]] if c["source"] == "text" else []


def corpus_spec(wildcards):
    """The keys of a corpus that decide its splits: all but ``mc_task``, which decides only its
    embedded tasks (the lm_eval_tasks job's params)."""
    return {k: v for k, v in config["corpora"][wildcards.corpus].items() if k != "mc_task"}


def n_layers(wildcards):
    return mspec(wildcards.model)["num_layers"]


def ratio_fraction(wildcards):
    return int(wildcards.ratio) / 100


def model_split(split):
    """Input function: a split file of the corpus of the job's model."""

    def inputs(wildcards):
        return split_file(corpus_of(model_of(wildcards)), split)

    return inputs


def calibration_split(wildcards):
    """The calib split the model's calibration batches are drawn from (models.*.calibration.corpus)."""
    return split_file(mspec(wildcards.model)["calibration"]["corpus"], "calib")


def corpus_split(split):
    """Input function: a split file of the job's ``corpus``."""

    def inputs(wildcards):
        return split_file(wildcards.corpus, split)

    return inputs


def extract_inputs(wildcards):
    return {"batches": f"results/{wildcards.model}/calib/batches.json", "model": model_input(wildcards.model)}


def selector_info(wildcards):
    """The parsed mask selector of a mask job (ICA or baseline), see fnprune.config.parse_method."""
    sel = wildcards.ica_selector if "ica_selector" in wildcards.keys() else wildcards.baseline_selector
    return fconfig.parse_method(sel, BACKEND)


def mask_ica_inputs(wildcards):
    s = selector_info(wildcards)
    return {
        "scores": ica_files(wildcards.model, s["ica_dir"], s["batches"]),
        "model": model_input(wildcards.model),
        **stats_inputs(wildcards.model, s["needs_stats"]),
    }


def mask_baseline_inputs(wildcards):
    s = selector_info(wildcards)
    return {"model": model_input(wildcards.model), **stats_inputs(wildcards.model, s["needs_stats"])}


def ica_seed(wildcards):
    """The ICA job's seed: ``_s<seed>`` of its directory, else the config's ``seed`` plus the
    model's draw (0 but on the aliases of ``models.<m>.draws``)."""
    m = re.search(r"_s(\d+)", wildcards.icav)
    return int(m[1]) if m else config["seed"] + mspec(wildcards.model)["draw"]


def draw_seed(wildcards):
    """random's seed: the config's ``seed`` plus the model's draw."""
    return config["seed"] + mspec(wildcards.model)["draw"]


def ica_runs(wildcards):
    """FastICA runs of a consensus ICA job (``_x<runs>``), 1 for plain CanICA."""
    m = re.search(r"_x(\d+)", wildcards.icav)
    return int(m[1]) if m else 1


def prune_inputs(wildcards):
    w = wildcards
    return {
        "mask": mask_file(w.model, w.ratio, w.method),
        "model": model_input(w.model),
        **stats_inputs(w.model, method_info(w)["bias"]),
    }


def influence_files(model):
    """The block influence files of ``model`` (its ``block_influence`` jobs), one per calibration batch."""
    return [f"results/{model}/influence/b{b}.npz" for b in batch_ids(model)]


def mask_shortgpt_inputs(wildcards):
    """shortgpt's mask reads the block influence of every batch; a model whose blocks fnprune cannot
    remove (ChatGLM3) is refused here, before any job."""
    why = fconfig.block_removal_problems(config, [wildcards.model], "shortgpt")
    if why:
        raise ValueError(f"results/{wildcards.model}/masks/r{wildcards.ratio}_shortgpt.json: {why[0]}")
    return {"influence": influence_files(wildcards.model), "model": model_input(wildcards.model)}


def prune_blocks_inputs(wildcards):
    return {"mask": mask_file(wildcards.model, wildcards.ratio, wildcards.depth), "model": model_input(wildcards.model)}


def depth_target(wildcards):
    return f"{wildcards.model}_r{wildcards.ratio}_{wildcards.depth}"


def prune_bias(wildcards):
    return method_info(wildcards)["bias"]


def prune_target(wildcards):
    return f"{wildcards.model}_r{wildcards.ratio}_{wildcards.method}"


def perplexity_inputs(wildcards):
    return {"model": eval_model(wildcards), "test": split_file(corpus_of(model_of(wildcards)), "test")}


def lm_eval_inputs(wildcards):
    return {"model": eval_model(wildcards), "tasks": lm_eval_tasks_dir(wildcards)}


def paper_metrics_files(targets):
    return [f"results/{target_name(t.model, t.ratio, t.method)}/metrics.json" for t in targets]


def paper_table_inputs(wildcards):
    """The metrics of a paper grid's main table and of its ablations."""
    return {
        "main": paper_metrics_files(fpaper.main_targets(config, wildcards.grid)),
        "ablation": paper_metrics_files(fpaper.ablation_targets(config, wildcards.grid)),
    }


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


def paper_figure_metrics(figure):
    """Input function of one figure of a grid's model (fnprune.paper.METRIC_FIGURES): its metrics files."""

    def inputs(wildcards):
        return paper_metrics_files(fpaper.figure_targets(config, wildcards.grid, wildcards.model, figure))

    return inputs


def paper_overlap_masks(wildcards):
    """One mask JSON per distinct mask of a grid's methods at its focus ratio."""
    return [
        mask_file(t.model, t.ratio, t.method) for t in fpaper.overlap_masks(config, wildcards.grid, wildcards.model)
    ]


def paper_stability_inputs(wildcards):
    """The ablation method's mask at the focus ratio and the ICA scores of every calibration batch."""
    t, k, backend = fpaper.stability_target(config, wildcards.grid, wildcards.model)
    return {"mask": mask_file(t.model, t.ratio, t.method), "scores": ica_files(t.model, f"{backend}_c{k}")}


def paper_figures(wildcards):
    """The PNG of every figure of every model of a grid (each job writes its PDF beside it)."""
    models = config["paper"]["grids"][wildcards.grid]["models"]
    return [
        f"results/paper/{wildcards.grid}/{m}/{fig}.png"
        for m in models
        for fig in fpaper.figures_of(config, wildcards.grid)
    ]


def paper_studies_inputs(wildcards):
    """Metrics of every study of a grid, one named input per study."""
    g = config["paper"]["grids"][wildcards.grid]
    return {study: paper_metrics_files(fpaper.study_targets(config, wildcards.grid, study)) for study in g["studies"]}


def paper_summary_inputs(wildcards):
    inp = {
        "main": f"results/paper/{wildcards.grid}/main_table.md",
        "ablation": f"results/paper/{wildcards.grid}/ablation_table.md",
        "figures": paper_figures(wildcards),
    }
    if config["paper"]["grids"][wildcards.grid]["studies"]:
        inp["studies"] = f"results/paper/{wildcards.grid}/studies.md"
    if config["paper"]["grids"][wildcards.grid]["domains"]:
        grid_models = config["paper"]["grids"][wildcards.grid]["models"]
        inp["domains"] = [f"results/domains/{b}_domains.md" for b in fdomains.bases_of(config, grid_models)]
    return inp


def paper_seeds_inputs(wildcards):
    """The ablation method's focus mask, its ICA scores of every batch, and batch 0 under each extra seed."""
    t, _, _ = fpaper.stability_target(config, wildcards.grid, wildcards.model)
    own, seeded = fpaper.seeds_ica_dirs(config, wildcards.grid)
    return {
        "mask": mask_file(t.model, t.ratio, t.method),
        "scores": ica_files(t.model, own),
        "seeds": [f"results/{t.model}/ica/{d}/b0.npz" for d in seeded],
    }


def domain_tables(wildcards):
    """One cross-domain table per model whose weights the ``domains`` sources share."""
    return [f"results/domains/{b}_domains.md" for b in fdomains.bases(config)]


def domain_inputs(wildcards):
    """Every ``ppl-{corpus}.json`` of a domain table (the dense model's first) and every source's mask."""
    d, points = config["domains"], fdomains.pruned_points(config, wildcards.model)
    targets = [target_name(wildcards.model, None, "dense")] + [target_name(*p) for p in points]
    return {
        "ppl": [f"results/{t}/ppl-{c}.json" for t in targets for c in d["corpora"]],
        "masks": [mask_file(*p) for p in points],
    }


def domain_mask_keys(wildcards):
    """The source, ratio and method of each mask of :func:`domain_inputs`, in the same order."""
    return [{"source": m, "ratio": r, "method": meth} for m, r, meth in fdomains.pruned_points(config, wildcards.model)]


def domain_ppl_fields(wildcards):
    """What a ``ppl-{corpus}.json`` records about its target and calibration besides the results."""
    return fdomains.ppl_fields(config, wildcards.target, wildcards.corpus, BACKEND)


def paper_stability_seeds(wildcards):
    return fpaper.stability_seeds(config, wildcards.grid)
