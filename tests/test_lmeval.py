"""lm-eval wrapper: embedded tasks, evaluation of a model object, task names, offline failures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fnprune.corpus import chunk_document
from fnprune.embedded_tasks import MC_TASK, PPL_TASK, passage_windows, ppl_documents, write_embedded_tasks
from fnprune.lmeval import HUB_TASKS, _task_manager, run_lm_eval
from fnprune.train import build_model, train_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "max_position": 256}
SMALL = {"passage_chars": 160, "continuation_chars": 48}


def _records(names: list[str]) -> list[dict]:
    from pydoc_data.topics import topics

    return [
        {"id": f"topic:{n}#{i}", "text": c} for n in names for i, c in enumerate(chunk_document(topics[n], 600, 200))
    ]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    d = tmp_path_factory.mktemp("corpus")
    return {
        "test": _write(d / "test.jsonl", _records(names[:6])),
        "validation": _write(d / "validation.jsonl", _records(names[6:10])),
        "train": _write(d / "train.jsonl", _records(names[10:40])),
    }


@pytest.fixture(scope="module")
def tasks(corpus, tmp_path_factory) -> dict:
    return write_embedded_tasks(
        corpus["test"], corpus["validation"], tmp_path_factory.mktemp("tasks"), seed=0, n_items=24, **SMALL
    )


def _jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_windows_cut_at_single_spaces():
    text = " ".join(f"w{i}" for i in range(200))
    windows = passage_windows(text, 40, 12)
    assert len(windows) > 5
    for context, cont in windows:
        assert 20 < len(context) <= 40 and 6 < len(cont) <= 12
        assert f"{context} {cont}" in text and not cont.startswith(" ") and not context.endswith(" ")


def test_ppl_documents_join_consecutive_chunks_only():
    recs = [
        {"id": "a#0", "text": "x"},
        {"id": "a#1", "text": "y"},
        {"id": "a#3", "text": "z"},
        {"id": "test:6", "text": " "},
        {"id": "test:7", "text": "w"},
    ]
    assert ppl_documents(recs) == [
        {"id": "a", "text": "x\n\ny"},
        {"id": "a", "text": "z"},
        {"id": "test:7", "text": "w"},
    ]


def test_embedded_tasks_deterministic(corpus, tasks, tmp_path):
    again = write_embedded_tasks(corpus["test"], corpus["validation"], tmp_path / "a", seed=0, n_items=24, **SMALL)
    other = write_embedded_tasks(corpus["test"], corpus["validation"], tmp_path / "b", seed=1, n_items=24, **SMALL)
    assert again["sha256"] == tasks["sha256"]
    assert other["tasks"][MC_TASK]["sha256"] != tasks["tasks"][MC_TASK]["sha256"]
    assert other["tasks"][PPL_TASK]["sha256"] == tasks["tasks"][PPL_TASK]["sha256"]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_mc_items_one_gold_distractors_from_other_passages(tasks):
    items = _jsonl(tasks["tasks"][MC_TASK]["data"])
    assert len(items) == tasks["tasks"][MC_TASK]["items"] == 24
    for it in items:
        assert len(it["choices"]) == 4 == len(set(it["choices"]))
        own = it["id"].rsplit("@", 1)[0]
        assert [s == own for s in it["sources"]].count(True) == 1
        assert it["sources"][it["label"]] == own
    assert len({it["label"] for it in items}) > 1


def test_task_yaml_points_to_data(tasks):
    import yaml

    for name in (MC_TASK, PPL_TASK):
        cfg = yaml.safe_load(Path(tasks["tasks"][name]["yaml"]).read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data == Path(tasks["tasks"][name]["data"])
    docs = _jsonl(tasks["tasks"][PPL_TASK]["data"])
    assert len(docs) == tasks["tasks"][PPL_TASK]["items"] and all(d["text"] for d in docs)


@pytest.fixture(scope="module")
def tiny(corpus):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = train_tokenizer([r["text"] for r in _jsonl(corpus["train"])], 300)
    return build_model(TINY, tok), tok


def test_run_lm_eval_embedded(tiny, tasks, tmp_path):
    model, tok = tiny
    raw_out = tmp_path / "raw.json"
    out = run_lm_eval(
        model, tok, [MC_TASK, PPL_TASK], batch_size="auto", include_path=tasks["dir"], raw_out=raw_out, max_length=2048
    )
    mc, ppl = out["tasks"][MC_TASK], out["tasks"][PPL_TASK]
    assert set(mc) == {"acc", "acc_norm", "acc_mutual_info"} and 0 <= mc["acc"]["value"] <= 1
    assert all(math.isfinite(v[k]) for v in mc.values() for k in ("value", "stderr"))
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v["value"]) and v["value"] > 0 for v in ppl.values())
    assert out["mean_acc"] == mc["acc"]["value"] and out["mean_acc_tasks"] == [MC_TASK]
    assert out["n_samples"][MC_TASK] == 24
    assert set(out["versions"]["tasks"]) == {MC_TASK, PPL_TASK} and out["versions"]["lm_eval"]
    # On CPU, auto is the cap as it is (no probing); the context is capped at the model's maximum.
    assert out["config"]["num_fewshot"] == 0 and out["config"]["batch_size_requested"] == "auto"
    assert out["config"]["batch_size"] == 32 and out["config"]["max_batch_size"] == 32
    assert out["config"]["max_length"] == model.config.max_position_embeddings < 2048
    assert out["wall_s"] > 0

    def strict(c: str):
        raise ValueError(c)

    raw = json.loads(raw_out.read_text(), parse_constant=strict)
    assert raw["results"][MC_TASK]["acc,none"] == mc["acc"]["value"]


def test_run_lm_eval_fixed_batch_and_limit(tiny, tasks):
    model, tok = tiny
    out = run_lm_eval(model, tok, [MC_TASK], batch_size=4, limit=8, include_path=tasks["dir"])
    assert out["n_samples"][MC_TASK] == 8 and out["config"]["limit"] == 8


def test_hub_task_names_validate():
    """The check run_lm_eval makes before it touches the model: every hub task is in lm-eval's registry."""
    assert set(HUB_TASKS) <= set(_task_manager(list(HUB_TASKS), None).all_tasks)


def test_misspelt_task_name_fails():
    with pytest.raises(ValueError, match="'hellaswg'.*hellaswag"):
        run_lm_eval(None, None, ["arc_easy", "hellaswg"])


def test_task_list_must_be_a_list_of_names():
    with pytest.raises(ValueError, match="non-empty list of lm-eval task names"):
        run_lm_eval(None, None, MC_TASK)


def test_embedded_names_validate_without_registry(tasks):
    manager = _task_manager([MC_TASK, PPL_TASK], include_path=tasks["dir"])
    assert set(manager.all_tasks) == {MC_TASK, PPL_TASK}  # lm-eval's own tasks were not indexed
    with pytest.raises(ValueError, match="fnprune_mcq"):
        run_lm_eval(None, None, ["fnprune_mcq"], include_path=tasks["dir"])


def test_hub_task_offline_fails_naming_it(tmp_path):
    script = textwrap.dedent("""
        from fnprune.lmeval import TaskUnavailableError, run_lm_eval
        try:
            run_lm_eval(None, None, ["piqa"])
        except TaskUnavailableError as e:
            raise SystemExit(f"UNAVAILABLE {e}")
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "UNAVAILABLE lm-eval task 'piqa'" in proc.stderr
    assert "HF_DATASETS_OFFLINE=0" in proc.stderr


def test_continuation_logits_scoring_equals_hflm(tiny):
    """fnprune's HFLM computes logits only at the scored positions: every request's score (and its
    greedy flag) equals lm-eval's own HFLM's, over batches of mixed lengths and the rolling task."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fnprune.lmeval import _scoring_lm_class

    model, tok = tiny
    words = "the module returns a new list of items sorted by key and value in order".split()
    pairs = [(" ".join(words[: 2 + (i * 5) % 13]), " " + " ".join(words[i % 7 : i % 7 + 1 + i % 4])) for i in range(23)]
    pairs += [("", " sorted list"), ("x", " y")]
    ll = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (" ".join(words * (1 + i)),), i) for i in range(3)]
    ours = _scoring_lm_class()(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    got, want = ours.loglikelihood(ll), ref.loglikelihood(ll)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    want_r = ref.loglikelihood_rolling(rolling)
    assert max(abs(a - b) for a, b in zip(ours.loglikelihood_rolling(rolling), want_r)) < 1e-3
    ours.LOGITS_TOKENS = 64  # one window a pass: the split rolling path scores the same
    assert max(abs(a - b) for a, b in zip(ours.loglikelihood_rolling(rolling), want_r)) < 1e-3
    ours.SHARED_CONTEXT_TYPES = ()  # the continuation path alone (shared contexts: the next test)
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*a, **kw):
        calls.append(kw.get("logits_to_keep"))
        return forward(*a, **kw)

    model.forward = spy
    try:
        ours.loglikelihood(ll)
    finally:
        del model.forward
    assert calls and all(isinstance(k, int) and k > 0 for k in calls) and min(calls) < 20, calls


# 3: two blocks, continuation chunks of 1 (half the batch size on the CPU); 16 and "auto"
# (max_batch_size 16): one block of contexts of different lengths, padded, chunks of 8
@pytest.mark.parametrize("batch_size", [3, 16, "auto"])
def test_shared_context_scoring_equals_one_forward_per_request(tiny, batch_size):
    """Requests that share a context (a multiple-choice item's choices, the empty contexts of
    acc_mutual_info) are scored from one context pass whose cache is repeated over the choices:
    every score and greedy flag equals a full forward pass of context + continuation, and the
    model sees each shared context once."""
    import torch
    from lm_eval.api.instance import Instance

    from fnprune.lmeval import _scoring_lm_class

    model, tok = tiny
    words = "the module returns a new list of items sorted by key and value in order".split()
    contexts = [" ".join(words[: 3 + i]) for i in range(5)]
    pairs = [(c, " " + " ".join(words[j : j + 1 + (i + j) % 4])) for i, c in enumerate(contexts) for j in range(4)]
    pairs += [("", " sorted list"), ("", " y"), ("x", " y z")]  # two empty contexts share one; "x" is alone
    lm = _scoring_lm_class()(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=64, max_batch_size=16)
    calls = []
    body = model.model.forward

    @functools.wraps(body)
    def spy(*a, **kw):  # a context pass: padded contexts, no cache yet
        calls.append("context" if kw.get("past_key_values") is None and kw.get("attention_mask") is not None else "")
        return body(*a, **kw)

    model.model.forward = spy
    try:
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    finally:
        del model.model.forward
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c_ids, k_ids = (
            lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False))
        )
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c_ids + k_ids])).logits[0].float(), -1)
        rows = logp[len(c_ids) - 1 : len(c_ids) + len(k_ids) - 1]
        want = float(rows.gather(1, torch.tensor(k_ids)[:, None]).sum())
        assert lp == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(k_ids)).all()), (ctx, cont)
    # Blocks of about 4 x batch_size continuations, contexts longest first: with batch size 3 the
    # three longest items (12 choices) fill one block, the other two and the two empty-context
    # requests a second; with 16 all 22 fit one block. "x" alone takes the plain path. Each
    # context runs once.
    assert calls.count("context") == (2 if batch_size == 3 else 1) and len(calls) < len(pairs)


@pytest.mark.parametrize("window", [512, 6])
def test_shared_context_scoring_on_a_sliding_window_model_equals_one_forward_per_request(tiny, window):
    """Gemma 3 (sliding-window layers, one key/value head, head_dim != hidden / heads): shared
    contexts where a context and its continuations fit the window (512), the plain path where they
    do not (6); every score equals a full forward pass either way."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fnprune.lmeval import _scoring_lm_class

    _, tok = tiny
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    words = "the module returns a new list of items sorted by key and value in order".split()
    pairs = [(" ".join(words[: 3 + i]), " " + " ".join(words[j : j + 1 + j % 3])) for i in range(3) for j in range(3)]
    lm = _scoring_lm_class()(pretrained=model, tokenizer=tok, batch_size=4, max_length=64, max_batch_size=4)
    shared = []
    real = lm._score_block
    lm._score_block = lambda *a, **kw: shared.append(1) or real(*a, **kw)
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    assert bool(shared) is (window == 512)
    for (ctx, cont), (lp, _) in zip(pairs, got):
        c_ids, k_ids = lm._encode_pair(ctx, cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c_ids + k_ids])).logits[0].float(), -1)
        rows = logp[len(c_ids) - 1 : len(c_ids) + len(k_ids) - 1]
        assert lp == pytest.approx(float(rows.gather(1, torch.tensor(k_ids)[:, None]).sum()), abs=1e-4), (ctx, cont)


@pytest.mark.parametrize(
    "budget,want",
    [(20, [[9, 7], [5, 3]]), (15, [[9], [7], [5, 3]])],  # 15: 9 and 7 together would pad to 18 positions
)
def test_shared_blocks_run_contexts_longest_first_within_a_position_budget(budget, want):
    """Blocks take contexts longest first (so a block pads little), close at BLOCK_CHUNKS x the
    batch size of continuations, and never pad past LOGITS_TOKENS context positions."""
    from types import SimpleNamespace

    from fnprune.lmeval import _scoring_lm_class

    shared = {(1,) * 3: [0, 1], (1,) * 7: [2, 3, 4, 5], (1,) * 5: [6, 7], (1,) * 9: [8, 9]}
    lm = SimpleNamespace(LOGITS_TOKENS=budget, BLOCK_CHUNKS=2)
    blocks = _scoring_lm_class()._shared_blocks(lm, shared, 2)
    assert [[len(c) for c in block] for block in blocks] == want


def test_item_scores_follow_doc_order_and_keep_numbers_only():
    from fnprune.lmeval import item_scores

    samples = {
        "mc": [
            {"doc_id": 1, "metrics": ["acc", "acc_norm"], "acc": 0.0, "acc_norm": 1.0},
            {"doc_id": 0, "metrics": ["acc", "acc_norm"], "acc": 1.0, "acc_norm": 1.0},
        ],
        "ppl": [{"doc_id": 0, "metrics": ["word_perplexity"], "word_perplexity": [-3.2, 10]}],
    }
    assert item_scores(samples) == {"mc": {"acc": [1.0, 0.0], "acc_norm": [1.0, 1.0]}}


def test_mc_items_refuse_more_items_than_passages():
    from fnprune.embedded_tasks import mc_items

    passages = [{"id": f"r{i}@0", "source": f"r{i}", "context": "c", "gold": f"g{i}"} for i in range(5)]
    assert len(mc_items(passages, 4, 5, 0)) == 5
    with pytest.raises(ValueError, match="n_items = 6, but the held-out text holds 5 passages"):
        mc_items(passages, 4, 6, 0)


def test_mc_task_metrics_choose_the_yaml_metrics(corpus, tmp_path):
    import yaml

    info = write_embedded_tasks(corpus["test"], corpus["validation"], tmp_path, n_items=8, metrics=["acc"], **SMALL)
    cfg = yaml.safe_load(Path(info["tasks"][MC_TASK]["yaml"]).read_text())
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc"] and info["tasks"][MC_TASK]["metrics"] == ["acc"]
    with pytest.raises(ValueError, match="mc_task.metrics"):
        write_embedded_tasks(corpus["test"], corpus["validation"], tmp_path / "x", metrics=["bleu"], **SMALL)
    with pytest.raises(ValueError, match=r"validation\.jsonl \+ .*test\.jsonl: mc_task\.n_items = 100000"):
        write_embedded_tasks(corpus["test"], corpus["validation"], tmp_path / "y", n_items=100000, **SMALL)
    assert not (tmp_path / "y").exists()
