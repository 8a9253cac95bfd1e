# The calibration passes over each batch, two jobs because their outputs live differently:
# the activation shards (large, temporary: a new ICA variant after they were removed extracts
# again) and the batch's statistics (small, kept, built once: re-extracting shards never
# rewrites them, so nothing built from them goes out of date). A third pass, for shortgpt only,
# records each block's influence (ShortGPT's 1 - cos(input, output), summed over tokens).


rule extract:
    input:
        unpack(extract_inputs),
    output:
        shards=temp(directory("results/{model}/acts/b{batch}")),
    log:
        "results/logs/extract/{model}_b{batch}.log",
    benchmark:
        "results/benchmarks/extract/{model}_b{batch}.tsv"
    params:
        code=CODE["extract"],
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


rule calibration_stats:
    input:
        unpack(extract_inputs),
    output:
        "results/{model}/acts/b{batch}.stats.npz",
    log:
        "results/logs/calibration_stats/{model}_b{batch}.log",
    benchmark:
        "results/benchmarks/calibration_stats/{model}_b{batch}.tsv"
    params:
        code=CODE["calibration_stats"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("stats"),
        source=model_src,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/calibration_stats.py"


rule block_influence:
    input:
        unpack(extract_inputs),
    output:
        "results/{model}/influence/b{batch}.npz",
    log:
        "results/logs/block_influence/{model}_b{batch}.log",
    benchmark:
        "results/benchmarks/block_influence/{model}_b{batch}.tsv"
    params:
        code=CODE["block_influence"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("stats"),
        source=model_src,
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/block_influence.py"
