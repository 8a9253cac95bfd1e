from fnprune import stages

stages.setup(snakemake.log[0])
inp, t = snakemake.input, snakemake.params.target
stages.depth_metrics(
    snakemake.wildcards.target,
    t["model"],
    t["method"],
    snakemake.params.spec,
    inp.ppl,
    inp.get("lm_eval"),
    snakemake.output[0],
    mask=inp.get("mask"),
    sidecar_dir=inp.get("model"),
    batches=inp.get("batches"),
    stats_files=list(inp.get("stats", [])),
    base_dir=inp.get("base_dir"),
    seed=snakemake.params.seed,
    torch_threads=snakemake.params.torch_threads,
)
