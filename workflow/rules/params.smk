# Params (and resources) functions: exactly what a job reads from the config, so that Snakemake re-runs
# a job when one of them changes and never otherwise (see fnprune.config.STAGE_KEYS).
import platform
import re


def corpus_python(wildcards):
    """Embedded corpora are read from the running Python's own documentation and source files."""
    spec = config["corpora"][wildcards.corpus]
    return platform.python_version() if spec["source"] == "embedded" else None


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


def eval_source(wildcards):
    t = target_info(wildcards)
    return model_source(t["model"]) if t["dense"] and not t.get("lora") else f"results/{wildcards.target}/model"


def lora_settings(wildcards):
    """The lora section as the job's model runs it (seed and dtype resolved)."""
    return fconfig.lora_settings(config, model_of(wildcards))


def lora_target(wildcards):
    """The target a lora job makes (its ``target`` wildcard is the parent's)."""
    return wildcards.target + fconfig.LORA_SUFFIX


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


def corpus_spec(wildcards):
    """The keys of a corpus that decide its splits: all but ``mc_task``, which decides only its
    embedded tasks (the lm_eval_tasks job's params)."""
    return {k: v for k, v in config["corpora"][wildcards.corpus].items() if k != "mc_task"}


def n_layers(wildcards):
    return mspec(wildcards.model)["num_layers"]


def ratio_fraction(wildcards):
    return int(wildcards.ratio) / 100


def selector_info(wildcards):
    """The parsed mask selector of a mask job (ICA, variant or baseline), see fnprune.config.parse_method."""
    for name in ("ica_selector", "fnv_selector", "baseline_selector"):
        if name in wildcards.keys():
            return fconfig.parse_method(getattr(wildcards, name), BACKEND)
    raise KeyError(f"no mask selector among the wildcards {list(wildcards.keys())}")


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


def depth_target(wildcards):
    return f"{wildcards.model}_r{wildcards.ratio}_{wildcards.depth}"


def prune_bias(wildcards):
    return method_info(wildcards)["bias"]


def prune_target(wildcards):
    return f"{wildcards.model}_r{wildcards.ratio}_{wildcards.method}"


def domain_mask_keys(wildcards):
    """The source, ratio and method of each mask of :func:`domain_inputs`, in the same order."""
    return [{"source": m, "ratio": r, "method": meth} for m, r, meth in fdomains.pruned_points(config, wildcards.model)]


def domain_ppl_fields(wildcards):
    """What a ``ppl-{corpus}.json`` records about its target and calibration besides the results."""
    return fdomains.ppl_fields(config, wildcards.target, wildcards.corpus, BACKEND)


def paper_stability_seeds(wildcards):
    return fpaper.stability_seeds(config, wildcards.grid)


# The results figure of the docs rule: one panel per embedded model, drawn from its replicates'
# table (intervals over calibration draws) when present, else its one-draw comparison (over windows).
DOC_FIGURE_PANELS = [
    ["SmolLM2-135M (smol)", ["results/smolr_comparison.md", "results/smol_comparison.md"]],
    ["Gemma 3 270M (gemma)", ["results/gemmar_comparison.md", "results/gemma_comparison.md"]],
]
