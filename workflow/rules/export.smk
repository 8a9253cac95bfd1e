# A target's model as GGUF for llama.cpp: per-layer MLP widths and head counts (a pruned model is
# written as llama.cpp's `deci` architecture, the LLaMA graph with per-layer shapes), its
# tokenizer, and the sidecar's provenance as fnprune.* metadata. {gtype}: f32, f16 or q8_0.


rule export_gguf:
    input:
        unpack(export_inputs),
    output:
        "results/{target}/model.{gtype}.gguf",
    log:
        "results/logs/export_gguf/{target}_{gtype}.log",
    benchmark:
        "results/benchmarks/export_gguf/{target}_{gtype}.tsv"
    params:
        code=CODE["export_gguf"],
        torch_threads=TORCH_THREADS,
        spec=stage_spec("prune"),
        source=eval_source,
        target=target_info,
    threads: 1
    resources:
        mem_mb=32000,
        runtime=30,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/export_gguf.py"
