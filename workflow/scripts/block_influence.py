from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.block_influence(
    snakemake.input.batches,
    int(snakemake.wildcards.batch),
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.output[0],
)
