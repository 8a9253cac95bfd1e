# Physical pruning: remove masked neurons (and heads), optionally compensate biases, save.


rule prune:
    input:
        unpack(
            lambda w: {
                "mask": mask_file(w.model, w.ratio, w.method),
                "model": model_input(w.model),
                "stats": stats_files(w.model) if method_info(w)["bias"] else [],
            }
        ),
    output:
        directory("results/{model}_r{ratio}_{method}/model"),
    log:
        "results/logs/prune/{model}_r{ratio}_{method}.log",
    benchmark:
        "results/benchmarks/prune/{model}_r{ratio}_{method}.tsv"
    params:
        spec=lambda w: mspec(w.model),
        source=lambda w: model_source(w.model),
        bias=lambda w: method_info(w)["bias"],
        target=lambda w: f"{w.model}_r{w.ratio}_{w.method}",
    threads: 2
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/prune.py"
