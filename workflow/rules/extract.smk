# The calibration pass: one hooked forward pass per batch writes per-layer activation shards
# (large, temporary) and the batch's statistics (small, kept) for every later stage.


rule extract:
    input:
        unpack(extract_inputs),
    output:
        shards=temp(directory("results/{model}/acts/b{batch}")),
        stats="results/{model}/acts/b{batch}.stats.npz",
    log:
        "results/logs/extract/{model}_b{batch}.log",
    benchmark:
        "results/benchmarks/extract/{model}_b{batch}.tsv"
    params:
        torch_threads=TORCH_THREADS,
        spec=stage_spec("extract"),
        source=model_src,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/extract.py"
