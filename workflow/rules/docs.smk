# The documentation's generated parts: docs/configuration.md from the schema's descriptions, the
# results figure, and the numbers in README.md and docs/*.md from the results and benchmark files
# present (fnprune.docs). The rule has no output, so `snakemake docs` runs it every time, and no
# result among its inputs, so it never schedules an experiment: a block whose file is missing
# reads "Not yet run".


rule docs:
    input:
        schema="workflow/schemas/config.schema.yaml",
        pages=DOC_PAGES,
    log:
        "results/logs/docs.log",
    localrule: True
    params:
        code=CODE["docs"],
        configuration="docs/configuration.md",
        figure="docs/figures/results.png",
        panels=DOC_FIGURE_PANELS,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/docs.py"
