"""Real expert parallelism (torch.distributed, gloo on 127.0.0.1, 2 ranks) equals the single-process simulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.train.moe import MoELayer, MoESettings, TrainMoEConfig

CASES = [
    dict(top_k=1),
    dict(top_k=1, rectify=("intra-gpu",), capacity_factor=0.5),
    dict(top_k=1, rectify=("fill-in",)),
    dict(top_k=1, rectify=("intra-gpu", "fill-in")),
    dict(top_k=1, rectify=("intra-gpu", "fill-in"), fill_from="next"),
    dict(top_k=2),
    dict(top_k=2, rectify=("intra-gpu", "fill-in"), unrouted="any"),
    dict(top_k=2, dropless=True),
]


def test_two_ranks_equal_simulation(tmp_path):
    from lmlab.train.moe_parallel import ep_layer_check

    d, f, world = 8, 16, 2
    torch.manual_seed(3)
    cases = []
    for kw in CASES:
        s = MoESettings(**{"experts": 4, "groups": world, "aux_weight": 0.01, **kw})
        cases.append((s, torch.randn(4, 6, d), torch.randn(4, 6, d)))
    got = ep_layer_check(cases, d, f, world, tmp_path / "ep")
    for (s, x, g), ep in zip(cases, got):
        torch.manual_seed(0)
        m = MoELayer(d, f, s).train()
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * g).sum().backward()
        tag = f"k={s.top_k} {s.rectify} dropless={s.dropless}"
        assert torch.allclose(ep["out"], y.detach(), atol=1e-5), tag
        assert torch.allclose(ep["dx"], xx.grad, atol=1e-5), tag
        assert torch.allclose(ep["w_in"], m.w_in.grad, atol=1e-5), tag
        assert torch.allclose(ep["w_out"], m.w_out.grad, atol=1e-5), tag
        assert torch.allclose(ep["router"], m.router.weight.grad, atol=1e-5), tag
        for key in ("dropped", "filled", "rectified", "slots", "load"):
            assert torch.equal(ep[f"stat.{key}"].long(), m.stats[key].long().reshape(ep[f"stat.{key}"].shape)), \
                (tag, key)
    assert got[1]["stat.rectified"] > 0 and got[2]["stat.fillers"] > 0  # the rectifications were exercised


@pytest.mark.slow
def test_train_moe_nproc2_equals_single_process(tmp_path, ref_zoo):
    from lmlab.train.moe import MoEOptimConfig, main

    kw = dict(device="cpu", router="rectify", top_k=1, experts=4, ranks=2, hidden_size=16, layers=1, heads=2,
              expert_size=16, data="math", max_bytes=20_000, save_model=True,
              optim=MoEOptimConfig(steps=4, batch_size=4, seq_len=16, warmup=2, eval_every=2, eval_batches=2,
                                log_every=2))
    one = json.loads((main(TrainMoEConfig(out=str(tmp_path / "sp"), **kw)) / "results.json").read_text())
    two = json.loads((main(TrainMoEConfig(out=str(tmp_path / "ep"), nproc=2, **kw)) / "results.json").read_text())
    assert two["nproc"] == 2
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(one["train_losses"], two["train_losses"]))
    assert math.isclose(one["val_loss"], two["val_loss"], abs_tol=1e-5)
    assert one["eval_drop_rate"] == pytest.approx(two["eval_drop_rate"])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "sp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ep" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
