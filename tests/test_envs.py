"""The conda environment and the pip requirement sets pin the same versions."""

import re

import yaml

from helpers import REPO


def pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[m[1].lower().replace("_", "-")] = m[2]
    return out


def test_conda_env_and_requirements_agree():
    env = yaml.safe_load((REPO / "envs" / "fnprune.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = pins(pip_section)
    req = pins((REPO / "envs" / "requirements.txt").read_text().splitlines())
    cpu = pins((REPO / "envs" / "requirements-cpu.txt").read_text().splitlines())
    models = pins((REPO / "envs" / "requirements-models.txt").read_text().splitlines())
    assert req and models, "no pins read from envs/requirements.txt or envs/requirements-models.txt"
    assert {k: v for k, v in conda.items() if k != "torch"} == {**req, **models}
    assert conda["torch"] == cpu["torch"]


def test_every_rule_names_the_conda_env():
    smks = sorted((REPO / "workflow" / "rules").glob("*.smk"))
    assert len(smks) >= 8
    for smk in smks:
        text = smk.read_text()
        # named rules and rules generated in a loop (`rule:` with a `name:`); `use rule` inherits the env
        n_rules = len(re.findall(r"^\s*rule(?: \w+)?:", text, re.M))
        assert text.count('"../../envs/fnprune.yaml"') == n_rules, smk
