# Per-batch spatial CanICA of every layer: per-signal max |z| over the k maps.
# {icav}: "" (the config's seed), _s<seed> (another ICA seed), _x<runs> (consensus of several runs).


rule ica:
    input:
        shards="results/{model}/acts/b{batch}",
    output:
        "results/{model}/ica/{backend}_c{k}{icav}/b{batch}.npz",
    log:
        "results/logs/ica/{model}_{backend}_c{k}{icav}_b{batch}.log",
    benchmark:
        "results/benchmarks/ica/{model}_{backend}_c{k}{icav}_b{batch}.tsv"
    params:
        code=CODE["ica"],
        torch_threads=TORCH_THREADS,
        n_layers=n_layers,
        ica=ica_params,
        seed=ica_seed,
        runs=ica_runs,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/ica.py"
