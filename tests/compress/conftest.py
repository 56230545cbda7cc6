"""Fixtures for the compression tests: a calibration text file and a small BitStack of the tiny ref:dense."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_file(tiny_corpus, tmp_path_factory) -> Path:
    """tiny_corpus's documents as one UTF-8 text file (calibration / sorting / evaluation text)."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text("\n\n".join(tiny_corpus.texts("train") + tiny_corpus.texts("val")))
    return p


@pytest.fixture(scope="session")
def small_stack(ref_zoo, text_file, tmp_path_factory) -> Path:
    """``lmlab compress bitstack`` on the tiny random ref:dense: 3 blocks per linear, text-file calibration."""
    import torch

    from lmlab.compress import bitstack as bs

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("stack") / "stack"
    return bs.main(bs.BitStackConfig(out=str(out), niter=3, calib=str(text_file), calib_samples=4,
                                     sort_samples=2, seqlen=32, threads=1))
