from fnprune import paper
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
studies = {name: list(files) for name, files in snakemake.input.items()}
paper.studies(studies, snakemake.params.task_metrics, snakemake.output.md, snakemake.output.csv)
