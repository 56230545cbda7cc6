"""The training loop: golden losses, exact resume, schedule, checkpoint format (no pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from lmlab.config import ConfigError
from lmlab.core.pretrain import OptimConfig, eval_windows, evaluate, lr_at, sample_batch, train

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pretrain_losses.json"
OPT = OptimConfig(steps=5, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=0, log_every=1)


def _ids(n: int = 5000) -> np.ndarray:
    # a learnable stream: a repeated random "sentence" of 50 tokens plus noise tokens
    rng = np.random.default_rng(0)
    base = rng.integers(3, 99, 50)
    out = np.concatenate([base if rng.random() < 0.8 else rng.integers(3, 99, 50) for _ in range(n // 50)])
    return out.astype(np.uint16)


def test_golden_losses():
    """5 steps of the tiny Llama from seed 0 reproduce the pinned losses (regenerate: LMLAB_UPDATE_GOLDEN=1)."""
    st = train(make_tiny_llama(), _ids(), None, OPT, seed=0, progress=False)
    assert len(st.losses) == 5
    if os.environ.get("LMLAB_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"losses": st.losses}, indent=2) + "\n")
    pinned = json.loads(GOLDEN.read_text())["losses"]
    np.testing.assert_allclose(st.losses, pinned, rtol=1e-4)


def test_loss_decreases_and_every_param_changes():
    model = make_tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = OptimConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=0)
    st = train(model, _ids(), None, opt, seed=0, progress=False)
    assert np.mean(st.losses[-5:]) < np.mean(st.losses[:5]) - 0.5
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} did not change"


def test_resume_is_exact(tmp_path):
    ids = _ids()
    full = train(make_tiny_llama(), ids, ids[:1000], OPT, seed=0, progress=False)
    ck = tmp_path / "ck"
    part = train(make_tiny_llama(), ids, ids[:1000], OPT, seed=0, ckpt_dir=ck, stop_after=3, progress=False)
    assert len(part.losses) == 3
    # checkpoint holds only safetensors + JSON
    files = {p.suffix for p in ck.rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}, files
    torch.manual_seed(1234)  # a different global RNG state must not matter
    resumed = train(make_tiny_llama(), ids, ids[:1000], OPT, seed=0, ckpt_dir=ck, progress=False)
    assert resumed.losses[:3] == part.losses
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=0, atol=0)


def test_lr_schedule():
    opt = OptimConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, opt) == pytest.approx(0.1)
    assert lr_at(9, opt) == pytest.approx(1.0)
    assert lr_at(10, opt) == pytest.approx(1.0)
    assert lr_at(55, opt) == pytest.approx(0.55)
    assert lr_at(100, opt) == pytest.approx(0.1)
    lrs = [lr_at(s, opt) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_batches_and_eval_windows():
    ids = np.arange(1000, dtype=np.uint16)
    b = sample_batch(ids, 4, 16, np.random.default_rng(0))
    assert b.shape == (4, 17) and b.dtype == torch.long
    assert torch.all(b[:, 1:] - b[:, :-1] == 1)  # contiguous windows
    w = eval_windows(ids, 3, 16)
    assert w.shape == (3, 17) and w[1, 0] == 16
    with pytest.raises(ConfigError):
        sample_batch(ids[:10], 2, 16, np.random.default_rng(0))
    loss = evaluate(make_tiny_llama(), w.clamp_max(98), batch_size=2)
    assert 3.0 < loss < 6.0  # ~ln(99) for a random model


def test_config_validation():
    with pytest.raises(ConfigError):
        OptimConfig(steps=0)
    with pytest.raises(ConfigError):
        OptimConfig(lr=0.0)
