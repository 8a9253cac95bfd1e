from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
sel = snakemake.params.selector
stages.baseline_mask(
    sel["baseline"],
    list(snakemake.input.stats),
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.params.ratio,
    snakemake.params.seed,
    snakemake.output[0],
    multiple=sel["multiple"],
)
