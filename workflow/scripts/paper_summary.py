from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
paper.summary(
    snakemake.wildcards.grid,
    snakemake.input.main,
    snakemake.input.ablation,
    list(snakemake.input.figures),
    snakemake.output[0],
    studies_md=snakemake.input.get("studies"),
    domains_md=list(snakemake.input.get("domains", [])),
)
