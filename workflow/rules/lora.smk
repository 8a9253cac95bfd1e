# LoRA recovery (_lora targets): a target's model (the base model for dense) tuned on the train split
# of its calibration corpus and merged into its weights; every evaluation reads it like a pruned model.


rule lora:
    input:
        unpack(lora_inputs),
    output:
        directory("results/{target}_lora/model"),
    wildcard_constraints:
        target=UNTUNED_TARGET,
    log:
        "results/logs/lora/{target}.log",
    benchmark:
        "results/benchmarks/lora/{target}.tsv"
    params:
        code=CODE["lora"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("lora"),
        source=eval_source,
        settings=lora_settings,
        tuned=lora_target,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=gpus_of_model,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/lora.py"
