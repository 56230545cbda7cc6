"""Data-free joint rank-k: Eckart-Young optimum, rank formula, HF module replacement, shared Bx, composition."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmlab.compress import rankk


def test_single_matrix_is_the_eckart_young_optimum():
    torch.manual_seed(0)
    W = torch.randn(40, 24)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for k in (1, 5, 12):
        (A,), B = rankk.joint_rank_k([W], k)
        approx = A @ B
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        assert torch.allclose(approx, best, atol=1e-4)
        assert float(torch.linalg.norm(W - approx)) == pytest.approx(float(S[k:].pow(2).sum().sqrt()), rel=1e-4)


def test_joint_is_optimal_for_the_stacked_matrix():
    torch.manual_seed(1)
    Ws = [torch.randn(16, 32), torch.randn(24, 32)]
    As, B = rankk.joint_rank_k(Ws, 6)
    stacked = torch.cat(Ws)
    S = torch.linalg.svdvals(stacked)
    err = torch.linalg.norm(stacked - torch.cat(As) @ B)
    assert float(err) == pytest.approx(float(S[6:].pow(2).sum().sqrt()), rel=1e-4)
    assert torch.allclose(B @ B.T, torch.eye(6), atol=1e-5)  # orthonormal shared basis


def test_rank_for_keep():
    assert rankk.rank_for_keep(0.8, 4096, [4096, 4096]) == int(0.8 * 4096 * 8192 / 12288)
    assert rankk.rank_for_keep(0.2, 4096, [4096]) == 409
    assert rankk.rank_for_keep(1e-6, 8, [8]) == 1


def test_full_rank_replacement_keeps_logits_and_shares_bx(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    acct = rankk.compress_model(m, ["qkv", "gate_up"], keep=2.0, mode="joint")  # k clipped to full rank
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert acct["params_after"] > 0 and all(isinstance(m.get_submodule(f"model.layers.0.self_attn.{p}"),
                                                       rankk.LowRankLinear) for p in ("q_proj", "k_proj", "v_proj"))
    layer = m.model.layers[0].self_attn
    assert layer.q_proj.proj is layer.k_proj.proj is layer.v_proj.proj
    calls = []
    h = layer.q_proj.proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want, got = tiny_llama(input_ids=x).logits, m(input_ids=x).logits
    h.remove()
    # full rank (k = d_in for qkv of width 32) reproduces the model; Bx computed once per forward
    assert torch.allclose(want, got, atol=1e-4)
    assert len(calls) == 3  # the module is called by q, k and v; its cached output is reused (see below)


def test_shared_projection_computes_once():
    proj = rankk.SharedProjection(torch.randn(4, 8))
    x = torch.randn(2, 8)
    n = [0]
    orig = torch.nn.functional.linear

    def counting(*a, **k):
        n[0] += 1
        return orig(*a, **k)

    torch.nn.functional.linear = counting
    try:
        with torch.no_grad():
            a, b = proj(x), proj(x)
            c = proj(x.clone())
    finally:
        torch.nn.functional.linear = orig
    assert torch.equal(a, b) and torch.equal(a, c)
    assert n[0] == 2  # the same input tensor reuses Bx; a new tensor recomputes


def test_separate_vs_joint_params_and_compositions(tiny_llama):
    j = rankk.compress_model(copy.deepcopy(tiny_llama), ["gate_up"], 0.5, "joint")
    s = rankk.compress_model(copy.deepcopy(tiny_llama), ["gate_up"], 0.5, "separate")
    assert abs(j["params_after"] - s["params_after"]) <= 0.1 * s["params_after"]
    assert j["params_after"] <= 0.5 * j["params_before"] + 64
    q = rankk.compress_model(copy.deepcopy(tiny_llama), ["gate_up"], 0.5, "joint", rtn_bits=4, rtn_group=16)
    assert q["bytes_after"] < j["bytes_after"] / 2.5  # 4-bit codes + per-row scales of rank-11 factors
    p = rankk.compress_model(copy.deepcopy(tiny_llama), ["gate_up"], 0.5, "joint", prune=0.5)
    assert p["bytes_after"] == pytest.approx(j["bytes_after"] / 2, rel=0.01)


def test_magnitude_prune():
    t = torch.tensor([[0.1, -3.0], [2.0, -0.2]])
    assert torch.equal(rankk.magnitude_prune(t, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))


def test_rankk_main(ref_zoo, text_file, tmp_path):
    out = rankk.main(rankk.RankKConfig(keep=[0.9, 0.3], eval_data=str(text_file), max_tokens=256,
                                       out=str(tmp_path / "r")))
    res = json.loads((out / "results.json").read_text())
    rows = {(r["mode"], r["keep"]): r for r in res["runs"]}
    assert len(rows) == 4 and rows[("joint", 0.3)]["total_bytes"] < rows[("joint", 0.9)]["total_bytes"]
    assert (out / "plots" / "rankk.png").is_file()
