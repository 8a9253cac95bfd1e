from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.init_model(snakemake.input.train, snakemake.params.spec, snakemake.output[0], snakemake.params.seed)
