from pathlib import Path

from fnprune import stages

stages.setup(snakemake.log[0], snakemake.config["torch_threads"])
stages.corpus(snakemake.params.spec, str(Path(snakemake.output.manifest).parent))
