"""The documentation's generated parts: numbers from results files, the configuration from the schema.

Pages under ``docs/`` are prose written by hand with generated blocks between markers::

    <!-- docs:smolr-draws -->
    ... written by `snakemake docs` ...
    <!-- /docs -->

:data:`BLOCKS` names what each block shows: a file the workflow or a benchmark writes (a section
of a comparison table, a measured benchmark output) and the command that writes it.
:func:`refresh_page` rewrites every block of a page from the files present; a block whose file
is missing says so with the command to run, so a fresh clone renders without results. Each block
records its source, the source's date, the command, and the date and CPU of the docs run.
:func:`configuration_markdown` renders every key of the config schema (``docs/configuration.md``).
:func:`results_figure` draws perplexity against ratio per method for each comparison present.

Only files are read: the docs target never asks the DAG for a result.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import write_text

MARK = re.compile(r"(<!-- docs:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /docs -->)", re.S)

# Columns that hold one value over a whole section of a comparison table (one model, ratio,
# measure): stated once above the table instead of repeated on every row.
CONSTANT_COLUMNS = ("model", "ratio", "measure", "protocol")

REPLICATES = "snakemake --cores 2 comparison --configfile config/replicates.yaml"
REPLICATES_GEMMA = "snakemake --cores 2 results/gemmar_comparison.md --configfile config/replicates_gemma.yaml"
LLAMACPP = (
    "make llamacpp && python benchmarks/llamacpp_check.py --dense results/models/smol --pruned "
    "results/smol_r20_c64/model results/smol_r20_c64_m64/model --test results/data/stdlib/test.jsonl"
)


@dataclass(frozen=True)
class Block:
    """One generated block: ``source`` (relative to the repository root), the ``command`` that
    writes it and, for a Markdown source, the ``## `` heading of the section shown (None: the
    whole file; a text source is shown as it is, in a code block). ``first_table``: only the
    section's first table, without the prose and matrices around it."""

    source: str
    command: str
    section: str | None = None
    first_table: bool = False


BLOCKS: dict[str, Block] = {
    # smol at 20% over 5 calibration draws (config/replicates.yaml); the README's headline table
    "headline": Block("results/smolr_comparison.md", REPLICATES, "Across calibration draws", first_table=True),
    "smolr-draws": Block("results/smolr_comparison.md", REPLICATES, "Across calibration draws"),
    "smolr-reference": Block("results/smolr_comparison.md", REPLICATES, "Against c64, across draws"),
    "smolr-windows": Block("results/smolr_comparison.md", REPLICATES, "Perplexity, paired over windows"),
    # Gemma 3 270M at 20% over 3 draws
    "gemmar-draws": Block("results/gemmar_comparison.md", REPLICATES_GEMMA, "Across calibration draws"),
    "gemmar-reference": Block("results/gemmar_comparison.md", REPLICATES_GEMMA, "Against c64, across draws"),
    # one draw at 10/20/30% (config/config.yaml's comparison)
    "smol-comparison": Block(
        "results/smol_comparison.md", "snakemake --cores 2 comparison", "Perplexity, paired over windows"
    ),
    "gemma-comparison": Block(
        "results/gemma_comparison.md",
        "snakemake --cores 2 results/gemma_comparison.md --configfile config/replicates.yaml",
        "Perplexity, paired over windows",
    ),
    "smol-paper-comparison": Block(
        "results/smol_paper_comparison.md",
        "snakemake --cores 2 results/smol_paper_comparison.md",
        "Perplexity, paired over windows",
    ),
    "tiny-comparison": Block(
        "results/tiny_comparison.md", "snakemake --cores 2 comparison --configfile config/tiny.yaml"
    ),
    "paper-studies": Block("results/paper/paper/studies.md", "snakemake --cores 2 paper"),
    "domains-smol": Block("results/domains/smol_domains.md", "snakemake --cores 2 domains"),
    # beyond the paper: functional-network variants and LoRA recovery, over smolr's draws
    "beyond": Block(
        "results/smolr_beyond.md",
        "snakemake --cores 2 comparison --configfile config/beyond.yaml",
        "Across calibration draws",
    ),
    "beyond-reference": Block(
        "results/smolr_beyond.md",
        "snakemake --cores 2 comparison --configfile config/beyond.yaml",
        "Against wanda_sp, across draws",
    ),
    "recovery": Block(
        "results/smolr_recovery.md",
        "snakemake --cores 2 comparison --configfile config/recovery.yaml",
        "Recovery with LoRA",
    ),
    "recovery-gemma": Block(
        "results/gemmar_recovery.md",
        "snakemake --cores 2 comparison --configfile config/recovery_gemma.yaml",
        "Recovery with LoRA",
    ),
    # measured by benchmarks/ (see benchmarks/README.md)
    "llamacpp-speed": Block("benchmarks/measured/llamacpp_smol_cpu.txt", LLAMACPP),
    "isa-check": Block("benchmarks/measured/isa_check_smolr.txt", "python benchmarks/isa_check.py"),
    "lmeval-throughput": Block(
        "benchmarks/measured/lmeval_throughput_smol_cpu.txt", "python benchmarks/lmeval_throughput.py"
    ),
    "mc-shared-context": Block(
        "benchmarks/measured/mc_shared_context_smol.txt", "python benchmarks/mc_shared_context.py"
    ),
    "pruned-speed": Block("benchmarks/measured/pruned_speed_smol.txt", "python benchmarks/pruned_speed.py"),
    "canica-authors": Block(
        "benchmarks/measured/canica_authors_planted_cpu_v2.txt", "python benchmarks/canica_authors.py"
    ),
    "canica-gpu": Block("benchmarks/measured/canica_gpu_h200.txt", "bash benchmarks/gpu_check.sh"),
}


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what Python's platform module says."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _compact_table(lines: list[str]) -> list[str]:
    """A Markdown table without its :data:`CONSTANT_COLUMNS` that hold one value on every row; those
    values are stated in a line above it."""
    header, rows = _split_row(lines[0]), [_split_row(r) for r in lines[2:]]
    drop = [
        i
        for i, h in enumerate(header)
        if h in CONSTANT_COLUMNS and rows and len({r[i] for r in rows if i < len(r)}) == 1
    ]
    if not drop or len(drop) == len(header):
        return lines
    keep = [i for i in range(len(header)) if i not in drop]
    note = ", ".join(f"{header[i]} {rows[0][i]}" for i in drop)
    out = [f"*{note}*", ""]
    out.append("| " + " | ".join(header[i] for i in keep) + " |")
    out.append("| " + " | ".join(_split_row(lines[1])[i] for i in keep) + " |")
    out += ["| " + " | ".join(r[i] if i < len(r) else "" for i in keep) + " |" for r in rows]
    return out


def compact_tables(text: str) -> str:
    """Every Markdown table of ``text`` through :func:`_compact_table`."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += _compact_table(lines[i:j])
            i = j
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def first_table(text: str) -> str:
    """The first Markdown table of ``text``, with the italic note :func:`compact_tables` put above it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return text
    end = next((j for j in range(start, len(lines)) if not lines[j].startswith("|")), len(lines))
    if start >= 2 and lines[start - 2].startswith("*") and not lines[start - 1].strip():
        start -= 2
    return "\n".join(lines[start:end])


def markdown_section(text: str, heading: str | None) -> str | None:
    """The body of the ``## heading`` section of a Markdown text (None when it has none); the whole
    text without its ``# `` title when ``heading`` is None. Headings inside are demoted below the
    page's own (``##`` -> ``####``)."""
    if heading is None:
        body = re.sub(r"\A# .*\n", "", text)
    else:
        m = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        if m is None:
            return None
        body = m[1]
    return re.sub(r"^(#{2,3}) ", r"\1## ", body, flags=re.M).strip()


def render_block(block: Block, root: str | Path, today: str, cpu: str) -> str:
    """The Markdown of one block: its content and where it came from, or "Not yet run"."""
    src = Path(root) / block.source
    where = f" (section \u201c{block.section}\u201d)" if block.section else ""
    if not src.is_file():
        return f"*Not yet run: `{block.command}` (writes `{block.source}`).*\n"
    text = src.read_text()
    if src.suffix == ".md":
        body = markdown_section(text, block.section)
        if body is None:
            return f"*Not yet run: `{block.command}` (`{block.source}` has no section \u201c{block.section}\u201d).*\n"
        body = compact_tables(body)
        if block.first_table:
            body = first_table(body)
    else:
        body = "```\n" + text.rstrip() + "\n```"
    written = _dt.datetime.fromtimestamp(src.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d")
    return (
        f"{body}\n\n<sub>From `{block.source}`{where}, written {written} by `{block.command}`; "
        f"copied here by `snakemake docs` on {today} on {cpu}.</sub>\n"
    )


def refresh_page(text: str, root: str | Path, today: str, cpu: str, blocks: Mapping[str, Block] = BLOCKS) -> str:
    """``text`` with every generated block rewritten from the files under ``root``; an unknown
    block name is an error naming it."""

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in blocks:
            raise KeyError(f"unknown docs block {name!r}; known: {', '.join(sorted(blocks))}")
        return m[1] + render_block(blocks[name], root, today, cpu) + m[4]

    return MARK.sub(sub, text)


def refresh_pages(pages: Sequence[str | Path], root: str | Path = ".", today: str | None = None) -> list[str]:
    """Rewrite the generated blocks of every page in place; the names of the blocks left "not yet run"."""
    today = today or _dt.date.today().isoformat()
    cpu = cpu_model()
    missing = []
    for page in pages:
        text = Path(page).read_text()
        new = refresh_page(text, root, today, cpu)
        missing += [m["name"] for m in MARK.finditer(new) if "*Not yet run:" in m["body"]]
        if new != text:
            write_text(page, new)
    return missing


# --- the configuration reference -------------------------------------------------------------


def _type(spec: Mapping) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    if "oneOf" in spec:
        return " or ".join(_type(s) for s in spec["oneOf"])
    t = spec.get("type", "object" if "properties" in spec or "$ref" in spec else "")
    return " or ".join(t) if isinstance(t, list) else t


def _default(spec: Mapping) -> str:
    if "default" not in spec:
        return "required" if spec.get("_required") else ""
    return "`" + json.dumps(spec["default"]) + "`"


def _resolve(spec: Mapping, defs: Mapping) -> dict:
    if "$ref" in spec:
        target = defs[spec["$ref"].rsplit("/", 1)[-1]]
        return {**target, **{k: v for k, v in spec.items() if k != "$ref"}}
    return dict(spec)


def _rows(prefix: str, spec: Mapping, defs: Mapping) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of ``spec`` and, depth first, of every key below it."""
    spec = _resolve(spec, defs)
    out = [(prefix, _type(spec), _default(spec), spec.get("description", ""))]
    required = set(spec.get("required", []))
    for key, sub in spec.get("properties", {}).items():
        out += _rows(f"{prefix}.{key}", {**sub, "_required": key in required}, defs)
    extra = spec.get("additionalProperties")
    if isinstance(extra, Mapping) and ("$ref" in extra or "properties" in extra):
        placeholder = {"models": "<model>", "corpora": "<corpus>", "grids": "<grid>"}.get(
            prefix.rsplit(".", 1)[-1], "<name>"
        )
        out += _rows(f"{prefix}.{placeholder}", extra, defs)
    return out


def configuration_markdown(schema: Mapping) -> str:
    """Every key of the config schema, one table per top-level section: key, type, default and
    the schema's description (a key without one is described by its parent)."""
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    lines = [
        "# Configuration reference",
        "",
        "<!-- Written by `snakemake docs` (fnprune.docs.configuration_markdown) from",
        "     workflow/schemas/config.schema.yaml: edit the schema's descriptions, not this file. -->",
        "",
        "`config/config.yaml` says what to run; every key below is checked against",
        "`workflow/schemas/config.schema.yaml` before any job, and the error names the key. A",
        "`--configfile` merges over it (`config/replicates.yaml`, `config/tiny.yaml`, ...). How the",
        "keys are used: [running](running.md), [models](models.md), [evaluation](evaluation.md).",
        "",
    ]
    for key, sub in schema.get("properties", {}).items():
        rows = _rows(key, {**sub, "_required": key in required}, defs)
        lines += [f"## `{key}`", ""] + ([rows[0][3], ""] if len(rows) > 1 and rows[0][3] else [])
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for k, t, d, desc in rows[1:] or rows:
            desc = desc.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{k}` | {t.replace('|', '/') if '`' not in t else t} | {d} | {desc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_configuration(schema_path: str | Path, out: str | Path) -> None:
    write_text(out, configuration_markdown(yaml.safe_load(Path(schema_path).read_text())))


# --- the results figure ----------------------------------------------------------------------

_NUM = r"([0-9.eE+-]+)"


def _table_after(text: str, heading: str) -> list[dict[str, str]]:
    body = markdown_section(text, heading) or ""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return []
    header = _split_row(lines[0])
    return [dict(zip(header, _split_row(r))) for r in lines[2:]]


def perplexity_points(text: str) -> list[tuple[str, float, float, float, float]]:
    """(method, ratio %, x dense, low, high) of every method of a comparison table's perplexity:
    the interval across calibration draws where the table has draws, else over windows."""
    out = []
    rows = _table_after(text, "Across calibration draws")
    col = "x dense or - dense (points) [95% CI over draws]"
    if not rows:
        rows, col = _table_after(text, "Perplexity, paired over windows"), "x dense [95% CI]"
    for r in rows:
        if not r.get("measure", r.get("protocol", "")).startswith("flap_token_ppl"):
            continue
        m = re.match(rf"\s*{_NUM}\s*\[{_NUM},\s*{_NUM}\]", r.get(col, "").replace("**", ""))
        if m:
            out.append((r["method"], 100 * float(r["ratio"]), float(m[1]), float(m[2]), float(m[3])))
    return out


def results_figure(panels: Sequence[tuple[str, Sequence[str | Path]]], png: str | Path) -> list[str]:
    """Perplexity (x dense, log scale) against the ratio, one line per method, one panel per
    ``(title, comparison tables)``: the first table present is drawn (the replicates' first, whose
    intervals are over calibration draws), none present is a panel that names them. Returns the
    tables drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    drawn = []
    for ax, (title, paths) in zip(axes[0], panels):
        path = next((Path(p) for p in paths if Path(p).is_file()), None)
        pts = perplexity_points(path.read_text()) if path else []
        if not pts:
            ax.set_title(title, fontsize=10)
            ax.text(0.5, 0.5, "not yet run:\n" + "\n".join(map(str, paths)), ha="center", va="center")
            ax.set_axis_off()
            continue
        drawn.append(str(path))
        ax.set_title(f"{title}\n{path}", fontsize=9)
        methods = sorted({p[0] for p in pts}, key=lambda m: min(p[2] for p in pts if p[0] == m))
        width = 4.0 / max(1, len(methods))
        for i, meth in enumerate(methods):
            mine = sorted(p for p in pts if p[0] == meth)
            x = [p[1] + (i - (len(methods) - 1) / 2) * width for p in mine]
            err = [[p[2] - p[3] for p in mine], [p[4] - p[2] for p in mine]]
            ax.errorbar(
                x,
                [p[2] for p in mine],
                yerr=err,
                marker="o",
                ms=4,
                capsize=2,
                label=meth,
                color=colors[i % len(colors)],
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("block parameters removed (%)")
        ax.set_ylabel("perplexity / dense, 95% CI")
        ax.set_xticks(sorted({p[1] for p in pts}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return drawn


def build(
    pages: Sequence[str | Path],
    schema: str | Path,
    configuration: str | Path,
    figure: str | Path,
    panels: Sequence[tuple[str, Sequence[str]]],
    root: str | Path = ".",
) -> None:
    """What ``snakemake docs`` does: the configuration reference from the schema, the results
    figure and every page's generated blocks from the files present under ``root``."""
    import logging

    log = logging.getLogger(__name__)
    write_configuration(schema, configuration)
    log.info("configuration reference: %s", configuration)
    log.info("results figure %s from %s", figure, results_figure(panels, figure) or "no results")
    missing = refresh_pages(pages, root)
    log.info("pages %s; blocks not yet run: %s", ", ".join(map(str, pages)), ", ".join(missing) or "none")
