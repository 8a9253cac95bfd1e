from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.shortgpt_mask(
    list(snakemake.input.influence),
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.params.ratio,
    snakemake.output[0],
)
