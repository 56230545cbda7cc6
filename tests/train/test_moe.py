"""Capacity routing, the Rectify-Router (IR, FR), the MoE layer and the ``lmlab_moe`` HF model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.train.moe import (
    MoELayer,
    MoESettings,
    TrainMoEConfig,
    aux_loss,
    capacity,
    combine_weights,
    fill_all_ranks,
    local_best,
    rates,
    route,
    swiglu_experts,
    swiglu_rows,
    unrouted_tokens,
)


def one_hot_logits(choices: list[list[int]], E: int, scale: float = 10.0) -> torch.Tensor:
    """Logits (1, S, E) whose ranking per token is the given list (first = best)."""
    S = len(choices)
    lg = torch.zeros(1, S, E)
    for s, ranked in enumerate(choices):
        for r, e in enumerate(ranked):
            lg[0, s, e] = scale - r
    return lg


def layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    base = dict(experts=8, top_k=1, capacity_factor=1.0, groups=2)
    return MoELayer(8, 16, MoESettings(**{**base, **kw})).train()


# --------------------------------------------------------------------------------------------------
# capacity and the hand-built routing table


def test_capacity_formula():
    assert capacity(16, 8, 1, 1.0) == 2
    assert capacity(16, 8, 2, 1.0) == 4
    assert capacity(16, 8, 1, 0.5) == 1
    assert capacity(10, 8, 1, 1.0) == 2  # ceil(1.25)
    assert capacity(16, 8, 1, 1.0, min_capacity=4) == 4
    assert capacity(16, 8, 2, math.inf) == 16  # never more than S slots from one group
    assert capacity(4, 8, 2, 100.0) == 4


def test_hand_built_table_counts_drops_and_padding():
    # S=8 tokens, E=4 experts, top-1, cf=1 -> C = 2. First choices: e0 x4, e1 x3, e2 x1, e3 x0.
    first = [0, 0, 0, 1, 1, 2, 0, 1]
    choices = [[e, (e + 1) % 4, (e + 2) % 4, (e + 3) % 4] for e in first]
    cap = capacity(8, 4, 1, 1.0)
    assert cap == 2
    r = route(one_hot_logits(choices, 4), 1, cap)
    assert r.slot[0, :, 0].tolist() == [0, 1, 2, 0, 1, 0, 3, 2]  # queue position in token order
    assert r.keep[0, :, 0].tolist() == [True, True, False, True, True, True, False, False]
    kept = r.keep.sum().item()
    assert 8 - kept == 3  # dropped tokens 2, 6, 7
    assert 4 * cap - kept == 3  # padding: one slot of e2, two of e3
    # top-2: second choices queue after ALL first choices of the expert (DeepSpeed locations2 += sum(mask1))
    cap2 = capacity(8, 4, 2, 1.0)  # 4
    r2 = route(one_hot_logits(choices, 4), 2, cap2)
    # token 5 (first e2, second e3): e3 got no first choices, its second-choice queue starts at 0
    assert r2.slot[0, 5, 1].item() == 0
    # token 0's second choice is e1, which already has 3 first choices -> slot 3 (kept, C = 4)
    assert r2.slot[0, 0, 1].item() == 3 and r2.keep[0, 0, 1]
    # second choices to e2 (tokens 3, 4, 7) queue behind e2's one first choice -> slots 1, 2, 3
    assert r2.slot[0, [3, 4, 7], 1].tolist() == [1, 2, 3]
    # the layer's counters agree with the table
    m = MoELayer(4, 8, MoESettings(experts=4, top_k=1, capacity_factor=1.0, groups=1))
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4))
    x = torch.zeros(1, 8, 4)
    for s, e in enumerate(first):
        x[0, s, e] = 5.0
    m(x)
    st = rates(m.stats)
    assert st["drop_rate"] == pytest.approx(3 / 8) and st["pad_rate"] == pytest.approx(3 / 8)
    assert m.stats["load"].tolist() == [2, 2, 1, 0] and m.stats["demand"].tolist() == [4, 3, 1, 0]


def test_batch_prioritized_routing_keeps_confident_tokens():
    probs = torch.tensor([[0.55, 0.9, 0.7, 0.8]])  # all pick expert 0 with different confidence
    lg = torch.stack([torch.log(probs[0]), torch.log((1 - probs[0]) / 1)], -1)[None]  # (1, 4, 2)
    r_pos = route(lg, 1, 2)
    r_bpr = route(lg, 1, 2, bpr=True)
    assert r_pos.keep[0, :, 0].tolist() == [True, True, False, False]
    assert r_bpr.keep[0, :, 0].tolist() == [False, True, False, True]


# --------------------------------------------------------------------------------------------------
# Fill-in


def test_fill_in_next_leaves_no_padding_while_candidates_remain():
    torch.manual_seed(0)
    E, k = 8, 1
    for trial in range(5):
        logits = torch.randn(3, 40, E) * (1 + trial)
        cap = capacity(40, E, k + 1, 1.0 * k / (k + 1))
        assert cap == capacity(40, E, k, 1.0)
        r = route(logits, k, cap, fill_in=True, fill_from="next")
        used = torch.zeros(3, E, dtype=torch.long)
        used.scatter_add_(1, r.idx.reshape(3, -1), r.keep.reshape(3, -1).long())
        assert (used <= cap).all()
        # an expert still has padding only if no (k+1)-th choice of it was left unassigned
        for w in range(3):
            for e in range(E):
                waiting = ((r.idx[w, :, k] == e) & ~r.keep[w, :, k]).sum().item()
                assert used[w, e] == cap or waiting == 0
        # fillers of one expert are kept in descending order of their own score
        for w in range(3):
            for e in range(E):
                cand = r.idx[w, :, k] == e
                kept_scores = r.gate[w, cand & r.keep[w, :, k], k]
                lost_scores = r.gate[w, cand & ~r.keep[w, :, k], k]
                if kept_scores.numel() and lost_scores.numel():
                    assert kept_scores.min() >= lost_scores.max()


@pytest.mark.parametrize("priority", ["own", "top1", "position"])
def test_fill_ranks_equal_a_stable_sort_and_top_limit(priority):
    """Integer order keys reproduce a stable descending argsort, ties included, with and without a top-L limit."""
    g = torch.Generator().manual_seed(5)
    W, S, E, k = 2, 64, 8, 1
    probs = torch.softmax(torch.randint(0, 3, (W, S, E), generator=g).float(), -1)  # many exact ties
    probs[0, 3] = 0.0  # zero scores tie with each other too
    valid = torch.ones(W, S, dtype=torch.bool)
    valid[1, 50:] = False
    first = probs.topk(k, -1).indices
    full = fill_all_ranks(probs, first, valid, priority)
    # reference: the stable argsort of the masked scores
    cand = valid[..., None].expand(W, S, E).clone().scatter_(2, first, False)
    score = {"own": probs, "top1": probs.max(-1, keepdim=True).values.expand(W, S, E),
             "position": -torch.arange(S, dtype=probs.dtype)[None, :, None].expand(W, S, E)}[priority]
    order = torch.argsort(torch.where(cand, score, torch.full_like(score, -math.inf)), dim=1, descending=True,
                          stable=True)
    want = torch.empty_like(order).scatter_(1, order, torch.arange(S)[None, :, None].expand(W, S, E))
    assert torch.equal(full, want)
    for limit in (5, 16, 40):
        lim = fill_all_ranks(probs, first, valid, priority, limit=limit)
        assert torch.equal(lim[full < limit], full[full < limit]) and (lim[full >= limit] == S).all()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("priority", ["own", "top1", "position"])
def test_fill_in_all_leaves_no_padding_when_enough_tokens(k, priority):
    """The paper's FR: every vacant slot of every expert is filled with the best not-yet-assigned tokens."""
    torch.manual_seed(10 + k)
    W, S, E = 3, 40, 8
    bias = torch.linspace(0, 6, E)  # a skewed router: low experts get few top-k picks -> much padding
    logits = torch.randn(W, S, E) + bias
    valid = torch.ones(W, S, dtype=torch.bool)
    valid[2, 5:] = False  # group 2 has only 5 real tokens: fewer than C for some experts
    cap = capacity(S, E, k, 1.0)
    plain = route(logits, k, cap, valid=valid)
    r = route(logits, k, cap, fill_in=True, filler_priority=priority, valid=valid)
    assert r.idx.shape[-1] == E
    # the top-k choices are routed exactly as without Fill-in
    assert torch.equal(r.keep[..., :k], plain.keep) and torch.equal(r.slot[..., :k], plain.slot)
    used = torch.zeros(W, E, dtype=torch.long).scatter_add_(1, r.idx.reshape(W, -1), r.keep.reshape(W, -1).long())
    assert (used <= cap).all()
    # slots are unique per (group, expert)
    for w in range(W):
        for e in range(E):
            sl = r.slot[w][(r.idx[w] == e) & r.keep[w]]
            assert sl.unique().numel() == sl.numel()
    n_valid = valid.sum(1)
    for w in range(W):
        for e in range(E):
            # no padding while a token exists that is not yet assigned to e: used == min(C, #valid tokens)
            assert used[w, e] == min(cap, int(n_valid[w])), (w, e)
    assert plain.keep.sum() < r.keep.sum()  # the test case really had padding to fill
    if priority == "own":  # kept fillers of an expert outscore every unkept candidate of it
        for w in range(W):
            for e in range(E):
                is_f = (r.idx[w, :, k:] == e) & valid[w, :, None]
                kept = r.gate[w, :, k:][is_f & r.keep[w, :, k:]]
                lost = r.gate[w, :, k:][is_f & ~r.keep[w, :, k:]]
                if kept.numel() and lost.numel():
                    assert kept.min() >= lost.max()


def test_fill_in_layer_pads_nothing_and_next_does():
    """Layer level, skewed router at cf 1: fill_from=all leaves 0 padding; the top-(k+1) variant cannot."""
    x = torch.randn(2, 32, 8)
    for k in (1, 2):
        pads = {}
        for mode in ("all", "next"):
            m = layer(top_k=k, rectify=("fill-in",), fill_from=mode)
            with torch.no_grad():
                m.router.weight.mul_(0).add_(torch.linspace(-3, 3, 8)[:, None] * torch.ones(8, 8) / 8)
            y = m(x)
            pads[mode] = rates(m.stats)["pad_rate"]
            y.square().sum().backward()
            assert m.router.weight.grad.abs().sum() > 0
        assert pads["all"] == 0.0 and pads["next"] > 0.05, pads


def test_fill_in_only_takes_vacant_slots():
    torch.manual_seed(1)
    logits = torch.randn(2, 32, 8)
    cap = capacity(32, 8, 2, 0.5)
    top1 = route(logits, 1, capacity(32, 8, 1, 1.0))
    fr = route(logits, 1, cap, fill_in=True, fill_from="next")
    # the first choices are placed exactly as top-1 at cf 1 places them
    assert torch.equal(fr.keep[..., 0], top1.keep[..., 0]) and torch.equal(fr.slot[..., 0], top1.slot[..., 0])
    # fillers sit only in slots >= the expert's first-choice load
    load1 = top1.counts[:, 0]  # (W, E)
    filler_slots = fr.slot[..., 1][fr.keep[..., 1]]
    filler_load = load1.gather(1, fr.idx[..., 1])[fr.keep[..., 1]]
    assert (filler_slots >= filler_load).all()


def test_top2_at_half_capacity_equals_top1_at_full():
    """The FR identity: top-2 at cf 0.5 routes first choices as top-1 at cf 1 (dispatch, aux, gradients)."""
    torch.manual_seed(2)
    logits = torch.randn(2, 24, 8, requires_grad=True)
    r2 = route(logits, 2, capacity(24, 8, 2, 0.5))
    logits1 = logits.detach().clone().requires_grad_(True)
    r1 = route(logits1, 1, capacity(24, 8, 1, 1.0))
    assert torch.equal(r2.idx[..., 0], r1.idx[..., 0])
    assert torch.equal(r2.keep[..., 0], r1.keep[..., 0]) and torch.equal(r2.slot[..., 0], r1.slot[..., 0])
    a2, a1 = aux_loss(r2.probs, r2.idx[..., 0]), aux_loss(r1.probs, r1.idx[..., 0])
    assert a2.item() == pytest.approx(a1.item(), abs=1e-7)
    (g2,) = torch.autograd.grad(a2, logits)
    (g1,) = torch.autograd.grad(a1, logits1)
    assert torch.allclose(g1, g2, atol=1e-7)
    # layer level: FR top-1 at cf 1 (fillers in position order) IS top-2 at cf 0.5, outputs and gradients
    x = torch.randn(2, 12, 8)
    fr = layer(top_k=1, rectify=("fill-in",), filler_priority="position", fill_from="next")
    t2 = layer(top_k=2, capacity_factor=0.5)
    outs = []
    for m in (fr, t2):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xx.grad, m.router.weight.grad.clone(), m.w_in.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Intra-GPU


def test_intra_gpu_processes_every_dropped_token_on_its_group():
    m = layer(top_k=1, capacity_factor=0.5, rectify=("intra-gpu",))  # C = 1 of 4 tokens/expert: many drops
    x = torch.randn(2, 16, 8)
    y = m(x)
    st = m.stats
    assert st["dropped"] > 0 and st["rectified"] == st["unrouted"] == st["dropped"]  # top-1: dropped = unrouted
    # recompute: a dropped token's output is exactly E_h(x), h = its group's best local expert
    flat = x.reshape(-1, 8).view(2, 16, 8)
    logits = flat @ m.router.weight.T
    cap = capacity(16, 8, 1, 0.5)
    r = route(logits, 1, cap)
    h, _ = local_best(r.probs, torch.tensor([0, 4]), 4)
    assert ((h[0] < 4).all() and (h[1] >= 4).all())  # group w only uses its own experts
    dropped = ~r.keep[..., 0]
    for w in range(2):
        for s in dropped[w].nonzero().flatten().tolist():
            e = h[w, s].item()
            want = swiglu_experts(flat[w, s][None, None], m.w_in[e][None], m.w_out[e][None])[0, 0]
            assert torch.allclose(y.reshape(2, 16, 8)[w, s], want, atol=1e-6)
    # without IR those tokens get 0 (residual only)
    van = layer(top_k=1, capacity_factor=0.5)
    yv = van(x).reshape(2, 16, 8)
    assert torch.count_nonzero(yv[dropped]) == 0 and torch.count_nonzero(y.reshape(2, 16, 8)[dropped].abs().sum(-1)) \
        == dropped.sum()


def test_swiglu_rows_equals_one_expert_per_row_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 8, generator=g, requires_grad=True)
    w_in = torch.randn(4, 8, 12, generator=g, requires_grad=True)
    w_out = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    e = torch.tensor([3, 0, 3, 3, 1, 0, 3, 1, 3, 0, 0, 3, 1])  # expert 2 unused, uneven groups
    y = swiglu_rows(x, e, w_in, w_out)
    want = torch.stack([swiglu_experts(x[i][None, None], w_in[j][None], w_out[j][None])[0, 0]
                        for i, j in enumerate(e.tolist())])
    assert y.shape == (13, 8) and torch.allclose(y, want, atol=1e-5)
    gy = torch.randn(13, 8, generator=g)
    grads = torch.autograd.grad(y, (x, w_in, w_out), gy)
    ref = torch.autograd.grad(want, (x, w_in, w_out), gy)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-4)
    assert grads[1][2].abs().sum() == 0  # an expert no row used gets no gradient


def test_intra_gpu_combine_formula_top2():
    m = layer(top_k=2, capacity_factor=0.5, rectify=("intra-gpu",))
    x = torch.randn(2, 16, 8)
    y = m(x).reshape(2, 16, 8)
    flat = x.reshape(2, 16, 8)
    r = route(flat @ m.router.weight.T, 2, capacity(16, 8, 2, 0.5))
    un, miss = unrouted_tokens(r.keep, 2, "any")
    h, p_h = local_best(r.probs, torch.tensor([0, 4]), 4)
    w, s = un.nonzero()[0].tolist()
    e_out = [swiglu_experts(flat[w, s][None, None], m.w_in[e][None], m.w_out[e][None])[0, 0]
             for e in range(8)]
    num = sum(r.gate[w, s, j] * e_out[r.idx[w, s, j]] for j in range(2) if r.keep[w, s, j])
    num = num + miss[w, s] * p_h[w, s] * e_out[h[w, s]]
    den = sum(r.gate[w, s, j] for j in range(2) if r.keep[w, s, j]) + miss[w, s] * p_h[w, s]
    assert torch.allclose(y[w, s], num / den, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# layer invariants


def test_dropless_equals_infinite_capacity():
    x = torch.randn(2, 16, 8)
    for k in (1, 2):
        a, b = layer(top_k=k, dropless=True), layer(top_k=k, capacity_factor=math.inf)
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        assert a.stats["dropped"] == 0 and b.stats["dropped"] == 0
        assert a.stats["slots"] <= b.stats["slots"]  # dropless buffers are only as large as the max load
        ya.sum().backward()
        yb.sum().backward()
        assert torch.allclose(a.w_in.grad, b.w_in.grad) and torch.allclose(a.router.weight.grad, b.router.weight.grad)


@pytest.mark.parametrize("rect", [(), ("intra-gpu",), ("fill-in",), ("intra-gpu", "fill-in")])
@pytest.mark.parametrize("k", [1, 2])
def test_gradient_reaches_router_and_experts(k, rect):
    m = layer(top_k=k, rectify=rect, aux_weight=0.0)
    m(torch.randn(2, 16, 8)).pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.w_in.grad.abs().sum() > 0 and m.w_out.grad.abs().sum() > 0


def test_aux_loss_gradient_is_injected():
    x = torch.randn(2, 16, 8)
    a, b = layer(aux_weight=0.0), layer(aux_weight=0.5)
    a(x).sum().backward()
    b(x).sum().backward()
    diff = b.router.weight.grad - a.router.weight.grad
    # the difference is exactly d(0.5 * aux)/dW_g
    w = a.router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(2, 16, 8) @ w.T
    probs = torch.softmax(logits, -1)
    (0.5 * aux_loss(probs, probs.argmax(-1))).backward()
    assert torch.allclose(diff, w.grad, atol=1e-6)
    assert b.aux.item() == pytest.approx(0.5 * aux_loss(probs.detach(), probs.argmax(-1)).item(), rel=1e-5)


def test_groups_are_independent_routers():
    """W simulated groups = W separate single-group layers on the matching token chunks (no IR)."""
    x = torch.randn(4, 8, 8)
    two = layer(top_k=2, groups=2, rectify=("fill-in",))
    one = layer(top_k=2, groups=1, rectify=("fill-in",))
    y = two(x)
    halves = torch.cat([one(x[:2]), one(x[2:])])
    assert torch.allclose(y, halves, atol=1e-6)


def test_uneven_token_count_is_padded_not_routed():
    m = layer(top_k=1, groups=4)
    y = m(torch.randn(1, 7, 8))  # 7 tokens over 4 groups
    assert y.shape == (1, 7, 8) and m.stats["tokens"] == 7


def test_straight_through_top1_forward_weight_is_one():
    lg = torch.randn(1, 6, 4, requires_grad=True)
    r = route(lg, 1, 6)
    w = combine_weights(r, 1, straight_through=True)
    assert torch.allclose(w, torch.ones_like(w))
    w.sum().backward()
    assert lg.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kw,msg", [
    ({"top_k": 9}, "top-k 9"),
    ({"top_k": 8, "router": "rectify", "rectify": ["fill-in"]}, "fill-in"),
    ({"capacity_factor": 0.0}, "capacity factor must be > 0"),
    ({"capacity_factor": -1.0}, "capacity factor must be > 0"),
    ({"experts": 6, "ranks": 4}, "divisible by the number of ranks"),
    ({"router": "expert-choice"}, "router must be one of"),
    ({"router": "rectify", "rectify": ["local"]}, "unknown rectification"),
    ({"nproc": 2, "ranks": 4}, "nproc (2) must be 1"),
    ({"dropless": True, "router": "rectify"}, "dropless"),
    ({"fill_from": "top3"}, "fill_from must be one of"),
])
def test_bad_input_is_one_clear_error(kw, msg):
    with pytest.raises(ConfigError, match=None) as e:
        TrainMoEConfig(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_topk_router_ignores_rectify_list():
    assert TrainMoEConfig(router="topk").settings().rectify == ()
    assert TrainMoEConfig(router="rectify", rectify=["fill-in"]).settings().rectify == ("fill-in",)


# --------------------------------------------------------------------------------------------------
# the HF model


def test_hf_model_roundtrip_and_hooks(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmlab.core import hooks
    from lmlab.train import moe
    from lmlab.train.moe import model_config, moe_layers, reference_config

    torch.manual_seed(0)
    conf = model_config(99, hidden=16, layers=2, heads=2, expert_size=16,
                        settings=MoESettings(experts=4, top_k=2, rectify=("intra-gpu", "fill-in"), groups=2))
    model = moe.LmlabMoeForCausalLM(conf).eval()
    assert len(moe_layers(model)) == 2
    ids = torch.randint(0, 99, (2, 10))
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lmlab_moe"
    assert AutoConfig.from_pretrained(tmp_path).model_type == "lmlab_moe"
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "LmlabMoeForCausalLM"
    assert torch.allclose(back(input_ids=ids).logits, ref, atol=1e-6)
    with hooks.capture(back, ["blocks.1.hook_mlp_out"]) as acts:
        back(input_ids=ids)
    assert acts["blocks.1.hook_mlp_out"].shape == (2, 10, 16)
    # with labels, out.aux_loss reports the router loss and backward trains the router
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss > 0
    out.loss.backward()
    assert moe_layers(model)[0].router.weight.grad.abs().sum() > 0
    # ref:moe shape
    rc = reference_config(2048)
    assert rc.hidden_size == 192 and rc.settings().top_k == 2 and rc.moe_intermediate_size == 256


def test_generate_runs(tmp_path):
    from lmlab.train import moe

    conf = moe.model_config(50, hidden=16, layers=1, heads=2, expert_size=16,
                            settings=MoESettings(experts=4, top_k=1, rectify=("intra-gpu",), groups=2),
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = moe.LmlabMoeForCausalLM(conf).eval()
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


# --------------------------------------------------------------------------------------------------
# end to end


def test_train_moe_main_writes_run(tmp_path, ref_zoo):
    from lmlab.train.moe import MoEOptimConfig, main

    cfg = TrainMoEConfig(out=str(tmp_path / "run"), device="cpu", router="rectify", top_k=1, experts=4,
                         ranks=2, hidden_size=16, layers=1, heads=2, expert_size=16, data="math",
                         max_bytes=20_000, optim=MoEOptimConfig(steps=6, batch_size=4, seq_len=16, warmup=2,
                                                             eval_every=3, eval_batches=2, log_every=3))
    run = main(cfg)
    res = json.loads((run / "results.json").read_text())
    assert res["variant"] == "top1+IR+FR cf1" and len(res["train_losses"]) == 6 and math.isfinite(res["val_loss"])
    assert 0 <= res["eval_pad_rate"] <= 1 and res["eval_slots_per_token"] >= 1.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "layers" in x]
    assert [x["step"] for x in steps] == [3, 6]
    lay = steps[0]["layers"][0]
    assert {"drop_rate", "pad_rate", "fill_rate", "rectified_rate", "load", "aux"} <= set(lay)
    assert len(lay["load"]) == 4
    assert (run / "plots" / "rates.png").is_file() and (run / "plots" / "expert_load.png").is_file()
    assert (run / "model" / "config.json").is_file()
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "run2"), dropless=True, router="topk",
                               optim=dataclasses.replace(cfg.optim, grad_accum=2), save_model=False)
    res2 = json.loads((main(cfg2) / "results.json").read_text())
    assert res2["eval_drop_rate"] == 0.0 and res2["variant"] == "top1 dropless"
    assert res2["tokens"] == 6 * 2 * 4 * 16 and not (tmp_path / "run2" / "model").exists()
