"""The documentation: the README's front door, the generated configuration reference, and the
docs target's blocks (rendered from the files present, "Not yet run" without them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fnprune import docs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    # CI runs the README's test command (make test), after make lint
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)


def test_configuration_md_matches_the_schema():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == docs.configuration_markdown(schema), (
        "docs/configuration.md is out of date: run `snakemake --cores 1 docs` and commit it"
    )


def test_configuration_md_lists_every_schema_key():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    text = docs.configuration_markdown(schema)
    for key in schema["properties"]:
        assert f"## `{key}`" in text
    for key in ("models.<model>.calibration.n_batches", "corpora.<corpus>.mc_task.n_items", "lora.rank", "ica.solver"):
        assert f"| `{key}` |" in text


def test_every_block_of_the_pages_is_known():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = [m["name"] for p in pages for m in docs.MARK.finditer(p.read_text())]
    assert names and set(names) <= set(docs.BLOCKS)
    assert {"beyond", "recovery"} <= set(names)  # ready for the lead's results


COMPARISON = """# smolr comparison

## Perplexity, paired over windows

| model | ratio | protocol | method | PPL | x dense [95% CI] | x best [95% CI] |
| --- | --- | --- | --- | ---: | ---: | ---: |
| smolr | 0.20 | flap_token_ppl@128 | wanda_sp | **33.12** | 1.304 [1.263, 1.346] | best |

## Across calibration draws

Prose about draws.

| model | ratio | measure | method | draws | x dense or - dense (points) [95% CI over draws] | SD |
| --- | --- | --- | --- | ---: | ---: | ---: |
| smolr | 0.20 | flap_token_ppl@128 | wanda_sp | 5 | 1.305 [1.300, 1.310] | 0.003 |
| smolr | 0.20 | flap_token_ppl@128 | c64 | 5 | 2.384 [2.196, 2.587] | 0.066 |
| smolr | 0.20 | fnprune_mc acc | c64 | 5 | -12.0 [-14.0, -10.0] | 1.0 |

|  | c64 | wanda_sp |
| --- | ---: | ---: |
| c64 |  | > |
"""

PAGE = "intro\n<!-- docs:t -->\nstale\n<!-- /docs -->\noutro\n"


def test_blocks_render_from_the_files_present_and_say_not_yet_run_otherwise(tmp_path):
    blocks = {"t": docs.Block("results/x_comparison.md", "snakemake comparison", "Across calibration draws")}
    missing = docs.refresh_page(PAGE, tmp_path, "2026-01-01", "Test CPU", blocks)
    assert "*Not yet run: `snakemake comparison` (writes `results/x_comparison.md`).*" in missing
    assert missing.startswith("intro\n<!-- docs:t -->\n") and missing.endswith("<!-- /docs -->\noutro\n")

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x_comparison.md").write_text(COMPARISON)
    text = docs.refresh_page(PAGE, tmp_path, "2026-01-01", "Test CPU", blocks)
    assert "stale" not in text and "Prose about draws." in text
    assert "*model smolr, ratio 0.20*" in text  # constant columns stated once
    assert "\n| method | draws |" not in text  # measure varies, so it stays
    assert "| measure | method | draws |" in text
    assert "copied here by `snakemake docs` on 2026-01-01 on Test CPU" in text
    assert docs.refresh_page(text, tmp_path, "2026-01-01", "Test CPU", blocks) == text  # idempotent

    first = {"t": docs.Block("results/x_comparison.md", "c", "Across calibration draws", first_table=True)}
    text = docs.refresh_page(PAGE, tmp_path, "2026-01-01", "Test CPU", first)
    assert "Prose about draws." not in text and "| c64 |  | > |" not in text and "| c64 | 5 |" in text


def test_an_unknown_block_is_an_error(tmp_path):
    try:
        docs.refresh_page("<!-- docs:nope -->\n<!-- /docs -->\n", tmp_path, "d", "c", {})
    except KeyError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("unknown block accepted")


def test_perplexity_points_prefer_draws_and_fall_back_to_windows():
    pts = docs.perplexity_points(COMPARISON)
    assert ("c64", 20.0, 2.384, 2.196, 2.587) in pts and len(pts) == 2  # the accuracy row is not perplexity
    one_draw = COMPARISON.split("## Across")[0]
    assert docs.perplexity_points(one_draw) == [("wanda_sp", 20.0, 1.304, 1.263, 1.346)]


def test_results_figure_draws_what_is_present(tmp_path):
    (tmp_path / "a.md").write_text(COMPARISON)
    png = tmp_path / "fig.png"
    drawn = docs.results_figure([("A", [tmp_path / "missing.md", tmp_path / "a.md"]), ("B", [tmp_path / "no.md"])], png)
    assert drawn == [str(tmp_path / "a.md")] and png.stat().st_size > 0
