"""Path patching and the Off-by-One write-offset measurement (Towards Universality, arXiv 2410.06672, Sec. 5).

Fast tests use tiny random-init models and check the patching against an independent implementation (a hook on
the receiver layer's input norm). The slow tests train the synthetic induction models with the foundation loop.
"""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.interp.circuits import (
    corrupted_pair,
    mamba_convs,
    path_patch,
    run_cache,
    sender_delta,
    tiny_config,
    write_offsets,
)


def _tiny(arch: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, 32, d=32, n_layers=2)).eval()


def _norm_of_layer1(model: torch.nn.Module) -> torch.nn.Module:
    return model.backbone.layers[1].norm if mamba_convs(model) else model.model.layers[1].input_layernorm


@pytest.mark.parametrize("arch", ["dense", "mamba"])
def test_path_patch_matches_an_independent_hook(arch):
    """Sender layer 0 -> every input of layer 1 == adding the sender's change to layer 1's pre-norm input only."""
    torch.set_num_threads(1)
    m = _tiny(arch)
    clean_ids, corr_ids = corrupted_pair(4, 6, 32, seed=0, bos=0, low=1)
    cc, kc = run_cache(m, clean_ids), run_cache(m, corr_ids)
    recv = [(1, None, "all")] if arch == "mamba" else [(1, None, c) for c in ("q", "k", "v")]
    got = path_patch(m, clean_ids, cc, kc, ("layer", 0), recv)
    delta = sender_delta(m, cc, kc, ("layer", 0))
    assert delta.abs().max() > 1e-3  # the corruption does change layer 0's output
    h = _norm_of_layer1(m).register_forward_pre_hook(lambda _m, args: (args[0] + delta.to(args[0].dtype),))
    try:
        with torch.no_grad():
            ref = m(input_ids=clean_ids).logits.float()
    finally:
        h.remove()
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, cc["logits"], atol=1e-3)
    # patching from the clean run itself changes nothing
    same = path_patch(m, clean_ids, cc, cc, ("layer", 0), recv)
    assert torch.allclose(same, cc["logits"], atol=1e-5)


def test_head_deltas_sum_to_the_layer_delta():
    m = _tiny("dense")
    clean_ids, corr_ids = corrupted_pair(3, 5, 32, seed=1, bos=0, low=1)
    cc, kc = run_cache(m, clean_ids), run_cache(m, corr_ids)
    heads = sum(sender_delta(m, cc, kc, ("head", 0, h)) for h in range(4))
    assert torch.allclose(heads, sender_delta(m, cc, kc, ("layer", 0)), atol=1e-5)
    pos = torch.zeros(clean_ids.shape[1], dtype=torch.bool)
    pos[2] = True
    d = sender_delta(m, cc, kc, ("layer", 0), pos)
    assert d[:, pos].abs().max() > 0 and d[:, ~pos].abs().max() == 0
    with pytest.raises(LmlabError, match="must come after"):
        path_patch(m, clean_ids, cc, kc, ("layer", 1), [(0, 0, "k")])
    with pytest.raises(LmlabError, match="channel"):
        path_patch(m, clean_ids, cc, kc, ("layer", 0), [(1, 0, "B")])


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_write_offsets_follow_the_conv_taps(lag):
    """A Mamba-2 whose causal conv keeps only tap ``lag``: the token at s is written at s + lag (Off-by-One for
    lag 1); a Transformer's k/v change only at the token's own position."""
    torch.set_num_threads(1)
    m = _tiny("mamba")
    with torch.no_grad():
        for c in mamba_convs(m):
            k = c.weight.shape[-1]
            keep = c.weight[..., k - 1 - lag].clone()
            c.weight.zero_()
            c.weight[..., k - 1 - lag] = keep
    ids = torch.randint(1, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    prof = write_offsets(m, ids, n_offsets=4, low=1, vocab=32)
    for layer in prof:
        for ch in ("x", "B", "C"):
            v = layer[ch]
            assert max(range(4), key=v.__getitem__) == lag and v[lag] > 0.05
            assert sum(v) - v[lag] < 1e-4 * v[lag]
        assert layer["dt"][0] > 0 and max(layer["dt"][1:]) < 1e-6  # dt has no conv
    dense = write_offsets(_tiny("dense"), ids, n_offsets=3, low=1, vocab=32)
    for layer in dense:
        for ch in ("k", "v", "q"):
            assert layer[ch][0] > 0.05 and max(layer[ch][1:]) < 1e-6


@pytest.fixture(scope="module")
def induction_dense():
    from lmlab.interp.circuits import train_induction_model

    torch.set_num_threads(1)
    return train_induction_model("dense", steps=4000, seed=0)  # ~80 CPU-s; L varies 8..24


@pytest.mark.slow
def test_path_patching_finds_the_transformer_induction_circuit(induction_dense):
    """Known circuit: a previous-token head in layer 0 feeds the keys of the layer-1 induction heads
    (K-composition). Path patching must rank that path high and give the query path (control) ~0."""
    from lmlab.interp.circuits import CircuitsConfig, analyze

    r = analyze(induction_dense, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32, n_swap=4), 64, 0)
    assert r["loss_first"] - r["loss_second"] > 3.0  # induction formed
    prev = r["prev_token_scores"][0]
    p = max(range(4), key=prev.__getitem__)  # layer 0's previous-token head (independent of patching)
    assert prev[p] > 0.5 and len(r["induction_heads"]) >= 1
    pp = r["path_patching"]
    assert pp["normalized"]
    assert pp["paths"][f"L0H{p}->L1.k"] > 0.3
    assert max(abs(pp["paths"][f"L0H{h}->L1.q"]) for h in range(4)) < 0.05  # control: the query path
    hh = pp["heads_to_heads_k"]["effect"]  # (sender, receiver)
    s, rcv = divmod(max(range(16), key=lambda i: hh[i // 4][i % 4]), 4)
    assert s == p and [1, rcv] in r["induction_heads"]
    # Off-by-One absent: attention writes a token's k/v at its own position; layer 1's keys carry the previous
    # token only because the previous-token head moved it there (probe at offset 1)
    obo = r["off_by_one"]
    assert obo["key_peak_offset"] == [0, 0]
    assert obo["layers"][1]["probe_accuracy"]["k"][1] > 0.5 > obo["layers"][0]["probe_accuracy"]["k"][1]


def test_conv_taps_zeroed_by_channel():
    from lmlab.interp.circuits import conv_taps_zeroed, mamba_channels

    m = _tiny("mamba")
    conv, mx = mamba_convs(m)[0], m.backbone.layers[0].mixer
    before = conv.weight.clone()
    b = mamba_channels(mx)["B"]
    rows = slice(b.start - mx.intermediate_size, b.stop - mx.intermediate_size)
    with conv_taps_zeroed(m, 1, [0], channel="B"):
        assert (conv.weight[rows, :, -2] == 0).all()
        other = torch.ones(conv.weight.shape[0], dtype=torch.bool)
        other[rows] = False
        assert torch.equal(conv.weight[other], before[other])  # value/query taps untouched
        assert torch.equal(conv.weight[rows, :, -1], before[rows, :, -1])  # other lags untouched
    assert torch.equal(conv.weight, before)
    with pytest.raises(LmlabError, match="channel"), conv_taps_zeroed(m, 1, channel="dt"):
        pass


@pytest.mark.slow
def test_off_by_one_on_the_mamba_induction_model():
    """Mamba-2 trained to induction (aligned loop, ~150 CPU-s): the key (B) taps at lag 1 are the ones induction
    needs (the token enters the SSM state as a key at the next position), the query path is a ~0 control."""
    from lmlab.interp.circuits import CircuitsConfig, analyze, train_induction_model

    torch.set_num_threads(1)
    m = train_induction_model("mamba", steps=3000, seed=0, half_range=(16, 16), loop="aligned")
    r = analyze(m, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32, n_swap=8), 64, 0)
    assert r["induction_gain"] > 3.0
    kb = r["conv_lag_by_channel"]["B"]
    assert r["key_lag"] == 1 and kb[1] < 0.5 * min(kb[0], kb[2], kb[3])
    last = r["off_by_one"]["layers"][-1]["write_change"]["B"]
    assert last[0] < 0.5 * min(last[1:])  # the token at s barely reaches the last layer's key at s itself
    pp = r["path_patching"]["paths"]
    assert pp["mixer0->mixer1.all"] > 0.5 and pp["mixer0[first_half]->mixer1.all"] > 0.5
    assert abs(pp["mixer0->mixer1.C"]) < 0.05 and abs(pp["mixer0[second_half]->mixer1.all"]) < 0.05  # controls
