from fnprune import stages

stages.setup(snakemake.log[0], snakemake.threads)
stages.ica_mask(list(snakemake.input.scores), snakemake.params.spec, snakemake.params.source,
                snakemake.params.ratio, int(snakemake.wildcards.k), snakemake.wildcards.backend,
                snakemake.output[0])
