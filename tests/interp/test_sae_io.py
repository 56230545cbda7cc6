"""SAE file layouts: Llama Scope reader against the paper's inference formula; SAELens interop (bench extra)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lmlab.interp.sae import SAE, load_sae, save_sae


def _llama_scope_dir(tmp_path, act_fn="jumprelu"):
    g = torch.Generator().manual_seed(0)
    d, n = 16, 64
    w = {"encoder.weight": torch.randn(n, d, generator=g) * 0.3, "encoder.bias": torch.randn(n, generator=g) * 0.1,
         "decoder.weight": torch.randn(d, n, generator=g) * 0.2, "decoder.bias": torch.randn(d, generator=g) * 0.1}
    (tmp_path / "checkpoints").mkdir(parents=True)
    save_file(w, str(tmp_path / "checkpoints" / "final.safetensors"))
    hp = {"d_model": d, "d_sae": n, "hook_point_in": "blocks.3.hook_resid_post",
          "hook_point_out": "blocks.3.hook_resid_post", "act_fn": act_fn, "top_k": 6, "jump_relu_threshold": 0.35,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 7.5, "out": 9.0},
          "sparsity_include_decoder_norm": True}
    (tmp_path / "hyperparams.json").write_text(json.dumps(hp))
    return w, hp


def test_llama_scope_layout_matches_the_inference_formula(tmp_path):
    w, hp = _llama_scope_dir(tmp_path)
    sae = load_sae(tmp_path)
    assert sae.architecture == "jumprelu" and sae.hook_name == "blocks.3.hook_resid_post" and sae.k == 6
    x = torch.randn(200, 16) * 3
    s_in, s_out = math.sqrt(16) / 7.5, math.sqrt(16) / 9.0
    h = (x * s_in) @ w["encoder.weight"].T + w["encoder.bias"]  # (N, d_sae)
    norms = w["decoder.weight"].norm(dim=0)  # (d_sae,)
    f = h.relu() * ((h.relu() * norms) > 0.35)
    ref = (f @ w["decoder.weight"].T + w["decoder.bias"]) / s_out
    assert torch.allclose(sae(x), ref, atol=1e-4)
    assert ((sae.encode(x) != 0) == (f != 0)).all()


def test_llama_scope_topk_layout(tmp_path):
    w, _ = _llama_scope_dir(tmp_path, act_fn="topk")
    sae = load_sae(tmp_path)
    x = torch.randn(50, 16)
    s_in, s_out = math.sqrt(16) / 7.5, math.sqrt(16) / 9.0
    h = (x * s_in) @ w["encoder.weight"].T + w["encoder.bias"]
    norms = w["decoder.weight"].norm(dim=0)
    idx = (h.relu() * norms).topk(6, dim=-1).indices
    f = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx).relu())
    ref = (f @ w["decoder.weight"].T + w["decoder.bias"]) / s_out
    assert torch.allclose(sae(x), ref, atol=1e-4)


@pytest.mark.slow
def test_saelens_reads_lmlab_saes_and_back(tmp_path):
    """SAELens (bench extra) loads an lmlab SAE with identical outputs; lmlab loads a SAELens-saved SAE."""
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    ours = SAE(16, 64, 5, hook_name="blocks.0.hook_resid_post", model_name="m").init_llama_scope(0.5)
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.1)
        ours.W_dec.mul_(torch.rand(64, 1) + 0.5)
    ours.fold()
    save_sae(ours, tmp_path / "a")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "a"), device="cpu")
    x = torch.randn(30, 16)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
        theirs.save_model(str(tmp_path / "b"))
    back = load_sae(tmp_path / "b")
    assert torch.allclose(back(x), ours(x), atol=1e-5) and back.hook_name == "blocks.0.hook_resid_post"
