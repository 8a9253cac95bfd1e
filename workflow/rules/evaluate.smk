# Evaluation of every target (dense or pruned): both perplexity protocols and lm-eval tasks.


rule lm_eval_tasks:
    input:
        test=corpus_split("test"),
        validation=corpus_split("validation"),
    output:
        directory("results/data/{corpus}/lm_eval_tasks"),
    log:
        "results/logs/lm_eval_tasks/{corpus}.log",
    params:
        code=CODE["lm_eval_tasks"],
        seed=config["seed"],
        mc=lambda w: config["corpora"][w.corpus]["mc_task"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/lm_eval_tasks.py"


rule perplexity:
    input:
        unpack(perplexity_inputs),
    output:
        "results/{target}/ppl.json",
    log:
        "results/logs/perplexity/{target}.log",
    benchmark:
        "results/benchmarks/perplexity/{target}.tsv"
    params:
        code=CODE["perplexity"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("perplexity"),
        source=eval_source,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/perplexity.py"


# The same evaluation on another corpus's test split, recording which target and calibration it is
# (fnprune.domains.ppl_fields): the cells of the cross-domain tables.
use rule perplexity as perplexity_domain with:
    input:
        model=eval_model,
        test=corpus_split("test"),
    output:
        "results/{target}/ppl-{corpus}.json",
    log:
        "results/logs/perplexity/{target}_{corpus}.log",
    benchmark:
        "results/benchmarks/perplexity/{target}_{corpus}.tsv"
    params:
        torch_threads=TORCH_THREADS,
        spec=stage_spec("perplexity"),
        source=eval_source,
        fields=domain_ppl_fields,


rule lm_eval:
    input:
        unpack(lm_eval_inputs),
    output:
        summary="results/{target}/lm_eval.json",
        raw="results/{target}/lm_eval_raw.json",
    log:
        "results/logs/lm_eval/{target}.log",
    benchmark:
        "results/benchmarks/lm_eval/{target}.tsv"
    params:
        code=CODE["lm_eval"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("lm_eval"),
        source=eval_source,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=600,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/lm_eval.py"


rule metrics:
    input:
        unpack(metrics_inputs),
    output:
        "results/{target}/metrics.json",
    log:
        "results/logs/metrics/{target}.log",
    params:
        code=CODE["metrics"],
        torch_threads=TORCH_THREADS,
        target=target_info,
        spec=stage_spec("metrics"),
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/metrics.py"


# A depth target's metrics add what its mask decided (kept_layers, block_influence); its path
# matches `metrics` too.
ruleorder: metrics_depth > metrics


rule metrics_depth:
    input:
        unpack(metrics_inputs),
    output:
        "results/{target}/metrics.json",
    wildcard_constraints:
        target=DEPTH_TARGET,
    log:
        "results/logs/metrics/{target}.log",
    params:
        code=CODE["metrics_depth"],
        torch_threads=TORCH_THREADS,
        target=target_info,
        spec=stage_spec("metrics"),
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/metrics_depth.py"


# A _lora target's metrics add the tuning's record (tuned_from, the lora block, its wall time), over
# the depth metrics when its parent removed blocks; its path matches `metrics` too.
ruleorder: metrics_lora > metrics


rule metrics_lora:
    input:
        unpack(lora_metrics_inputs),
    output:
        "results/{target}/metrics.json",
    wildcard_constraints:
        target=LORA_TARGET,
    log:
        "results/logs/metrics/{target}.log",
    params:
        code=CODE["metrics_lora"],
        torch_threads=TORCH_THREADS,
        target=target_info,
        spec=stage_spec("metrics"),
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/metrics_lora.py"


rule summary:
    input:
        dense=dense_metrics,
        pruned="results/{target}/metrics.json",
    output:
        "results/{target}/summary.txt",
    log:
        "results/logs/summary/{target}.log",
    params:
        code=CODE["summary"],
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/summary.py"
