"""lmlab.core.runtime: seeding, device and dtype selection, threads."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from lmlab.config import RunArgs
from lmlab.core.runtime import DTYPES, pick_device, pick_dtype, seed_everything, set_threads, setup
from lmlab.errors import LmlabError


def draw() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_seed_everything_reproduces_python_numpy_torch():
    seed_everything(123)
    a = draw()
    seed_everything(123)
    b = draw()
    assert a == b
    seed_everything(124)
    c = draw()
    assert a[0] != c[0] and a[1] != c[1] and a[2] != c[2]  # each library is seeded, not just one


def test_seed_everything_accepts_seeds_beyond_numpy_range():
    seed_everything(2**40 + 5)  # numpy only takes < 2**32
    a = draw()
    seed_everything(2**40 + 5)
    assert draw() == a


def test_pick_device_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    assert isinstance(pick_device("auto"), torch.device)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device("auto").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_pick_device_cuda_unavailable_raises(name):
    with pytest.raises(LmlabError, match="CUDA is not available"):
        pick_device(name)


def test_pick_dtype_mapping():
    assert pick_dtype("float32") is torch.float32
    assert pick_dtype("fp32") is torch.float32
    assert pick_dtype("bfloat16") is pick_dtype("bf16") is torch.bfloat16
    assert pick_dtype("float16") is pick_dtype("fp16") is torch.float16
    assert pick_dtype("auto", "cpu") is torch.float32
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32


def test_pick_dtype_unknown_lists_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int8'") as e:
        pick_dtype("int8")
    assert "bfloat16" in str(e.value) and "float32" in str(e.value)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_runtime_dtype_is_a_valid_config_value(name):
    assert RunArgs(dtype=name).dtype == name  # config validation and runtime agree on names


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads(restore_threads):
    assert set_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert set_threads(None) == 2  # None keeps the current setting
    assert set_threads(1) == 1 and torch.get_num_threads() == 1


def test_setup_applies_everything(restore_threads):
    dev, dt, n = setup(seed=5, device="cpu", dtype="bf16", threads=1)
    assert (dev, dt, n) == (torch.device("cpu"), torch.bfloat16, 1)
    a = draw()
    setup(seed=5, device="cpu", dtype="bf16", threads=1)
    assert draw() == a
