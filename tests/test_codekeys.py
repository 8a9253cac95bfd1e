"""Code cache keys (fnprune.codekeys): a rule's key changes when, and only when, code it runs changes."""

import shutil
from pathlib import Path

import pytest

from fnprune.codekeys import workflow_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tree(tmp_path):
    pkg = tmp_path / "fnprune"
    shutil.copytree(ROOT / "src" / "fnprune", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    scripts = tmp_path / "scripts"
    shutil.copytree(ROOT / "workflow" / "scripts", scripts)
    return pkg, scripts


def keys(tree):
    pkg, scripts = tree
    return workflow_keys(scripts, pkg)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {k for k in before if before[k] != after[k]}


def test_every_script_has_a_key_and_the_tree_gives_the_installed_keys(tree):
    k = keys(tree)
    assert set(k) == {p.stem for p in (ROOT / "workflow" / "scripts").glob("*.py")}
    assert k == workflow_keys(ROOT / "workflow" / "scripts", ROOT / "src" / "fnprune")


def test_an_ica_solver_change_rekeys_the_ica_and_not_the_evaluation(tree):
    before = keys(tree)
    edit(tree[0] / "ica.py", "def fastica_cube(", "def _unused():\n    return 1\n\n\ndef fastica_cube(")
    assert changed(before, keys(tree)) == set()  # a definition nothing reaches
    edit(
        tree[0] / "ica.py", "    active = torch.ones(n_prob", "    n_prob = int(n_prob)\n    active = torch.ones(n_prob"
    )
    rekeyed = changed(before, keys(tree))
    assert "ica" in rekeyed
    assert not rekeyed & {"perplexity", "lm_eval", "extract", "prune", "corpus", "convert_gguf", "metrics"}


def test_a_stage_function_rekeys_its_own_rule_only(tree):
    before = keys(tree)
    edit(
        tree[0] / "stages.py",
        "def perplexity(",
        "def perplexity(*_a, _unused=0, **_k):\n    pass\n\n\ndef _old_perplexity(",
    )
    assert changed(before, keys(tree)) == {"perplexity"}


def test_comments_docstrings_and_formatting_do_not_rekey(tree):
    before = keys(tree)
    ica = tree[0] / "ica.py"
    text = ica.read_text()
    text = text.replace(
        '    """Top-k eigenvectors of a symmetric PSD matrix', '    """Top eigenvectors (reworded) of a PSD matrix'
    )
    text = text.replace("    m = g.shape[0]\n", "    # a comment\n    m = (g.shape[0])\n", 1)
    ica.write_text(text)
    edit(tree[1] / "ica.py", "from fnprune import stages\n", "from fnprune import stages  # the stage\n\n")
    assert changed(before, keys(tree)) == set()


def test_a_script_change_rekeys_that_rule(tree):
    before = keys(tree)
    edit(tree[1] / "summary.py", "from fnprune import stages\n", "from fnprune import stages  # same\n\n")
    assert changed(before, keys(tree)) == set()
    text = (tree[1] / "summary.py").read_text()
    (tree[1] / "summary.py").write_text(text + "\nprint('done')\n")
    assert changed(before, keys(tree)) == {"summary"}


def test_a_task_template_rekeys_the_task_builder(tree):
    before = keys(tree)
    path = tree[0] / "tasks" / "fnprune_mc.yaml"
    path.write_text(path.read_text() + "\n# note\n")
    rekeyed = changed(before, keys(tree))
    assert "lm_eval_tasks" in rekeyed and "ica" not in rekeyed and "perplexity" not in rekeyed


def test_the_cache_is_used_only_while_no_file_changed(tree, tmp_path):
    pkg, scripts = tree
    cache = tmp_path / "cache" / "keys.json"
    first = workflow_keys(scripts, pkg, cache=cache)
    assert cache.is_file()
    assert workflow_keys(scripts, pkg, cache=cache) == first
    edit(
        pkg / "stages.py",
        "def perplexity(",
        "def perplexity(*_a, _unused=0, **_k):\n    pass\n\n\ndef _old_perplexity(",
    )
    assert changed(first, workflow_keys(scripts, pkg, cache=cache)) == {"perplexity"}
