from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
paper.tables(
    list(snakemake.input.main),
    list(snakemake.input.ablation),
    snakemake.params.task_metrics,
    dict(snakemake.output.items()),
)
