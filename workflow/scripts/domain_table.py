from fnprune import domains
from fnprune.io import setup_logging

setup_logging(snakemake.log[0])
out = snakemake.output
domains.table(
    snakemake.wildcards.model,
    list(snakemake.input.ppl),
    list(snakemake.input.masks),
    snakemake.params.mask_keys,
    out.md,
    out.csv,
    out.overlap_csv,
    out.png,
)
