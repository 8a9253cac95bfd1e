# The paper's tables, figures and studies of one grid (config/paper.yaml): results/paper/{grid}/.


rule paper_tables:
    input:
        unpack(paper_table_inputs),
    output:
        main_csv=report(
            "results/paper/{grid}/main_table.csv",
            caption="../report/paper_main_table.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "main", "format": "CSV"},
        ),
        main_md=report(
            "results/paper/{grid}/main_table.md",
            caption="../report/paper_main_table.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "main", "format": "Markdown"},
        ),
        main_tex=report(
            "results/paper/{grid}/main_table.tex",
            caption="../report/paper_main_table.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "main", "format": "LaTeX"},
        ),
        ablation_csv=report(
            "results/paper/{grid}/ablation_table.csv",
            caption="../report/paper_ablation_table.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "ablations", "format": "CSV"},
        ),
        ablation_md=report(
            "results/paper/{grid}/ablation_table.md",
            caption="../report/paper_ablation_table.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "ablations", "format": "Markdown"},
        ),
    log:
        "results/logs/paper/{grid}_tables.log",
    params:
        code=CODE["paper_tables"],
        task_metrics=lookup(dpath="paper/grids/{grid}/task_metrics", within=config),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_tables.py"


# One rule per figure drawn only from metrics files (fnprune.paper.FIGURES, from_metrics).
for _figure in fpaper.METRIC_FIGURES:

    rule:
        name:
            f"paper_{_figure}"
        input:
            paper_figure_metrics(_figure),
        output:
            **figure_outputs(_figure),
        log:
            f"results/logs/paper/{{grid}}_{{model}}_{_figure}.log",
        params:
            code=CODE["paper_figure"],
            figure=_figure,
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
        **figure_outputs("overlap"),
    log:
        "results/logs/paper/{grid}_{model}_overlap.log",
    params:
        code=CODE["paper_overlap"],
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
        **figure_outputs("stability"),
    log:
        "results/logs/paper/{grid}_{model}_stability.log",
    params:
        code=CODE["paper_stability"],
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
        **figure_outputs("seeds"),
        json="results/paper/{grid}/{model}/seeds.json",
    log:
        "results/logs/paper/{grid}_{model}_seeds.log",
    params:
        code=CODE["paper_seeds"],
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
        md=report(
            "results/paper/{grid}/studies.md",
            caption="../report/paper_studies.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "studies", "format": "Markdown"},
        ),
        csv="results/paper/{grid}/studies.csv",
    log:
        "results/logs/paper/{grid}_studies.log",
    params:
        code=CODE["paper_studies"],
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
        report(
            "results/paper/{grid}/report.md",
            caption="../report/paper_summary.rst",
            category="Tables",
            subcategory="{grid}",
            labels={"table": "summary: tables and figures", "format": "Markdown"},
        ),
    log:
        "results/logs/paper/{grid}_summary.log",
    params:
        code=CODE["paper_summary"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/fnprune.yaml"
    script:
        "../scripts/paper_summary.py"
