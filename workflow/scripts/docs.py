from fnprune import docs, stages

stages.setup(snakemake.log[0])
docs.build(
    list(snakemake.input.pages),
    snakemake.input.schema,
    snakemake.params.configuration,
    snakemake.params.figure,
    snakemake.params.panels,
)
