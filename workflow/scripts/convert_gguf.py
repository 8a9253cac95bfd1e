from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.convert_gguf(snakemake.params.spec, snakemake.output[0], snakemake.wildcards.model)
