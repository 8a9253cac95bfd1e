from fnprune import stages

stages.setup(snakemake.log[0])
stages.calibration_batches(snakemake.input.calib, snakemake.params.spec, snakemake.params.seed, snakemake.output[0])
