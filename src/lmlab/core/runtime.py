"""Seed, device, dtype and threads: the few runtime knobs every command shares."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LmlabError(f"device {name!r} requested but MPS is not available")
    return dev


def pick_dtype(name: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` -> bf16 on CUDA devices that support it, else fp32 (CPU math stays fp32 by default)."""
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def set_threads(n: int | None) -> int:
    """Set torch intra-op threads (None keeps torch's default); returns the number in use."""
    if n is not None:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return torch.get_num_threads()


def setup(seed: int = 0, device: str = "auto", dtype: str = "auto", threads: int | None = None
          ) -> tuple[torch.device, torch.dtype, int]:
    """Apply the common runtime flags; returns (device, dtype, threads)."""
    nthreads = set_threads(threads)
    seed_everything(seed)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    log.debug("runtime: device=%s dtype=%s threads=%d seed=%d", dev, dt, nthreads, seed)
    return dev, dt, nthreads
