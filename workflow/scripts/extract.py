from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.extract(
    snakemake.input.batches,
    int(snakemake.wildcards.batch),
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.output.shards,
)
