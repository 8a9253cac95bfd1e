# Text corpora, the embedded model's training, and the calibration batches.


rule corpus:
    input:
        corpus_source,
    output:
        splits=expand("results/data/{{corpus}}/{split}.jsonl", split=SPLITS),
        manifest="results/data/{corpus}/manifest.json",
    log:
        "results/logs/corpus/{corpus}.log",
    params:
        code=CODE["corpus"],
        spec=corpus_spec,
        python=corpus_python,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/corpus.py"


rule train_model:
    input:
        train=model_split("train"),
        validation=model_split("validation"),
    output:
        directory("results/models/{model}"),
    wildcard_constraints:
        model="|".join(TRAINED) or "$^",
    log:
        "results/logs/train/{model}.log",
    benchmark:
        "results/benchmarks/train/{model}.tsv"
    params:
        code=CODE["train"],
        torch_threads=TORCH_THREADS,
        spec=train_spec,
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/train.py"


rule convert_gguf:
    input:
        gguf=gguf_file,
    output:
        directory("results/models/{model}"),
    wildcard_constraints:
        model="|".join(CONVERTED) or "$^",
    log:
        "results/logs/convert/{model}.log",
    benchmark:
        "results/benchmarks/convert/{model}.tsv"
    params:
        code=CODE["convert_gguf"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("convert"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/convert_gguf.py"


# A model of seeded random weights built from an architecture config (source: init): an
# engineering check of the workflow at a model's real size, never a result about LLMs.
rule init_model:
    input:
        train=model_split("train"),
    output:
        directory("results/models/{model}"),
    wildcard_constraints:
        model="|".join(INITIALISED) or "$^",
    log:
        "results/logs/init/{model}.log",
    benchmark:
        "results/benchmarks/init/{model}.tsv"
    params:
        code=CODE["init_model"],
        torch_threads=TORCH_THREADS,
        spec=init_spec,
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/init_model.py"


rule calibration_batches:
    input:
        calib=calibration_split,
    output:
        "results/{model}/calib/batches.json",
    log:
        "results/logs/calib/{model}.log",
    params:
        code=CODE["calibration"],
        spec=calibration_spec,
        seed=lookup(dpath="models/{model}/calibration/seed", within=config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/calibration.py"
