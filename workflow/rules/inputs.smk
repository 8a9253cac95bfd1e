# Input functions: the files a job reads, from its wildcards and the config. A function that refuses
# a target no job could make (a GGUF export llama.cpp cannot load, shortgpt on a model whose blocks
# fnprune cannot remove) raises here, while the DAG is built.
import glob


def gguf_file(wildcards):
    """The GGUF file a ``source: gguf`` model is converted from (``path``, ``file`` of ``package``,
    or every one of its ``parts``)."""
    import fnprune.ggufsource as fgguf

    return [str(f) for f in fgguf.resolve_files(mspec(wildcards.model), f"models.{wildcards.model}")]


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


def corpus_source(wildcards):
    """The local file of a ``source: text`` corpus, an input of its corpus job (so editing it re-runs it)."""
    c = config["corpora"][wildcards.corpus]
    return [c["path"]] if c["source"] == "text" else []


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


def prune_inputs(wildcards):
    w = wildcards
    return {
        "mask": mask_file(w.model, w.ratio, w.method),
        "model": model_input(w.model),
        **stats_inputs(w.model, method_info(w)["bias"]),
    }


def mask_shortgpt_inputs(wildcards):
    """shortgpt's mask reads the block influence of every batch; a model whose blocks fnprune cannot
    remove (ChatGLM3) is refused here, before any job."""
    why = fconfig.block_removal_problems(config, [wildcards.model], "shortgpt")
    if why:
        raise ValueError(f"results/{wildcards.model}/masks/r{wildcards.ratio}_shortgpt.json: {why[0]}")
    return {"influence": influence_files(wildcards.model), "model": model_input(wildcards.model)}


def prune_blocks_inputs(wildcards):
    return {"mask": mask_file(wildcards.model, wildcards.ratio, wildcards.depth), "model": model_input(wildcards.model)}


def perplexity_inputs(wildcards):
    return {"model": eval_model(wildcards), "test": split_file(corpus_of(model_of(wildcards)), "test")}


def lm_eval_inputs(wildcards):
    return {"model": eval_model(wildcards), "tasks": lm_eval_tasks_dir(wildcards)}


def paper_table_inputs(wildcards):
    """The metrics of a paper grid's main table and of its ablations."""
    return {
        "main": paper_metrics_files(fpaper.main_targets(config, wildcards.grid)),
        "ablation": paper_metrics_files(fpaper.ablation_targets(config, wildcards.grid)),
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


def domain_inputs(wildcards):
    """Every ``ppl-{corpus}.json`` of a domain table (the dense model's first) and every source's mask."""
    d, points = config["domains"], fdomains.pruned_points(config, wildcards.model)
    targets = [target_name(wildcards.model, None, "dense")] + [target_name(*p) for p in points]
    return {
        "ppl": [f"results/{t}/ppl-{c}.json" for t in targets for c in d["corpora"]],
        "masks": [mask_file(*p) for p in points],
    }


# The pages whose generated blocks the docs rule rewrites (docs/configuration.md is written whole).
DOC_PAGES = ["README.md"] + sorted(p for p in glob.glob("docs/*.md") if not p.endswith("configuration.md"))
