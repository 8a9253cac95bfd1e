from fnprune import stages

stages.setup(snakemake.log[0], snakemake.config["torch_threads"])
stages.comparison(list(snakemake.input), snakemake.output.md, snakemake.output.csv)
