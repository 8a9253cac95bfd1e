from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.prune_blocks(
    snakemake.input.mask,
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.params.target,
    snakemake.output[0],
)
