"""Induction scores, half losses, conv-lag ablation, Off-by-One probe, and the circuits command."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.interp.circuits import (
    CircuitsConfig,
    conv_taps_zeroed,
    half_losses,
    induction_scores,
    main,
    mamba_convs,
    offset_probe,
    repeated_tokens,
)


def test_repeated_tokens_layout():
    ids = repeated_tokens(3, 5, 50, seed=0, bos=1, low=3)
    assert ids.shape == (3, 11) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:6], ids[:, 6:]) and ids[:, 1:].min() >= 3


def test_half_losses_perfect_copy():
    """A 'model' that knows the repeat: second-half loss ~0, first half ~ln V."""
    half, V = 6, 20
    ids = repeated_tokens(4, half, V, bos=0, low=1)
    logits = torch.zeros(4, ids.shape[1], V)
    for t in range(ids.shape[1] - 1):
        if t >= half + 1:  # from the repeat's first token on, predict the continuation
            logits[torch.arange(4), t, ids[:, t + 1]] = 50.0
    f, s = half_losses(logits, ids, half)
    assert f == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=1e-4) and s < 1e-6


def test_induction_scores_find_the_planted_head():
    half, T = 5, 11  # BOS + 2 * 5
    pat = torch.zeros(2, 3, T, T)
    pat[:, :, :, 0] = 1.0  # heads 0, 2 attend to BOS
    for p in range(T):
        pat[:, 1, p] = 0
        pat[:, 1, p, max(p - half + 1, 0)] = 1.0  # head 1: induction
        pat[:, 2, p] = 0
        pat[:, 2, p, max(p - 1, 0)] = 1.0  # head 2: previous token
    ind, prev = induction_scores(pat, half)
    assert ind.tolist() == [0.0, 1.0, 0.0] and prev.tolist() == [0.0, 0.0, 1.0]


def test_offset_probe_peaks_at_the_shift():
    """acts[t] encodes the token at t - 1 (an Off-by-One write): the probe peaks at offset 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 20), generator=g)
    emb = torch.randn(8, 16, generator=g)
    acts = torch.zeros(64, 20, 16)
    acts[:, 1:] = emb[ids[:, :-1]]
    acc = offset_probe(acts + 0.05 * torch.randn(64, 20, 16, generator=g), ids, [0, 1, 2], 8)
    assert acc[1] > 0.95 and acc[0] < 0.4 and acc[2] < 0.4


def test_conv_taps_zeroed_restores(ref_zoo):
    from lmlab.core.models import load_model

    m = load_model("ref:mamba")
    convs = mamba_convs(m)
    assert convs and convs[0].weight.shape[-1] == 4
    before = [c.weight.clone() for c in convs]
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        clean = m(input_ids=ids).logits
        with conv_taps_zeroed(m, 0, [0]):
            assert (convs[0].weight[..., -1] == 0).all() and not (convs[1].weight[..., -1] == 0).all()
            ablated = m(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)
    assert all(torch.equal(a, c.weight) for a, c in zip(before, convs))
    assert mamba_convs(load_model("ref:dense")) == []


@pytest.mark.parametrize("model", ["ref:dense", "ref:mamba"])
def test_circuits_command(ref_zoo, tmp_path, model):
    run = main(CircuitsConfig(model=model, half_len=8, n_seq=24, batch_size=12, max_offset=2, probe_vocab=16,
                              out=str(tmp_path / "c"), threads=1))
    res = json.loads((run / "results.json").read_text())
    assert res["induction_gain"] == pytest.approx(res["loss_first"] - res["loss_second"])
    obo = res["off_by_one"]
    assert obo["offsets"] == [0, 1, 2] and len(obo["layers"]) == res["n_layers"]
    key = "B" if model == "ref:mamba" else "k"
    assert obo["key_channel"] == key and len(obo["layers"][0]["probe_accuracy"][key]) == 3
    if model == "ref:dense":  # attention writes a token's k/v at its own position only
        assert obo["key_peak_offset"] == [0] * res["n_layers"]
    pp = res["path_patching"]
    assert pp["top_path"]["path"] in pp["paths"] and all(abs(v) < 50 for v in pp["paths"].values())
    assert pp["normalized"] == (pp["loss_corrupt"] - pp["loss_clean"] > 0.1)
    assert (run / "plots" / "path_patching.png").is_file()
    if model == "ref:dense":
        assert len(res["induction_scores"]) == 2 and len(res["induction_scores"][0]) == 4
        assert (run / "plots" / "induction_scores.png").is_file()
    else:
        assert set(res["conv_lag_ablation"]) == {"0", "1", "2", "3"} and res["most_destructive_lag"] in range(4)
        assert len(res["conv_lag_by_layer"]) == 2 and len(res["conv_tap_norm"][0]) == 4
        assert (run / "plots" / "conv_lag_ablation.png").is_file()
    assert (run / "plots" / "off_by_one.png").is_file()


def test_bad_task():
    with pytest.raises(ConfigError, match="task must be one of"):
        CircuitsConfig(task="ioi")
