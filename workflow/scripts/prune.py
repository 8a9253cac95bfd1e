from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.prune(
    snakemake.input.mask,
    snakemake.params.spec,
    snakemake.params.source,
    list(snakemake.input.stats),
    snakemake.params.bias,
    snakemake.params.target,
    snakemake.output[0],
)
