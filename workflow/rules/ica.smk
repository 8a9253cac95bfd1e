# Per-batch spatial CanICA of every layer: per-signal max |z| over the k maps.


rule ica:
    input:
        shards="results/{model}/acts/b{batch}",
    output:
        "results/{model}/ica/{backend}_c{k}/b{batch}.npz",
    log:
        "results/logs/ica/{model}_{backend}_c{k}_b{batch}.log",
    benchmark:
        "results/benchmarks/ica/{model}_{backend}_c{k}_b{batch}.tsv"
    params:
        n_layers=n_layers,
        ica=config["ica"],
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/ica.py"
