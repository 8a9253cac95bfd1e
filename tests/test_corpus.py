"""The embedded corpus: deterministic splits with a recorded hash, no leakage of chunks."""

import json

import pytest

from fnprune.corpus import SPLITS, build_corpus, chunk_document, embedded_documents, read_records, read_split

SPEC = {
    "source": "embedded",
    "fractions": {"train": 0.75, "calib": 0.15, "validation": 0.05, "test": 0.05},
    "max_chars": 1500,
    "min_chars": 200,
}


def test_embedded_corpus_is_deterministic(tmp_path):
    a = build_corpus(SPEC, tmp_path / "a")
    b = build_corpus(SPEC, tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    total = sum(v["chars"] for v in a["splits"].values())
    assert total > 500_000
    ids = [set(json.loads(row)["id"] for row in open(tmp_path / "a" / f"{s}.jsonl")) for s in SPLITS]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    assert len(read_split(tmp_path / "a" / "test.jsonl")) >= 20


def test_local_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n\n".join(f"Document {i}. " + "word " * 100 for i in range(60)))
    m = build_corpus({**SPEC, "source": "text", "path": str(f)}, tmp_path / "out")
    assert sum(v["records"] for v in m["splits"].values()) == 60


def test_chunks_respect_bounds():
    text = "\n\n".join("x" * 300 for _ in range(10))
    chunks = chunk_document(text, max_chars=700, min_chars=200)
    assert all(200 <= len(c) <= 700 for c in chunks) and len(chunks) == 5


def test_embedded_parts_split_like_the_whole_corpus(tmp_path):
    """A one-part corpus (langref: pydoc topics; libdocs: module docstrings) is the whole corpus with
    the other part's documents removed: every split of it is a subset of the whole corpus's split,
    so its test split is held out of a model trained on the whole corpus's train split."""
    whole = {s: read_records(p) for s, p in _build(SPEC, tmp_path / "stdlib").items()}
    parts = {
        name: {s: read_records(p) for s, p in _build({**SPEC, "parts": [name]}, tmp_path / name).items()}
        for name in ("topics", "modules")
    }
    for split in SPLITS:
        recs = {r["id"]: r["text"] for r in whole[split]}
        topics = {r["id"]: r["text"] for r in parts["topics"][split]}
        modules = {r["id"]: r["text"] for r in parts["modules"][split]}
        assert topics and modules, split
        assert all(i.startswith("topic:") for i in topics) and all(i.startswith("module:") for i in modules)
        assert {**topics, **modules} == recs, split
    assert len(parts["topics"]["test"]) >= 10 and len(parts["modules"]["test"]) >= 10
    assert len(parts["topics"]["calib"]) >= 32 and len(parts["modules"]["calib"]) >= 32


def _build(spec, out):
    m = build_corpus(spec, out)
    assert m["parts"] == spec.get("parts", ["topics", "modules"])
    return {s: out / f"{s}.jsonl" for s in SPLITS}


def test_unknown_part_is_named():
    with pytest.raises(ValueError, match="corpora.*.parts: \\['tutorial'\\] unknown"):
        embedded_documents(["topics", "tutorial"])


@pytest.mark.parametrize(
    "content,match", [(b"", "is empty; expected text"), (b"\xff\xfe\x00binary", "is not UTF-8 text")]
)
def test_a_bad_text_corpus_file_is_named(tmp_path, content, match):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"corpora\.\*\.path: {f} {match}"):
        build_corpus({**SPEC, "source": "text", "path": str(f)}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_editing_a_text_corpus_file_reruns_its_corpus_job(tmp_path):
    """The file is the corpus job's input: after an edit the dry run schedules it again."""
    import yaml

    from helpers import snakemake
    from test_workflow import jobs_of

    f = tmp_path / "t.txt"
    f.write_text("\n\n\n".join(f"Document {i}. " + "word " * 100 for i in range(60)))
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"corpora": {"mytext": {**SPEC, "source": "text", "path": str(f)}}}))
    wd = tmp_path / "wd"
    snakemake(wd, "results/data/mytext/test.jsonl", configs=(str(overlay),))
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(
        snakemake(wd, "-n", "results/data/mytext/test.jsonl", configs=(str(overlay),))
    )
    f.write_text(f.read_text() + "\n\n\nDocument 60. " + "word " * 100)
    proc = snakemake(wd, "-n", "results/data/mytext/test.jsonl", configs=(str(overlay),))
    assert jobs_of(proc.stdout) == {"corpus": 1}, proc.stdout[-2000:]


def test_file_docstrings_in_source_order_under_qualified_names():
    from fnprune.corpus import file_docstrings

    src = '''"""Module doc."""

class A:
    """Class doc, long enough to be kept: more than eighty characters of documentation text here."""

    def f(self):
        """Method doc, long enough to be kept: more than eighty characters of documentation text."""

def g():
    """short"""
'''
    text = file_docstrings(src, "pkg.mod")
    assert text.startswith("Module doc.") and "pkg.mod.A\n\nClass doc" in text and "pkg.mod.A.f\n\nMethod" in text
    assert "short" not in text and text.index("pkg.mod.A\n") < text.index("pkg.mod.A.f")
    assert file_docstrings("def (:", "x") == ""


def test_stdlib_files_leave_out_tests_and_bundled_packages():
    from fnprune.corpus import SKIPPED_DIRS, stdlib_files, stdlib_root

    root = stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert "json/decoder.py" in rel and "argparse.py" in rel and rel == sorted(rel)
    assert not any(set(r.split("/")[:-1]) & SKIPPED_DIRS or r.split("/")[-1].startswith("test_") for r in rel)


@pytest.mark.parametrize("name", ["stdlib_docs", "stdlib_code"])
def test_scale_corpora_hold_the_papers_union_and_split_by_file(name, tmp_path):
    """Each of the two large corpora holds 1,280+ calibration texts (32 batches of 40), and a file
    of the standard library lands in one split whichever corpus it is read into."""
    import yaml

    from helpers import REPO

    corpora = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["corpora"]
    spec = corpora[name]
    m = build_corpus(spec, tmp_path / name)
    assert m["splits"]["calib"]["records"] >= 1280 and m["python"]
    split_of_file = {}
    for split in SPLITS:
        for rec in read_records(tmp_path / name / f"{split}.jsonl"):
            path = rec["id"].split(":", 1)[1].rsplit("#", 1)[0]
            assert split_of_file.setdefault(path, split) == split, rec["id"]
    # the other shipped corpus as configured (its own fractions and keys), not this one's spec
    other = build_corpus(corpora["stdlib_code" if name == "stdlib_docs" else "stdlib_docs"], tmp_path / "other")
    assert other["sha256"] != m["sha256"]
    for split in SPLITS:
        for rec in read_records(tmp_path / "other" / f"{split}.jsonl"):
            path = rec["id"].split(":", 1)[1].rsplit("#", 1)[0]
            assert split_of_file.get(path, split) == split, rec["id"]
