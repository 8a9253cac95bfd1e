from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.train(
    snakemake.input.train, snakemake.input.validation, snakemake.params.spec, snakemake.output[0], snakemake.params.seed
)
