# Tables built only from metrics.json files.


rule comparison_table:
    input:
        comparison_metrics,
    output:
        md=report(f"results/{{model}}_{COMPARISON}.md", caption="../report/comparison.rst", category="Tables"),
        csv=f"results/{{model}}_{COMPARISON}.csv",
    log:
        f"results/logs/{COMPARISON}/{{model}}.log",
    params:
        code=CODE["comparison"],
        refused=lambda wc: comparison_methods(wc.model)[1],
        draws=comparison_draws,
        variants=comparison_variants,
        reference=config["comparison"]["reference"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/comparison.py"
