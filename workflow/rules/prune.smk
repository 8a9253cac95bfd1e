# Physical pruning: remove masked neurons (and heads), optionally compensate biases, save; or
# remove whole blocks (shortgpt), which saves an ordinary model with fewer layers.


rule prune:
    input:
        unpack(prune_inputs),
    output:
        directory("results/{model}_r{ratio}_{method}/model"),
    log:
        "results/logs/prune/{model}_r{ratio}_{method}.log",
    benchmark:
        "results/benchmarks/prune/{model}_r{ratio}_{method}.tsv"
    params:
        code=CODE["prune"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("prune"),
        source=model_src,
        bias=prune_bias,
        target=prune_target,
    threads: 2
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/prune.py"


# The path of a depth target matches `prune` too: its mask names blocks, not neurons.
ruleorder: prune_blocks > prune


rule prune_blocks:
    input:
        unpack(prune_blocks_inputs),
    output:
        directory("results/{model}_r{ratio}_{depth}/model"),
    log:
        "results/logs/prune/{model}_r{ratio}_{depth}.log",
    benchmark:
        "results/benchmarks/prune/{model}_r{ratio}_{depth}.tsv"
    params:
        code=CODE["prune_blocks"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("prune"),
        source=model_src,
        target=depth_target,
    threads: 2
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/prune_blocks.py"
