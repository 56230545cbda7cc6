"""Metrics on known answers: token NLL vs. manual cross-entropy, windowing, ppl/bpb formulas, CIs, correlations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.core.metrics import (
    accuracy,
    bits_per_byte,
    bits_per_token,
    bootstrap_ci,
    bootstrap_diff_ci,
    lm_eval_stream,
    mean_ci,
    pearson,
    perplexity,
    spearman,
    token_nll,
)


class UniformLM(torch.nn.Module):
    """A causal LM whose logits are all zero: p(token) = 1 / vocab everywhere."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def _manual_nll(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]  # (T, V)
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


@pytest.fixture()
def stream() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 99, (90,), generator=g)


def test_token_nll_equals_full_sequence_cross_entropy(tiny_llama, stream):
    expected = _manual_nll(tiny_llama, stream)
    got = token_nll(tiny_llama, stream, window=128)
    assert got.shape == (stream.numel() - 1,)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # numpy input and a tiny batch size give the same values
    torch.testing.assert_close(token_nll(tiny_llama, stream.numpy(), window=128, batch_size=1), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [None, 1, 5, 16, 31, 32, 100])
def test_windowing_scores_each_token_once(tiny_llama, stream, stride):
    window = 32
    full = _manual_nll(tiny_llama, stream)
    got = token_nll(tiny_llama, stream, window=window, stride=stride, batch_size=3)
    assert got.shape == full.shape  # every predicted token exactly once, whatever the stride
    assert torch.isfinite(got).all()
    # tokens inside the first window see the same context as in the full sequence
    torch.testing.assert_close(got[: window - 1], full[: window - 1], rtol=1e-5, atol=1e-5)
    # a sequence that fits in the window: stride is irrelevant
    short = stream[:window]
    torch.testing.assert_close(token_nll(tiny_llama, short, window=window, stride=stride),
                               _manual_nll(tiny_llama, short), rtol=1e-5, atol=1e-5)


def test_stride_one_matches_bruteforce_context(tiny_llama, stream):
    """stride=1: token t is predicted from exactly the previous min(t, window-1) tokens."""
    window = 16
    got = token_nll(tiny_llama, stream, window=window, stride=1, batch_size=8)
    for t in (1, 7, 15, 16, 17, 40, stream.numel() - 1):
        ctx = stream[max(0, t + 1 - window) : t + 1]
        want = _manual_nll(tiny_llama, ctx)[-1]
        assert abs(float(got[t - 1]) - float(want)) < 1e-5, t
    # tokens beyond the first window lose context, so they differ from the full-sequence values
    full = _manual_nll(tiny_llama, stream)
    assert (got[window:] - full[window:]).abs().max() > 1e-4


def test_non_overlapping_windows_share_one_token(stream):
    model = UniformLM(vocab=99)
    token_nll(model, stream, window=32, batch_size=100)
    # 90 tokens, 31 new targets per window: 32 + 31 + 27 -> three windows, all 32 long (batched together)
    assert model.calls == [(3, 32)]


def test_token_nll_restores_training_mode_and_checks_args(tiny_llama, stream):
    tiny_llama.train()
    try:
        token_nll(tiny_llama, stream[:10], window=8)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    with pytest.raises(ValueError, match="window"):
        token_nll(tiny_llama, stream, window=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        token_nll(tiny_llama, torch.randint(3, 99, (300,)), window=256)
    with pytest.raises(ValueError, match="1-D"):
        token_nll(tiny_llama, stream[None], window=8)
    assert token_nll(tiny_llama, stream[:1], window=8).numel() == 0


def test_uniform_logits_give_vocab_size_perplexity(stream):
    vocab = 99
    model = UniformLM(vocab)
    nll = token_nll(model, stream, window=16, stride=5)
    assert torch.allclose(nll, torch.full_like(nll, math.log(vocab)))
    assert perplexity(nll) == pytest.approx(vocab, rel=1e-6)
    assert bits_per_token(nll) == pytest.approx(math.log2(vocab), rel=1e-6)
    res = lm_eval_stream(model, stream, n_bytes=200, window=16, bos_id=1)
    assert res["tokens"] == stream.numel()  # BOS makes the first token scored too
    assert res["ppl"] == pytest.approx(vocab, rel=1e-6)
    assert res["bpb"] == pytest.approx(stream.numel() * math.log2(vocab) / 200, rel=1e-6)
    assert res["stride"] == 15 and res["window"] == 16 and res["bytes"] == 200
    assert set(res) == {"loss", "ppl", "bpb", "tokens", "bytes", "window", "stride"}


def test_lm_eval_stream_matches_token_nll(tiny_llama, stream):
    res = lm_eval_stream(tiny_llama, stream, n_bytes=321, window=40, stride=10)
    nll = token_nll(tiny_llama, stream, window=40, stride=10)
    assert res["tokens"] == stream.numel() - 1
    assert res["loss"] == pytest.approx(float(nll.double().mean()), rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)
    assert res["bpb"] == pytest.approx(float(nll.double().sum()) / (math.log(2) * 321), rel=1e-6)


def test_formulas_on_known_numbers():
    assert bits_per_byte(math.log(2) * 100, 50) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 10) == 0.0
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    assert perplexity([math.log(4), math.log(4)]) == pytest.approx(4.0)
    assert perplexity(np.array([0.0, 2 * math.log(3)])) == pytest.approx(3.0)  # exp(mean), not mean(exp)
    assert bits_per_token(torch.tensor([math.log(8.0)])) == pytest.approx(3.0)


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy(torch.tensor([1, 0]), np.array([0, 0])) == 0.5
    assert accuracy(["a", "b"], ["a", "b"]) == 1.0
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 30)
    big = rng.normal(1.0, 1.0, 3000)
    p1, lo1, hi1 = bootstrap_ci(small)
    p2, lo2, hi2 = bootstrap_ci(big)
    assert lo1 < p1 < hi1 and p1 == pytest.approx(small.mean())
    assert lo2 < p2 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5  # ~ 1/sqrt(100) narrower
    assert lo2 < 1.0 < hi2
    # deterministic for a seed; a non-vectorisable statistic falls back to a loop
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    pm, lom, him = bootstrap_ci(small, stat=lambda v: float(np.median(v)), n=200)
    assert lom <= pm <= him
    # t-interval agrees with the bootstrap on a normal sample
    m, lo, hi = mean_ci(big)
    assert m == pytest.approx(big.mean()) and lo == pytest.approx(lo2, abs=0.02) and hi == pytest.approx(hi2, abs=0.02)
    assert all(math.isnan(x) for x in mean_ci([1.0])[1:])


def test_bootstrap_diff_ci_is_paired():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, 200)  # large item variance shared by both systems
    a, b = base + 0.3 + rng.normal(0, 0.1, 200), base
    point, lo, hi = bootstrap_diff_ci(a, b)
    assert point == pytest.approx(a.mean() - b.mean())
    assert 0 < lo < point < hi  # pairing removes the item variance: the difference is clearly positive
    assert hi - lo < 0.1
    with pytest.raises(ValueError):
        bootstrap_diff_ci([1, 2], [1])


def test_correlations_known_values():
    x = [1, 2, 3, 4, 5]
    assert pearson(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert pearson(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(x, [1, 4, 9, 16, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, [1, 4, 9, 16, 100]) < 0.95
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1], [2])
