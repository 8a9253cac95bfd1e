"""The conda environment and the pip requirement sets pin the same versions."""

import re
from pathlib import Path

import yaml


def pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[m[1].lower().replace("_", "-")] = m[2]
    return out


def test_conda_env_and_requirements_agree():
    env = yaml.safe_load(Path("envs/fnprune.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = pins(pip_section)
    req = pins(Path("envs/requirements.txt").read_text().splitlines())
    cpu = pins(Path("envs/requirements-cpu.txt").read_text().splitlines())
    assert req, "no pins read from envs/requirements.txt"
    assert {k: v for k, v in conda.items() if k != "torch"} == req
    assert conda["torch"] == cpu["torch"]


def test_every_rule_names_the_conda_env():
    for smk in Path("workflow/rules").glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        assert text.count('"../../envs/fnprune.yaml"') == n_rules, smk
