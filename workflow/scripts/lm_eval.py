from fnprune import stages

stages.setup(snakemake.log[0], snakemake.params.torch_threads)
tasks = list(snakemake.input.tasks)
stages.lm_eval(
    snakemake.params.source,
    snakemake.params.spec,
    tasks[0] if tasks else None,
    snakemake.output.summary,
    snakemake.output.raw,
)
