from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.lora(
    snakemake.params.source,
    snakemake.params.spec,
    snakemake.input.train,
    snakemake.params.settings,
    snakemake.params.tuned,
    snakemake.wildcards.target,
    snakemake.output[0],
)
