"""BitStack maths on synthetic tensors: sign packing, AVD residuals, the Gaussian 1-2/pi law, orders."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.compress import bitstack as bs


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 9), (8, 8), (13, 1)])
def test_sign_pack_roundtrip_odd_sizes(shape):
    R = torch.randn(shape)
    R.view(-1)[0] = 0.0  # sign(0) -> +1
    if R.numel() > 1:
        R.view(-1)[1] = -0.0
    packed = bs.pack_signs(R)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(R.numel() / 8)
    S = bs.unpack_signs(packed, shape)
    want = torch.where(R >= 0, 1.0, -1.0)
    assert torch.equal(S, want)
    assert S.view(-1)[0] == 1.0


def test_sign_pack_msb_first():
    R = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1, 1])  # bits 1000 0001 | 1 (padded 1000 0000)
    assert bs.pack_signs(R).tolist() == [0b10000001, 0b10000000]


def test_gaussian_first_block_leaves_one_minus_two_over_pi():
    torch.manual_seed(0)
    W = torch.randn(256, 256)
    _, norms = bs.avd_decompose(W, 1, 1)
    ratio = norms[1] ** 2 / norms[0] ** 2
    assert abs(ratio - 0.36) < 0.02, ratio
    assert abs(ratio - (1 - 2 / math.pi)) < 0.02


def test_residual_never_increases_with_stored_fp16_factors():
    torch.manual_seed(1)
    W = torch.randn(48, 80) * torch.rand(80)[None, :] * 3  # uneven columns, like scaled weights
    blocks, norms = bs.avd_decompose(W, 8, 2)
    assert all(b <= a + 1e-6 for a, b in zip(norms, norms[1:])), norms
    # the norms are those of W minus the reconstruction from the *stored* fp16 factors
    for n in range(1, 9):
        R = W - bs.reconstruct(blocks[:n], tuple(W.shape))
        assert abs(float(torch.linalg.norm(R)) - norms[n]) < 1e-3 * norms[0]
    u, vt = blocks[0][1], blocks[0][2]
    assert u.dtype == torch.float16 and u.shape == (48, 2) and vt.shape == (2, 80)


def test_block_bytes_and_default_k():
    assert bs.default_k(4096, 4096) == 16 and bs.default_k(128, 128) == 1
    assert bs.block_bytes(4096, 4096, 16) == 4096 * 4096 // 8 + 2 * 16 * 8192  # 2.25 MiB
    assert bs.block_bytes(4096, 4096, 16) == int(2.25 * 2**20)
    assert bs.block_bytes(3, 5, 1) == 2 + 2 * 8  # ceil(15/8) bytes of signs


def test_scaled_reconstruction_undoes_the_scale():
    torch.manual_seed(2)
    W = torch.randn(16, 24)
    s = torch.rand(24) + 0.5
    blocks, _ = bs.avd_decompose(W * s.half().float(), 12, 4)
    err = torch.linalg.norm(W - bs.reconstruct(blocks, (16, 24), s.half())) / torch.linalg.norm(W)
    assert err < 0.05


def _check_nested(order, n, niter):
    c = [1] * n
    for j in order:
        c[j] += 1
        assert c[j] <= niter
    assert c == [niter] * n


def test_average_order_levels_and_max_difference_one():
    scores = [[3.0, 1.0, 2.0], [1.0, float("nan"), 0.5]]
    order = bs.order_average(scores)
    assert order == [1, 2, 0, 2, 0, 1]  # NaN sorts last within its level
    c = [1, 1, 1]
    for j in order:
        c[j] += 1
        assert max(c) - min(c) <= 1
    _check_nested(order, 3, 3)


def test_greedy_and_random_orders_are_valid_prefix_orders():
    scores = [[3.0, 1.0, 2.0], [0.5, 9.0, 0.7], [0.1, 0.2, 0.3]]
    g = bs.order_greedy(scores)
    _check_nested(g, 3, 4)
    assert g[0] == 1  # the best first-level candidate comes first
    r = bs.order_random(3, 3, seed=0)
    _check_nested(r, 3, 4)
    assert r != bs.order_average(scores) or r == bs.order_random(3, 3, seed=0)


def test_size_table_and_pick_steps():
    sizes = bs.size_table(100, [10, 20], [0, 1, 0])
    assert sizes == [100, 110, 130, 140]
    assert bs.pick_steps(sizes, 129) == 1 and bs.pick_steps(sizes, 130) == 2 and bs.pick_steps(sizes, 99) == -1
    assert bs.counts_at([0, 1, 0], 2, 3) == [3, 2]


def test_avd_block_factors_are_contiguous_for_k_above_one():
    torch.manual_seed(0)
    for k in (1, 2, 5):
        _, u, vt, _ = bs.avd_block(torch.randn(24, 40), k)
        assert u.shape == (24, k) and vt.shape == (k, 40)
        assert u.is_contiguous() and vt.is_contiguous()  # safetensors refuses non-contiguous tensors
