"""CUDA parity checks: the same code path gives the CPU's numbers on a GPU (``pytest -m gpu tests/gpu``).

Skipped without CUDA. Each test runs one piece of lmlab on both devices in float32 and compares, so a CUDA-only
bug (a CPU-only op, a device mismatch, a missing synchronize) fails loudly instead of silently changing numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# LMLAB_TEST_GPU_DEVICE=cpu dry-runs these tests' own logic (CPU against CPU) on a machine without a GPU.
CUDA = os.environ.get("LMLAB_TEST_GPU_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 parity: TF32 matmuls would add ~1e-3 relative noise on Ampere+ GPUs.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("arch", ["dense", "mamba"])
def test_reference_model_loss_matches_cpu(arch):
    from lmlab.core.models import load_model
    from lmlab.core.pretrain import lm_loss

    batch = torch.randint(0, 2000, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = {}
    for dev in ("cpu", CUDA):
        model = load_model(f"ref:{arch}", device=dev, dtype=torch.float32).eval()
        with torch.no_grad():
            losses[dev] = lm_loss(model, batch.to(dev)).item()
    assert np.isfinite(losses["cpu"]) and losses["cpu"] > 0
    assert abs(losses["cpu"] - losses[CUDA]) < 1e-3 * losses["cpu"], losses


def test_pretrain_steps_on_cuda_match_cpu():
    from conftest import make_tiny_llama

    from lmlab.core.pretrain import OptimConfig, train

    ids = np.random.default_rng(0).integers(3, 99, size=20_000).astype(np.int32)
    opt = OptimConfig(steps=5, batch_size=4, seq_len=32, lr=3e-3, warmup=1, eval_every=0, log_every=1)
    finals = {}
    for dev in ("cpu", CUDA):
        model = make_tiny_llama().to(dev)
        before = [p.detach().clone() for p in model.parameters()]
        state = train(model, ids, None, opt, progress=False)
        after = list(model.parameters())
        assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after)), "a parameter did not change"
        finals[dev] = [p.detach().cpu() for p in after]
        assert state is not None
    for a, b in zip(finals["cpu"], finals[CUDA]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_sae_forward_and_step_match_cpu():
    from lmlab.interp.sae import SAE, train_step

    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    outs = {}
    for dev in ("cpu", CUDA):
        torch.manual_seed(0)
        sae = SAE(32, 128, k=8).to(dev)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(128, 32, generator=torch.Generator().manual_seed(2)) * 0.1)
            sae.W_enc.copy_(sae.W_dec.T)
        xd = x.to(dev)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.9999))
        out = train_step(sae, xd, xd, 8)
        assert out["idx"].shape == (256, 8)
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            outs[dev] = sae(xd).cpu()
    torch.testing.assert_close(outs["cpu"], outs[CUDA], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("rectify", [(), ("intra-gpu", "fill-in")])
def test_moe_layer_matches_cpu(rectify):
    from lmlab.train.moe import RECTIFICATIONS, MoELayer, MoESettings

    assert set(rectify) <= set(RECTIFICATIONS)
    s = MoESettings(experts=8, top_k=2, capacity_factor=1.0, rectify=rectify, groups=4)
    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(3))
    outs, grads, stats = {}, {}, {}
    for dev in ("cpu", CUDA):
        torch.manual_seed(0)
        layer = MoELayer(64, 128, s).to(dev)
        xd = x.to(dev).requires_grad_(True)
        y = layer(xd)
        y.square().mean().backward()
        outs[dev], grads[dev] = y.detach().cpu(), layer.router.weight.grad.cpu()
        stats[dev] = {k: int(v) for k, v in layer.stats.items() if k in ("dropped", "slots", "filled")}
    assert stats["cpu"] == stats[CUDA]
    torch.testing.assert_close(outs["cpu"], outs[CUDA], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["cpu"], grads[CUDA], rtol=1e-3, atol=1e-5)


def test_bitstack_decomposition_matches_cpu():
    from lmlab.compress.bitstack import avd_decompose, reconstruct

    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
    rec = {}
    for dev in ("cpu", CUDA):
        blocks, residuals = avd_decompose(W.to(dev), niter=4, k=4)
        assert all(b <= a + 1e-6 for a, b in zip(residuals, residuals[1:])), residuals
        rec[dev] = reconstruct(blocks, tuple(W.shape)).float().cpu()
    err = {d: ((W - r).norm() / W.norm()).item() for d, r in rec.items()}
    assert err["cpu"] < 1.0 and abs(err["cpu"] - err[CUDA]) < 1e-2, err
