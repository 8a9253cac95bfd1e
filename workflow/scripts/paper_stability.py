from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
paper.stability(
    snakemake.input.mask,
    list(snakemake.input.scores),
    snakemake.wildcards.model,
    snakemake.output.png,
    snakemake.output.pdf,
)
