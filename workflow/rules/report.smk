# Tables built only from metrics.json files.


rule comparison_table:
    input:
        comparison_metrics,
    output:
        md=report("results/{model}_comparison.md", caption="../report/comparison.rst", category="Tables"),
        csv="results/{model}_comparison.csv",
    log:
        "results/logs/comparison/{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/comparison.py"


# The paper's tables and ablation figures of one grid (config/paper.yaml): results/paper/{grid}/.


rule paper_tables:
    input:
        unpack(paper_table_inputs),
    output:
        main_csv=report("results/paper/{grid}/main_table.csv", caption="../report/paper_main_table.rst",
                        category="Tables", subcategory="{grid}", labels={"table": "main", "format": "CSV"}),
        main_md=report("results/paper/{grid}/main_table.md", caption="../report/paper_main_table.rst",
                       category="Tables", subcategory="{grid}", labels={"table": "main", "format": "Markdown"}),
        main_tex=report("results/paper/{grid}/main_table.tex", caption="../report/paper_main_table.rst",
                        category="Tables", subcategory="{grid}", labels={"table": "main", "format": "LaTeX"}),
        ablation_csv=report("results/paper/{grid}/ablation_table.csv",
                            caption="../report/paper_ablation_table.rst", category="Tables", subcategory="{grid}",
                            labels={"table": "ablations", "format": "CSV"}),
        ablation_md=report("results/paper/{grid}/ablation_table.md",
                           caption="../report/paper_ablation_table.rst", category="Tables", subcategory="{grid}",
                           labels={"table": "ablations", "format": "Markdown"}),
    log:
        "results/logs/paper/{grid}_tables.log",
    params:
        task_metrics=lookup(dpath="paper/grids/{grid}/task_metrics", within=config),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_tables.py"


rule paper_components:
    input:
        paper_figure_metrics("components"),
    output:
        png=report("results/paper/{grid}/{model}/components.png", caption="../report/paper_components.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "number of components", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/components.pdf", caption="../report/paper_components.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "number of components", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_components.log",
    params:
        figure="components",
        ablation_method=lookup(dpath="paper/grids/{grid}/ablation_method", within=config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_figure.py"


rule paper_calibration:
    input:
        paper_figure_metrics("calibration"),
    output:
        png=report("results/paper/{grid}/{model}/calibration.png", caption="../report/paper_calibration.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "calibration size", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/calibration.pdf", caption="../report/paper_calibration.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "calibration size", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_calibration.log",
    params:
        figure="calibration",
        ablation_method=lookup(dpath="paper/grids/{grid}/ablation_method", within=config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_figure.py"


rule paper_threshold:
    input:
        paper_figure_metrics("threshold"),
    output:
        png=report("results/paper/{grid}/{model}/threshold.png", caption="../report/paper_threshold.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "threshold vs ratio", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/threshold.pdf", caption="../report/paper_threshold.rst",
                   category="Ablations", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "threshold vs ratio", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_threshold.log",
    params:
        figure="threshold",
        ablation_method=lookup(dpath="paper/grids/{grid}/ablation_method", within=config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_figure.py"


rule paper_kept_per_layer:
    input:
        paper_figure_metrics("kept_per_layer"),
    output:
        png=report("results/paper/{grid}/{model}/kept_per_layer.png", caption="../report/paper_kept_per_layer.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "kept neurons per layer", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/kept_per_layer.pdf", caption="../report/paper_kept_per_layer.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "kept neurons per layer", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_kept_per_layer.log",
    params:
        figure="kept_per_layer",
        ablation_method=lookup(dpath="paper/grids/{grid}/ablation_method", within=config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_figure.py"


rule paper_overlap:
    input:
        paper_overlap_masks,
    output:
        png=report("results/paper/{grid}/{model}/overlap.png", caption="../report/paper_overlap.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "mask overlap", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/overlap.pdf", caption="../report/paper_overlap.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "mask overlap", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_overlap.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_overlap.py"


rule paper_stability:
    input:
        unpack(paper_stability_inputs),
    output:
        png=report("results/paper/{grid}/{model}/stability.png", caption="../report/paper_stability.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "mask stability across batches", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/stability.pdf", caption="../report/paper_stability.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "mask stability across batches", "format": "PDF"}),
    log:
        "results/logs/paper/{grid}_{model}_stability.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_stability.py"


rule paper_seeds:
    input:
        unpack(paper_seeds_inputs),
    output:
        png=report("results/paper/{grid}/{model}/seeds.png", caption="../report/paper_seeds.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "seeds vs data", "format": "PNG"}),
        pdf=report("results/paper/{grid}/{model}/seeds.pdf", caption="../report/paper_seeds.rst",
                   category="Masks", subcategory="{grid}",
                   labels={"model": "{model}", "figure": "seeds vs data", "format": "PDF"}),
        json="results/paper/{grid}/{model}/seeds.json",
    log:
        "results/logs/paper/{grid}_{model}_seeds.log",
    params:
        seeds=paper_stability_seeds,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_seeds.py"


# Studies beyond the paper (paper.grids.{grid}.studies): one table per study.


rule paper_studies:
    input:
        unpack(paper_studies_inputs),
    output:
        md=report("results/paper/{grid}/studies.md", caption="../report/paper_studies.rst", category="Tables",
                  subcategory="{grid}", labels={"table": "studies", "format": "Markdown"}),
        csv="results/paper/{grid}/studies.csv",
    log:
        "results/logs/paper/{grid}_studies.log",
    params:
        task_metrics=lookup(dpath="paper/grids/{grid}/task_metrics", within=config),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_studies.py"


rule paper_summary:
    input:
        unpack(paper_summary_inputs),
    output:
        report("results/paper/{grid}/report.md", caption="../report/paper_summary.rst", category="Tables",
               subcategory="{grid}", labels={"table": "summary: tables and figures", "format": "Markdown"}),
    log:
        "results/logs/paper/{grid}_summary.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_summary.py"


# Cross-domain calibration (config `domains`): one table per model whose weights the sources share.


rule domain_table:
    input:
        unpack(domain_inputs),
    output:
        md=report("results/domains/{model}_domains.md", caption="../report/domains.rst", category="Domains",
                  labels={"model": "{model}", "table": "perplexity and mask overlap", "format": "Markdown"}),
        csv="results/domains/{model}_domains.csv",
        overlap_csv="results/domains/{model}_domains_overlap.csv",
        png=report("results/domains/{model}_domains.png", caption="../report/domains_figure.rst",
                   category="Domains", labels={"model": "{model}", "figure": "perplexity heatmap", "format": "PNG"}),
    log:
        "results/logs/domains/{model}.log",
    params:
        mask_keys=domain_mask_keys,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/domain_table.py"
