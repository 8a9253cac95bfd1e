"""The FLAP-protocol perplexity against a direct computation."""

import math

import pytest
import torch

from fnprune.perplexity import token_perplexity, windows
from fnprune.train import build_model, train_tokenizer

TEXTS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7} times." for i in range(40)]


@pytest.fixture(scope="module")
def model_and_tok():
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, 300)
    spec = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position=64)
    return build_model(spec, tok).eval(), tok


@pytest.mark.parametrize("bos", [False, True])
def test_matches_direct_computation(model_and_tok, bos):
    """Each window scored on its own; a tokenizer that starts every text with BOS (Gemma's) gets one
    before each window, and the same tokens are predicted."""
    import copy

    model, tok = model_and_tok
    from tokenizers import processors

    tok = copy.deepcopy(tok)  # the same tokenizer, adding BOS by default or not
    single = f"{tok.bos_token} $A" if bos else "$A"
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) is bos
    ids = tok("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"]
    seqlen = 16
    n = len(ids) // seqlen
    nlls = []
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([([tok.bos_token_id] if bos else []) + ids[w * seqlen : (w + 1) * seqlen]])
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            nlls.append(
                -sum(logp[t, x[0, t + 1]].item() for t in range(int(bos), int(bos) + seqlen - 1)) / (seqlen - 1)
            )
    expected = math.exp(sum(nlls) / len(nlls))
    got = token_perplexity(model, tok, TEXTS, seqlen=seqlen, batch_size=3)
    assert got["windows"] == n and got["bos_prefix"] is bos
    assert got["ppl"] == pytest.approx(expected, rel=1e-5)
    assert got["protocol"] == "flap_token_ppl"
    forced = token_perplexity(model, tok, TEXTS, seqlen=seqlen, batch_size=3, bos=False)
    assert forced["bos_prefix"] is False and (forced["ppl"] == got["ppl"]) is not bos


def test_seqlen_beyond_model_length_is_refused(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        token_perplexity(model, tok, TEXTS, seqlen=128)


def test_windows_drop_partial_tail(model_and_tok):
    _, tok = model_and_tok
    w = windows(tok, TEXTS, 10)
    assert w.shape[1] == 10


def test_a_bfloat16_model_is_scored_in_float32(model_and_tok):
    """A bfloat16 model's perplexity stays within bfloat16's rounding of the float32 model's: its
    logits are upcast before the log-softmax and the NLL is averaged in float64."""
    model, tok = model_and_tok
    f32 = token_perplexity(model, tok, TEXTS, seqlen=16, batch_size=3)
    try:
        b16 = token_perplexity(model.to(torch.bfloat16), tok, TEXTS, seqlen=16, batch_size=3)
    finally:
        model.to(torch.float32)
    assert b16["nll"] == pytest.approx(f32["nll"], rel=0.02)
    assert b16["nll"] != f32["nll"]  # the bfloat16 arithmetic really ran
