# Masks: the union of per-batch functional networks thresholded to a ratio, or a baseline's
# (shortgpt's: the blocks of least influence).


rule mask_ica:
    input:
        unpack(mask_ica_inputs),
    output:
        "results/{model}/masks/r{ratio}_{ica_selector}.json",
    log:
        "results/logs/mask/{model}_r{ratio}_{ica_selector}.log",
    params:
        code=CODE["mask_ica"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("mask"),
        source=model_src,
        ratio=ratio_fraction,
        selector=selector_info,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_ica.py"


# The functional-network variants scored inside each layer with Wanda-sp (_hwanda, _core<p>):
# the same inputs as an ICA mask, their own script and code key.
rule mask_fnv:
    input:
        unpack(mask_ica_inputs),
    output:
        "results/{model}/masks/r{ratio}_{fnv_selector}.json",
    log:
        "results/logs/mask/{model}_r{ratio}_{fnv_selector}.log",
    params:
        code=CODE["mask_fnv"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("mask"),
        source=model_src,
        ratio=ratio_fraction,
        selector=selector_info,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_fnv.py"


rule mask_baseline:
    input:
        unpack(mask_baseline_inputs),
    output:
        "results/{model}/masks/r{ratio}_{baseline_selector}.json",
    log:
        "results/logs/mask/{model}_r{ratio}_{baseline_selector}.log",
    params:
        code=CODE["mask_baseline"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("mask"),
        source=model_src,
        ratio=ratio_fraction,
        selector=selector_info,
        seed=draw_seed,
    threads: 1
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_baseline.py"


rule mask_shortgpt:
    input:
        unpack(mask_shortgpt_inputs),
    output:
        "results/{model}/masks/r{ratio}_shortgpt.json",
    log:
        "results/logs/mask/{model}_r{ratio}_shortgpt.log",
    params:
        code=CODE["mask_shortgpt"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("mask"),
        source=model_src,
        ratio=ratio_fraction,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/mask_shortgpt.py"
