from fnprune import stages

stages.setup(snakemake.log[0])
inp, t = snakemake.input, snakemake.params.target
stages.lora_metrics(
    snakemake.wildcards.target,
    t["model"],
    f"{t['method']}_lora",
    snakemake.params.spec,
    inp.ppl,
    inp.get("lm_eval"),
    snakemake.output[0],
    inp.lora,
    depth=bool(t.get("depth")),
    mask=inp.get("mask"),
    sidecar_dir=None if t["dense"] else inp.lora,
    batches=inp.get("batches"),
    stats_files=list(inp.get("stats", [])),
    base_dir=inp.get("base_dir"),
    seed=snakemake.params.seed,
    torch_threads=snakemake.params.torch_threads,
)
