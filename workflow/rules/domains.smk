# Cross-domain calibration (config `domains`): one table per model whose weights the sources share.


rule domain_table:
    input:
        unpack(domain_inputs),
    output:
        md=report(
            "results/domains/{model}_domains.md",
            caption="../report/domains.rst",
            category="Domains",
            labels={"model": "{model}", "table": "perplexity and mask overlap", "format": "Markdown"},
        ),
        csv="results/domains/{model}_domains.csv",
        overlap_csv="results/domains/{model}_domains_overlap.csv",
        png=report(
            "results/domains/{model}_domains.png",
            caption="../report/domains_figure.rst",
            category="Domains",
            labels={"model": "{model}", "figure": "perplexity heatmap", "format": "PNG"},
        ),
    log:
        "results/logs/domains/{model}.log",
    params:
        code=CODE["domain_table"],
        mask_keys=domain_mask_keys,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/domain_table.py"
