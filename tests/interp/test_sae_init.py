"""Centre initialisation of the decoder bias (``init_b_dec``): geometric median, centred first encoder."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.interp.sae import B_DEC_INITS, SAE, SAETrainConfig, geometric_median


def test_geometric_median_is_robust_and_minimises_distance_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g) * 0.1 + torch.tensor([1.0, -2.0, 0.5])
    x_out = torch.cat([x, torch.full((40, 3), 100.0)])  # 10% far outliers drag the mean, not the median
    m = geometric_median(x_out)
    assert (m - torch.tensor([1.0, -2.0, 0.5])).norm() < 0.1
    assert (x_out.mean(0) - torch.tensor([1.0, -2.0, 0.5])).norm() > 5
    cost = (x_out - m).norm(dim=1).sum()
    for _ in range(20):  # no nearby point does better
        assert (x_out - (m + 0.05 * torch.randn(3, generator=g))).norm(dim=1).sum() >= cost - 1e-3


@pytest.mark.parametrize("how", ["mean", "geometric_median"])
def test_init_centre_centres_the_first_encoder(how):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g) + 3.0  # far from the origin
    sae = SAE(8, 32, 4).init_llama_scope(0.5, g)
    sae.scale_in.fill_(0.5)
    sae.scale_out.fill_(0.5)
    sae.init_centre(x, x, B_DEC_INITS[how])
    c = B_DEC_INITS[how](x * 0.5)
    assert torch.allclose(sae.b_dec, c, atol=1e-5)
    # h = W_E x~ + b_E equals W_E (x~ - b_D): the encoder sees centred inputs at step 0
    assert torch.allclose(sae.pre_acts(x), (x * 0.5 - c) @ sae.W_enc, atol=1e-4)
    # a zero code reconstructs the centre, so FVU at f = 0 is ~1 instead of >> 1
    assert torch.allclose(sae.decode(torch.zeros(1, 32)), (c / 0.5)[None], atol=1e-5)


def test_bad_init_b_dec_is_refused():
    with pytest.raises(ConfigError, match="init_b_dec"):
        SAETrainConfig(init_b_dec="median")
