from fnprune import stages

stages.setup(snakemake.log[0])
stages.summary(snakemake.input.dense, snakemake.input.pruned, snakemake.output[0])
