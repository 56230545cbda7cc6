"""Top-K SAE maths: sparse kernels match dense autograd, invariants, schedules, synthetic dictionary recovery."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.interp.sae import SAE, fvu, k_schedule, lr_factor, topk_select, train_step


def _dense_reference_loss(sae: SAE, x: torch.Tensor, k: int, dead: torch.Tensor | None, k_aux: int,
                          coef: float) -> torch.Tensor:
    """The same loss written with dense tensors and plain autograd (no custom kernels)."""
    xs = x * sae.scale_in
    pre = xs @ sae.W_enc + sae.b_enc
    n = sae.W_dec.norm(dim=1).detach()
    idx = (pre.detach().relu() * n).topk(k, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    y_hat = f @ sae.W_dec + sae.b_dec
    loss = fvu(y_hat, xs)
    if dead is not None and dead.any():
        m = min(k_aux, int(dead.sum()))
        masked = pre.detach().masked_fill(~dead, -float("inf"))
        aidx = masked.topk(m, dim=-1).indices
        fa = torch.zeros_like(pre).scatter(-1, aidx, pre.gather(-1, aidx).relu())
        loss = loss + coef * fvu(fa @ sae.W_dec, (xs - y_hat).detach())
    return loss


@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_kernels_match_dense_autograd(with_aux):
    torch.manual_seed(0)
    sae = SAE(16, 64, 4).init_llama_scope(0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # unequal decoder norms: the selection depends on them
    sae.scale_in.fill_(1.3)
    sae.scale_out.fill_(1.3)
    x = torch.randn(40, 16)
    dead = (torch.arange(64) % 3 == 0) if with_aux else None
    out = train_step(sae, x, x, 4, dead, 8, 0.5)
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = _dense_reference_loss(sae, x, 4, dead, 8, 0.5)
    ref.backward()
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for n, p in sae.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_exactly_k_nonzeros_per_token():
    sae = SAE(8, 32, 5).init_llama_scope(0.5)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive, so ReLU cannot remove a selected latent
    f = sae.encode(torch.randn(3, 7, 8))
    assert f.shape == (3, 7, 32)
    assert ((f != 0).sum(-1) == 5).all()
    vals, idx = topk_select(torch.randn(10, 32), 5)
    assert vals.shape == idx.shape == (10, 5) and (vals >= 0).all()


def test_fvu_is_one_for_a_zero_decoder():
    sae = SAE(8, 32, 4).init_llama_scope(0.5)
    with torch.no_grad():
        sae.W_dec.zero_()
    x = torch.randn(100, 8) + 3.0
    sae.b_dec.data = x.mean(0)  # the best constant: FVU exactly 1
    assert float(fvu(sae(x), x).detach()) == pytest.approx(1.0, abs=1e-5)
    assert float(fvu(x, x)) == 0.0


def test_normalization_and_decoder_norm_folding_leave_outputs_unchanged():
    torch.manual_seed(1)
    sae = SAE(12, 48, 6).init_llama_scope(0.5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) * 2 + 0.1)
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.uniform_(0, 0.5)
    sae.scale_in.fill_(3.7)
    sae.scale_out.fill_(0.4)
    x = torch.randn(50, 12)
    before = sae(x)
    sae.architecture = "jumprelu"
    before_j = sae(x)
    sae.architecture = "topk"
    sae.fold()
    assert float(sae.scale_in) == 1.0 and torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert torch.allclose(sae(x), before, atol=1e-4)
    sae.architecture = "jumprelu"
    assert torch.allclose(sae(x), before_j, atol=1e-4)


def test_k_and_lr_schedules():
    assert k_schedule(0, 1000, 8, 64) == 64
    assert k_schedule(50, 1000, 8, 64) == 36  # halfway through the 100 annealing steps
    assert k_schedule(100, 1000, 8, 64) == 8 and k_schedule(999, 1000, 8, 64) == 8
    assert lr_factor(0, 1000, 10) == pytest.approx(0.1)
    assert lr_factor(500, 1000, 10) == 1.0
    assert lr_factor(999, 1000, 10) == pytest.approx(0.01, abs=0.01)


def test_k_larger_than_dictionary_is_refused():
    with pytest.raises(LmlabError, match="k=40"):
        SAE(8, 32, 40)


def test_synthetic_dictionary_recovery():
    """Activations from known sparse codes through a known dictionary: the SAE finds the true directions."""
    g = torch.Generator().manual_seed(0)
    d, m = 32, 64
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    codes = (torch.rand(60_000, m, generator=g) < 0.04).float() * (0.5 + 2 * torch.rand(60_000, m, generator=g))
    X = codes @ D  # (N, d)
    sae = SAE(d, 128, 4).init_llama_scope(0.5, torch.Generator().manual_seed(0))
    sae.scale_in.fill_(math.sqrt(d) / float(X.norm(dim=1).mean()))
    sae.scale_out.copy_(sae.scale_in)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.9, 0.9999))
    since = torch.zeros(128)
    steps, bs = 400, 512
    for s in range(steps):
        x = X[torch.randint(0, X.shape[0], (bs,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = 3e-3 * lr_factor(s, steps, 30)
        out = train_step(sae, x, x, k_schedule(s, steps, 4, 16), since > 10_000, 16)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        since += bs
        since[out["idx"].reshape(-1)] = 0
    sae.fold()
    cos = (D @ sae.W_dec.detach().T).max(1).values  # unit rows after folding
    assert float(cos.mean()) >= 0.9, float(cos.mean())
