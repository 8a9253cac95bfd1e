# fnprune: structured pruning of LLMs by preserving functional networks (arXiv 2508.05239).
# This file only wires: configuration, schema validation, the rule modules and named targets.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"
configfile: "config/paper.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/params.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/ica.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/lora.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/paper.smk"
include: "workflow/rules/domains.smk"
include: "workflow/rules/docs.smk"


rule all:
    input:
        all_targets,
    default_target: True


rule comparison:
    input:
        comparison_tables,


rule paper:
    input:
        "results/paper/paper/report.md",


rule paper_tiny:
    input:
        "results/paper/paper_tiny/report.md",


rule paper_full:
    input:
        "results/paper/paper_full/report.md",


rule domains:
    input:
        domain_tables,
