from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
paper.seeds(
    snakemake.input.mask,
    list(snakemake.input.scores),
    list(snakemake.input.seeds),
    snakemake.params.seeds,
    snakemake.wildcards.model,
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.output.json,
)
