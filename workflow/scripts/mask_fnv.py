from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
stages.fn_variant_mask(
    list(snakemake.input.scores),
    snakemake.params.spec,
    snakemake.params.source,
    snakemake.params.ratio,
    snakemake.params.selector,
    snakemake.output[0],
    stats_files=list(snakemake.input.stats),
)
