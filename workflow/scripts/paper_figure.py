from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
paper.metrics_figure(
    snakemake.params.figure,
    list(snakemake.input),
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.ablation_method,
)
