"""CUDA paths: CanICA, the calibration pass and perplexity on a GPU agree with the CPU."""

import numpy as np
import pytest
import torch

from fnprune.ica import canica_torch
from fnprune.mask import dice
from fnprune.synthetic import auroc, planted_networks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def top(s, keep=0.7):
    out = np.zeros(len(s), bool)
    out[np.argsort(-s)[: int(keep * len(s))]] = True
    return out


def test_canica_cuda_matches_cpu():
    """Same planted networks; GPU and CPU agree about as well as two CPU seeds do (one pair each,
    so the margin allows for the spread of a single Dice value)."""
    x, member = planted_networks(2000, 4000, 12, 30, noise=1.0, seed=1, n_background=8)
    cpu = [canica_torch(x, 24, seed=s, device="cpu") for s in (0, 1)]
    gpu = canica_torch(x, 24, seed=0, device="cuda")
    assert gpu.converged and cpu[0].converged
    assert abs(auroc(gpu.scores, member) - auroc(cpu[0].scores, member)) < 0.01
    seed_level = dice(top(cpu[0].scores), top(cpu[1].scores))
    assert dice(top(gpu.scores), top(cpu[0].scores)) >= seed_level - 0.05


def test_extraction_and_perplexity_on_cuda(tmp_path):
    from fnprune.extract import extract_batch
    from fnprune.perplexity import token_perplexity
    from fnprune.train import build_model, train_tokenizer

    texts = [f"Line {i}: functional networks of neurons in layer {i % 5} fire together." for i in range(30)]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = build_model(
        dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position=128), tok
    ).eval()
    outs = {}
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        paths = [tmp_path / f"{dev}_L{i}.npy" for i in range(2)]
        extract_batch(m, tok, texts[:8], paths, tmp_path / f"{dev}.npz", max_length=64, shard_dtype="float32")
        outs[dev] = ([np.load(p) for p in paths], token_perplexity(m, tok, texts, seqlen=16)["ppl"])
    for a, b in zip(outs["cpu"][0], outs["cuda"][0]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert outs["cpu"][1] == pytest.approx(outs["cuda"][1], rel=1e-4)
