from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
t = snakemake.params.target
stages.export_gguf(
    snakemake.wildcards.target,
    snakemake.params.spec,
    snakemake.params.source,
    None if t["dense"] else snakemake.params.source,
    snakemake.output[0],
    snakemake.wildcards.gtype,
)
