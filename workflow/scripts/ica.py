from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.ica(
    snakemake.input.shards,
    snakemake.params.n_layers,
    int(snakemake.wildcards.k),
    snakemake.wildcards.backend,
    snakemake.params.ica,
    snakemake.params.seed,
    snakemake.output[0],
    runs=snakemake.params.runs,
)
