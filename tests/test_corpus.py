"""The embedded corpus: deterministic splits with a recorded hash, no leakage of chunks."""

import json

from fnprune.corpus import SPLITS, build_corpus, chunk_document, read_split

SPEC = {"source": "embedded", "fractions": {"train": 0.75, "calib": 0.15, "validation": 0.05, "test": 0.05},
        "max_chars": 1500, "min_chars": 200}


def test_embedded_corpus_is_deterministic(tmp_path):
    a = build_corpus(SPEC, tmp_path / "a")
    b = build_corpus(SPEC, tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    total = sum(v["chars"] for v in a["splits"].values())
    assert total > 500_000
    ids = [set(json.loads(l)["id"] for l in open(tmp_path / "a" / f"{s}.jsonl")) for s in SPLITS]
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
