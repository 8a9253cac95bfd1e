# Physical pruning: remove masked neurons (and heads), optionally compensate biases, save.


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
