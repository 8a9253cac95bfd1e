from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.perplexity(
    snakemake.params.source,
    snakemake.params.spec,
    snakemake.input.test,
    snakemake.output[0],
    fields=snakemake.params.get("fields"),
)
