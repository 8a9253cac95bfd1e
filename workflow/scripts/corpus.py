from pathlib import Path

from fnprune import stages

stages.setup(snakemake.log[0])
stages.corpus(snakemake.params.spec, str(Path(snakemake.output.manifest).parent))
