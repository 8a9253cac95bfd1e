from fnprune import stages

stages.setup(snakemake.log[0])
stages.comparison(
    list(snakemake.input),
    snakemake.output.md,
    snakemake.output.csv,
    snakemake.params.refused,
    snakemake.params.draws,
    snakemake.params.variants,
    snakemake.params.reference,
)
