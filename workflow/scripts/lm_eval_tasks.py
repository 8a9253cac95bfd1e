from fnprune import stages

stages.setup(snakemake.log[0])
stages.lm_eval_tasks(
    snakemake.input.test, snakemake.input.validation, snakemake.output[0], snakemake.params.seed, snakemake.params.mc
)
