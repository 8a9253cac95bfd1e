from fnprune import stages

w = snakemake.wildcards
stages.setup(snakemake.log[0], snakemake.config["torch_threads"])
stages.ica_mask(list(snakemake.input.scores), snakemake.params.spec, snakemake.params.source,
                snakemake.params.ratio, int(w.k), w.backend, snakemake.output[0],
                method=f"c{w.k}_{w.backend}{w.nb}")
