"""Paired bits/byte differences (per-chunk bits on the same text): consistency with EvalSet.evaluate, the
standard-error formula, and a real degradation showing up as a positive difference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lmlab.compress import quant


@pytest.fixture(scope="module")
def setup(ref_zoo, tiny_corpus):
    from lmlab.core.models import load

    torch.manual_seed(0)
    model, tok = load("ref:dense")
    return model, quant.EvalSet.build(tok, "code,prose", 600, window=32)


def test_chunk_bits_sum_to_evaluate_bpb(setup):
    model, ev = setup
    ch = ev.chunk_bits(model)
    bpb = np.mean([ch[n].sum() / nb for n, (_, nb) in ev.streams.items()])
    assert bpb == pytest.approx(ev.evaluate(model)["bpb"], rel=1e-5)
    for n, (ids, _) in ev.streams.items():
        assert ch[n].size == math.ceil((ids.size - 1) / (ev.window - 1))


def test_paired_diff_formula_on_known_chunks():
    ev = quant.EvalSet({"a": (np.zeros(10, dtype=np.int64), 100), "b": (np.zeros(10, dtype=np.int64), 50)})
    a = {"a": np.array([3.0, 5.0, 4.0]), "b": np.array([2.0, 2.0])}
    b = {"a": np.array([1.0, 1.0, 1.0]), "b": np.array([1.0, 0.0])}
    r = quant.paired_bpb_diff(a, b, ev)
    # diffs: a -> [2, 4, 3] sum 9 / 100; b -> [1, 2] sum 3 / 50
    assert r["diff"] == pytest.approx((0.09 + 0.06) / 2)
    se_a = math.sqrt(3 * np.var([2, 4, 3], ddof=1)) / 100
    se_b = math.sqrt(2 * np.var([1, 2], ddof=1)) / 50
    assert r["se"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)
    same = quant.paired_bpb_diff(a, a, ev)
    assert same["diff"] == 0 and same["se"] == 0


def test_paired_diff_sees_a_real_degradation(setup):
    model, ev = setup
    bad = copy.deepcopy(model)
    with torch.no_grad():
        for lin in quant.find_linears(bad, quant.DEFAULT_MODULES).values():
            lin.weight.copy_(quant.rtn_quantize(lin.weight, 1, 0))
    r = quant.paired_bpb_diff(ev.chunk_bits(bad), ev.chunk_bits(model), ev)
    assert r["diff"] == pytest.approx(ev.evaluate(bad)["bpb"] - ev.evaluate(model)["bpb"], rel=1e-4)
    assert r["se"] > 0
