"""LoRA recovery (fnprune.lora, stages.lora): peft's LoRA on every block linear, trained on packed
windows of a train split, merged into an ordinary model that saves and loads like any pruned one."""

from __future__ import annotations

import json

import pytest
import torch

from fnprune import lora as L
from fnprune import stages
from fnprune.modeling import apply_mask, load_pruned, read_sidecar, save_pruned
from fnprune.train import train_tokenizer
from helpers import mask_for
from test_workflow import jobs_of

TEXTS = [
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # the {['cat', 'dog', 'fox'][i % 3]} sat on the mat"
    for i in range(60)
]
SETTINGS = {
    "rank": 4,
    "alpha": 8,
    "lr": 0.03,
    "tokens": 16 * 4 * 32,
    "seq_len": 32,
    "batch_size": 4,
    "seed": 0,
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def llama(tokenizer, arch: str = "LlamaForCausalLM", seed: int = 0):
    import transformers as T

    common = dict(
        architectures=[arch],
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return getattr(T, arch)(getattr(T, arch.replace("ForCausalLM", "Config"))(**common)).float().eval()


def pruned_dir(tokenizer, path):
    """A saved model with per-layer MLP widths (48, 30, 17) and its sidecar, as the prune rule writes it."""
    model = llama(tokenizer)
    kept = [list(range(48)), sorted([*range(0, 48, 2), *range(1, 13, 2)]), list(range(3, 20))]
    apply_mask(model, mask_for(kept, [48] * 3, [1, 2]))
    save_pruned(model, tokenizer, path, {"target": "t_r20_c4", "method": "c4", "kept": kept})
    return path


def split_files(tmp_path):
    """A corpus directory whose held-out splits hold texts that must never be read."""
    d = tmp_path / "data"
    d.mkdir()
    for split, texts in (
        ("train", TEXTS),
        ("validation", ["HELD OUT validation text"] * 5),
        ("test", ["HELD OUT test text"] * 5),
    ):
        with open(d / f"{split}.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"{split}{i}", "text": t}) + "\n")
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- the pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,names",
    [
        (
            "LlamaForCausalLM",
            {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]},
        ),
        ("Phi3ForCausalLM", {"self_attn": ["o_proj", "qkv_proj"], "mlp": ["gate_up_proj", "down_proj"]}),
    ],
)
def test_lora_goes_on_every_linear_of_the_blocks_and_nothing_else(tokenizer, arch, names):
    model = llama(tokenizer, arch)
    got = L.block_linear_names(model)
    assert sorted(got) == sorted(
        f"model.layers.{i}.{sub}.{n}" for i in range(3) for sub, ns in names.items() for n in ns
    )
    tuned = L.add_lora(model, 4, 8, 0)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(got)


def test_windows_are_seeded_packed_and_repeat_a_short_split(tokenizer):
    rows, info = L.token_windows(tokenizer, TEXTS, 16, 10, seed=3)
    again, _ = L.token_windows(tokenizer, TEXTS, 16, 10, seed=3)
    other, _ = L.token_windows(tokenizer, TEXTS, 16, 10, seed=4)
    assert rows.shape == (10, 16) and torch.equal(rows, again) and not torch.equal(rows, other)
    assert info["passes"] == 1 and info["texts_read"] < len(TEXTS)  # tokenised only as far as needed
    assert (rows == tokenizer.eos_token_id).any()  # texts are joined by EOS
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
    _, many = L.token_windows(tokenizer, TEXTS, 16, 2 * total // 16 + 1, seed=3)
    assert many["passes"] == 3


def test_the_schedule_warms_up_then_decays_to_zero():
    f = [L.lr_factor(s, 20, 2) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.01


def test_finetuning_lowers_the_training_loss_and_leaves_the_base_weights(tokenizer):
    model = llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = L.add_lora(model, 4, 8, 0)
    rows, _ = L.token_windows(tokenizer, TEXTS, 32, 64, seed=0)
    rec = L.finetune(tuned, rows, lr=0.03, batch_size=4)
    assert rec["steps"] == 16 and len(rec["loss_curve"]) == 16 and rec["warmup_steps"] == 2
    assert rec["loss_end_steps"] == 2 and rec["loss_end"] < 0.8 * rec["loss_start"], rec["loss_curve"]
    assert rec["loss_start"] == rec["loss_curve"][0] and rec["loss_first"] == sum(rec["loss_curve"][:2]) / 2
    base = {k.replace("base_model.model.", "").replace("base_layer.", ""): v for k, v in tuned.state_dict().items()}
    assert all(torch.equal(base[k], v) for k, v in before.items())
    assert not tuned.training


def test_the_merged_model_computes_what_the_peft_model_did_and_is_plain(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tuned = L.add_lora(llama(tokenizer), 4, 8, 0)
    rows, _ = L.token_windows(tokenizer, TEXTS, 32, 32, seed=0)
    L.finetune(tuned, rows, lr=0.03, batch_size=4)
    ids = rows[:3]
    want = logits(tuned, ids)
    assert not torch.allclose(want, logits(llama(tokenizer), ids), atol=1e-3)  # tuning changed the outputs
    merged, lost = L.merge(llama(tokenizer), L.adapter_state(tuned), 4, 8, torch.float32)
    assert lost is None and type(merged).__name__ == "LlamaForCausalLM"
    assert not [m for m in merged.modules() if type(m).__module__.startswith("peft")]
    assert not [k for k in merged.state_dict() if "lora" in k or "base_layer" in k]
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain, ids), want, rtol=1e-5, atol=1e-5)


def test_merging_into_bfloat16_weights_records_what_the_rounding_lost(tokenizer):
    tuned = L.add_lora(llama(tokenizer), 4, 8, 0)
    rows, _ = L.token_windows(tokenizer, TEXTS, 32, 16, seed=0)
    L.finetune(tuned, rows, lr=0.03, batch_size=4)
    merged, lost = L.merge(llama(tokenizer), L.adapter_state(tuned), 4, 8, torch.bfloat16)
    assert next(merged.parameters()).dtype == torch.bfloat16 and 0 < lost < 1
    with pytest.raises(ValueError, match="float32"):
        L.merge(llama(tokenizer).to(torch.bfloat16), L.adapter_state(tuned), 4, 8, torch.bfloat16)


# ---- the stage ----------------------------------------------------------------------------------------


def test_lora_tunes_a_pruned_model_with_per_layer_widths(tokenizer, tmp_path):
    src = pruned_dir(tokenizer, tmp_path / "pruned")
    data = split_files(tmp_path)
    spec = {"source": "local", "hf_id": str(src)}
    out = tmp_path / "tuned"
    stages.lora(str(src), spec, str(data / "train.jsonl"), SETTINGS, "t_r20_c4_lora", "t_r20_c4", str(out))
    parent, tuned = load_pruned(src, device="cpu"), load_pruned(out, device="cpu")
    side, parent_side = read_sidecar(out), read_sidecar(src)
    assert side["layout"] == parent_side["layout"] and side["layout"]["intermediate_sizes"] == [48, 30, 17]
    assert side["parameters"] == parent_side["parameters"] == sum(p.numel() for p in tuned.parameters())
    assert (side["target"], side["tuned_from"], side["method"]) == ("t_r20_c4_lora", "t_r20_c4", "c4")
    assert side["kept"] == parent_side["kept"]
    rec = side["lora"]
    assert rec["settings"] == SETTINGS and rec["tokens_seen"] == 16 * 4 * 32 and rec["steps"] == 16
    # rank 4 on (in + out) of every block linear
    linears = [m for m in parent.modules() if isinstance(m, torch.nn.Linear) and m is not parent.lm_head]
    assert rec["trainable_parameters"] == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert rec["target_modules"] == len(linears) == 21
    assert rec["loss_end"] < rec["loss_start"] and len(rec["loss_curve"]) == 16
    assert rec["saved_dtype"] == "float32" and rec["merge_rounding_lost"] is None and rec["wall_s"] > 0
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    assert not torch.allclose(logits(tuned, ids), logits(parent, ids), atol=1e-4)
    # embeddings, norms and the head are not tuned
    p, t = parent.state_dict(), tuned.state_dict()
    for k in p:
        if "proj" not in k:
            assert torch.equal(p[k], t[k]), k


def test_lora_of_the_dense_model_reads_the_base_and_saves_a_sidecar(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = split_files(tmp_path)
    spec = {"source": "local", "hf_id": str(base)}
    out = tmp_path / "tuned"
    settings = {**SETTINGS, "dtype": "bfloat16"}  # tuned in bfloat16, merged into the float32 weights
    stages.lora(str(base), spec, str(data / "train.jsonl"), settings, "t_dense_lora", "t_dense", str(out))
    side = read_sidecar(out)
    assert (side["method"], side["tuned_from"], side["source_model"]) == ("dense", "t_dense", str(base))
    assert side["lora"]["saved_dtype"] == "float32" and side["lora"]["settings"]["dtype"] == "bfloat16"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_pruned(out, device="cpu")
    ids = torch.tensor([tokenizer(TEXTS[1])["input_ids"]])
    torch.testing.assert_close(logits(plain, ids), logits(ours, ids))
    assert next(ours.parameters()).dtype == torch.float32


def test_lora_reads_the_train_split_only(tokenizer, tmp_path, monkeypatch):
    import fnprune.corpus

    src = pruned_dir(tokenizer, tmp_path / "pruned")
    data = split_files(tmp_path)
    read, seen = [], []
    real_read, real_windows = fnprune.corpus.read_records, L.token_windows
    monkeypatch.setattr(fnprune.corpus, "read_records", lambda p: read.append(str(p)) or real_read(p))
    monkeypatch.setattr(L, "token_windows", lambda tok, texts, *a: seen.extend(texts) or real_windows(tok, texts, *a))
    spec = {"source": "local", "hf_id": str(src)}
    stages.lora(str(src), spec, str(data / "train.jsonl"), SETTINGS, "t_r20_c4_lora", "t_r20_c4", str(tmp_path / "o"))
    assert read == [str(data / "train.jsonl")]
    assert seen and not [t for t in seen if "HELD OUT" in t]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"seq_len": 128}, "lora.seq_len: 128 exceeds t_r20_c4's maximum length 64"),
        ({"tokens": 100}, "lora.tokens: 100 make no step of lora.batch_size x seq_len = 128 tokens"),
    ],
)
def test_impossible_settings_name_their_key(tokenizer, tmp_path, change, needle):
    src = pruned_dir(tokenizer, tmp_path / "pruned")
    data = split_files(tmp_path)
    with pytest.raises(ValueError, match=needle):
        stages.lora(
            str(src),
            {"source": "local", "hf_id": str(src)},
            str(data / "train.jsonl"),
            {**SETTINGS, **change},
            "t_r20_c4_lora",
            "t_r20_c4",
            str(tmp_path / "o"),
        )


# ---- the workflow -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_lora_targets_run_through_the_workflow(micro_lora_run):
    """results/micro_r20_c8_lora and results/micro_dense_lora (config/micro.yaml's lora section: 16
    steps of 8 x 128 tokens): tuned on stdlib's train split, evaluated like any target, metrics.json
    with the lora block; the pruned model keeps its per-layer widths and loads."""
    wd, log = micro_lora_run
    res = wd / "results"
    jobs = jobs_of(log)
    assert jobs["lora"] == 2 and jobs["metrics_lora"] == 2 and "prune" not in jobs, jobs
    untuned = {t: json.loads((res / f"micro_{t}/metrics.json").read_text()) for t in ("dense", "r20_c8")}
    for t in ("dense", "r20_c8"):
        m = json.loads((res / f"micro_{t}_lora/metrics.json").read_text())
        assert m["target"] == f"micro_{t}_lora" and m["tuned_from"] == f"micro_{t}"
        assert m["method"] == ("dense_lora" if t == "dense" else "c8_lora")
        lo = m["lora"]
        assert lo["settings"]["lr"] == 0.003 and lo["tokens_seen"] == 16384 and lo["steps"] == 16
        assert lo["train_split"] == "results/data/stdlib/train.jsonl" and len(lo["loss_curve"]) == 16
        assert m["stage_wall_s"]["lora"] == lo["wall_s"] > 0
        assert m["ratio_requested"] == untuned[t]["ratio_requested"]
        assert m["parameters"] == (untuned[t].get("parameters") or untuned[t]["base_model"]["parameters"])
        key = "flap_token_ppl@64"
        assert m["perplexity"][key] < untuned[t]["perplexity"][key]  # in-domain tuning lowers both
        assert set(m["lm_eval"]) == {"fnprune_mc", "fnprune_ppl"}
    pruned = json.loads((res / "micro_r20_c8_lora/metrics.json").read_text())
    assert pruned["kept_neurons_per_layer"] == untuned["r20_c8"]["kept_neurons_per_layer"]
    side = read_sidecar(res / "micro_r20_c8_lora/model")
    assert side["layout"] == read_sidecar(res / "micro_r20_c8/model")["layout"]
    assert load_pruned(res / "micro_r20_c8_lora/model", device="cpu").config.num_hidden_layers == 4
    text = (res / "logs/lora/micro_r20_c8.log").read_text()
    assert "lora: 100%" in text and "step 16/16: loss" in text
