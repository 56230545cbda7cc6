"""RTN and GPTQ baselines: error bounds, bit accounting, GPTQ beats RTN on its own objective, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.compress import quant
from lmlab.errors import LmlabError


def test_rtn_error_within_half_a_step_and_exact_levels():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    for bits in (1, 2, 4, 8):
        Q = quant.rtn_quantize(W, bits, 16)
        Wg = W.reshape(8, 4, 16)
        scale = (Wg.amax(-1).clamp(min=0) - Wg.amin(-1).clamp(max=0)) / (2**bits - 1)  # (8, 4)
        err = (W - Q).abs().reshape(8, 4, 16)
        assert (err <= scale[..., None] / 2 + 1e-6).all()
        assert all(len(torch.unique(Q.reshape(8, 4, 16)[i, j])) <= 2**bits for i in range(8) for j in range(4))
    assert torch.allclose(quant.rtn_quantize(W, 16, 0), W, atol=1e-3)


def test_bits_per_param_formula():
    assert quant.quant_bits_per_param(4, 128, 4096) == pytest.approx(4 + 20 / 128)
    assert quant.quant_bits_per_param(2, 0, 192) == pytest.approx(2 + 18 / 192)
    assert quant.effective_group(128, 192) == 0 and quant.effective_group(64, 192) == 64


def test_gptq_beats_rtn_on_the_layer_objective():
    torch.manual_seed(0)
    n, m, N = 64, 32, 2048
    X = torch.randn(N, n) @ (torch.randn(n, n) * 0.3 + torch.eye(n))  # correlated inputs
    W = torch.randn(m, n)
    H = 2 / N * X.T.double() @ X.double()
    for bits, g in ((2, 0), (3, 16), (4, 32)):
        q_rtn = quant.rtn_quantize(W, bits, g)
        q_gptq = quant.gptq_quantize(W, H, bits, g, blocksize=16)
        e_rtn = torch.linalg.norm((W - q_rtn) @ X.T)
        e_gptq = torch.linalg.norm((W - q_gptq) @ X.T)
        assert e_gptq < 0.9 * e_rtn, (bits, g, float(e_gptq), float(e_rtn))


def test_gptq_with_identity_hessian_is_rtn_for_per_row():
    torch.manual_seed(1)
    W = torch.randn(4, 32)
    H = torch.eye(32, dtype=torch.float64)
    assert torch.allclose(quant.gptq_quantize(W, H, 3, 0, percdamp=0.0), quant.rtn_quantize(W, 3, 0), atol=1e-5)


def test_parse_bytes_and_find_linears_errors(tiny_gpt2):
    with pytest.raises(LmlabError):
        quant.parse_bytes("-3MB")
    with pytest.raises(LmlabError, match="no decomposable"):
        quant.find_linears(tiny_gpt2, quant.DEFAULT_MODULES)  # GPT-2 uses Conv1D


def test_quant_main_rtn_and_gptq(ref_zoo, text_file, tmp_path):
    for method in ("rtn", "gptq"):
        out = quant.main(quant.QuantConfig(method=method, bits=[2, 8], group_size=16, calib=str(text_file),
                                           calib_samples=4, seqlen=32, eval_data=str(text_file), max_tokens=256,
                                           out=str(tmp_path / method)))
        res = json.loads((out / "results.json").read_text())
        r2, r8 = res["runs"]
        assert r2["bits_per_param"] == pytest.approx(2 + 18 / 16) and r2["total_bytes"] < r8["total_bytes"]
        assert abs(r8["bpb"] - res["fp"]["bpb"]) < 0.02  # 8 bits is near lossless
        assert r2["bpb"] != r8["bpb"]
