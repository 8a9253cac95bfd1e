# Masks: the union of per-batch functional networks thresholded to a ratio, or a baseline's.


rule mask_ica:
    input:
        unpack(lambda w: {"scores": ica_files(w.model, w.backend, w.k, w.nb), "model": model_input(w.model)}),
    output:
        "results/{model}/masks/r{ratio}_c{k}_{backend}{nb}.json",
    log:
        "results/logs/mask/{model}_r{ratio}_c{k}_{backend}{nb}.log",
    params:
        spec=lambda w: mspec(w.model),
        source=lambda w: model_source(w.model),
        ratio=lambda w: int(w.ratio) / 100,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_ica.py"


rule mask_baseline:
    input:
        unpack(lambda w: {"stats": stats_files(w.model), "model": model_input(w.model)}),
    output:
        "results/{model}/masks/r{ratio}_{baseline}.json",
    log:
        "results/logs/mask/{model}_r{ratio}_{baseline}.log",
    params:
        spec=lambda w: mspec(w.model),
        source=lambda w: model_source(w.model),
        ratio=lambda w: int(w.ratio) / 100,
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_baseline.py"
