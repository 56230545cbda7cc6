"""What the lead wires into shared files: ref:moe in the zoo (an ARCHS entry), loading saved lmlab_moe folders,
the shared training loop (the router losses train through it), the YAML configs, and the tour section."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import resolve, to_dict

ROOT = Path(__file__).resolve().parents[2]


def _moe_arch(vocab_size: int):  # the exact ARCHS entry proposed for lmlab.core.zoo
    from lmlab.train.moe import reference_config

    return reference_config(vocab_size)


def test_ref_moe_trains_with_the_shared_loop_and_reloads(monkeypatch, tmp_path, tiny_tok, tiny_corpus):
    from lmlab.core import zoo
    from lmlab.core.corpus import encode_docs
    from lmlab.core.models import load_model
    from lmlab.core.pretrain import OptimConfig, train
    from lmlab.train.moe import moe_layers

    monkeypatch.setitem(zoo.ARCHS, "moe", _moe_arch)
    model = zoo.build_model("moe", vocab_size=len(tiny_tok), special=zoo._special_ids(tiny_tok))
    assert type(model).__name__ == "LmlabMoeForCausalLM" and len(moe_layers(model)) == 4
    # shrink for the test: same code path, tiny widths
    conf = model.config
    conf.hidden_size, conf.num_hidden_layers, conf.moe_intermediate_size, conf.intermediate_size = 32, 1, 16, 16
    torch.manual_seed(0)
    model = type(model)(conf).train()
    router0 = moe_layers(model)[0].router.weight.detach().clone()
    ids = encode_docs(tiny_tok, tiny_corpus.texts("train"), tiny_tok.eos_token_id)
    st = train(model, ids, None, OptimConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=0),
               progress=False)
    assert len(st.losses) == 3
    assert not torch.equal(router0, moe_layers(model)[0].router.weight)  # router (and aux) trained
    model.save_pretrained(tmp_path / "m")
    back = load_model(str(tmp_path / "m"))
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(back(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-5)


def test_moe_configs_resolve():
    from lmlab.train.moe import TrainMoEConfig

    paths = sorted((ROOT / "configs" / "train").glob("moe*.yaml"))
    assert paths, "configs/train/moe*.yaml missing"
    for p in paths:
        assert p.read_text().splitlines()[0].startswith("# lmlab train moe -c ")
        cfg = resolve(TrainMoEConfig, p)
        data = yaml.safe_load(p.read_text())
        got = to_dict(cfg)
        for k, v in data.items():
            if isinstance(v, dict):
                assert all(got[k][kk] == vv for kk, vv in v.items()), p
            else:
                assert got[k] == v, (p, k)


@pytest.mark.slow
def test_tour_section_quick(tmp_path):
    import json

    from lmlab.tour import TourConfig
    from lmlab.train.moe import tour_section

    run, summary = tour_section(TourConfig(device="cpu"), tmp_path / "moe")
    res = json.loads((run / "results.json").read_text())
    assert set(res["variants"]) == {"top1", "top1+IR", "top1+FR", "top1+IR+FR", "top1 dropless"}
    assert res["variants"]["top1 dropless"]["eval_drop_rate"] == 0.0
    assert res["variants"]["top1+FR"]["eval_pad_rate"] < res["variants"]["top1"]["eval_pad_rate"]
    assert res["variants"]["top1+IR"]["eval_rectified_rate"] > 0
    assert "top1+IR+FR" in summary and (run / "plots" / "waste.png").is_file()
