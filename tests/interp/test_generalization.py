"""SAE generalization (lmlab.interp.generalization): position-binned metrics, context sweep, fine-tuned transfer."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.interp.generalization import (
    TransferConfig,
    check_context,
    density_shift,
    evaluate_by_position,
    main_transfer,
    model_max_context,
    position_edges,
    same_text_sources,
)
from lmlab.interp.sae import SAE, SAEEvalConfig, evaluate_saes, main_eval, save_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, tiny_corpus):
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("gen-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


def _random_sae(d: int = 32, seed: int = 0) -> SAE:
    s = SAE(d, 4 * d, 8, hook_name=HOOK, model_name="ref:dense", meta={"seq_len": 32, "train_tokens": 2048})
    return s.init_llama_scope(0.5, torch.Generator().manual_seed(seed)).eval()


def _exact_sae(d: int = 32) -> SAE:
    """W_D = [I; -I], W_E = [I, -I], k = d: TopK keeps |x_i| on the right sign, so the reconstruction is exact."""
    s = SAE(d, 2 * d, d, hook_name=HOOK, model_name="ref:dense", topk_by_decoder_norm=False)
    eye = torch.eye(d)
    with torch.no_grad():
        s.W_dec.copy_(torch.cat([eye, -eye]))
        s.W_enc.copy_(torch.cat([eye, -eye]).T)
    return s.eval()


def _source(ref_zoo, text_file, seq_len: int):
    from lmlab.core.models import load
    from lmlab.interp.activations import open_source

    model, tok = load("ref:dense", "cpu", torch.float32)
    return model, tok, open_source(model, tok, [HOOK], data=str(text_file), max_bytes=200_000, seq_len=seq_len,
                                   lm_batch=4, split="val")


def test_position_edges():
    assert position_edges(64) == [0, 16, 32, 64]
    assert position_edges(100) == [0, 16, 32, 64, 100]
    assert position_edges(8) == [0, 8]


def test_binned_totals_match_the_sae_evaluator(ref_zoo, text_file):
    model, _, src = _source(ref_zoo, text_file, 48)
    saes = {(HOOK, HOOK): _random_sae()}
    ref = evaluate_saes(model, src, saes, 600, "each")["saes"][HOOK]
    got = evaluate_by_position(model, src, saes, 600, position_edges(48))
    r = got["saes"][HOOK]
    assert got["bins"] == [[0, 16], [16, 32], [32, 48]]
    assert abs(r["explained_variance"] - ref["explained_variance"]) < 1e-5
    assert abs(r["delta_ce"] - ref["delta_ce"]) < 1e-5
    assert abs(r["l0"] - ref["l0"]) < 1e-6
    assert sum(r["tokens_bins"]) == got["tokens"]
    exact = evaluate_by_position(model, src, {(HOOK, HOOK): _exact_sae()}, 600, position_edges(48))
    e = exact["saes"][HOOK]
    assert all(v > 0.9999 for v in e["ev_bins"]) and all(abs(v) < 1e-4 for v in e["delta_ce_bins"])
    assert r["explained_variance"] < 0.9  # an untrained SAE is visibly worse: the metric can fail


def test_too_long_context_is_refused(ref_zoo, text_file, tmp_path):
    model, _, _ = _source(ref_zoo, text_file, 32)
    assert model_max_context(model) == 256
    check_context(model, [64, 256])
    with pytest.raises(LmlabError, match="longer than the model's maximum context 256"):
        check_context(model, [64, 512])
    save_sae(_random_sae(), tmp_path / "sae")
    with pytest.raises(LmlabError, match="maximum context"):
        main_eval(SAEEvalConfig(sae=[str(tmp_path / "sae")], context=[64, 1024], out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_eval_context_sweep(ref_zoo, text_file, tmp_path):
    save_sae(_random_sae(), tmp_path / "sae")
    out = main_eval(SAEEvalConfig(sae=[str(tmp_path / "sae")], context=[16, 64], tokens=512, jumprelu=[],
                                  splice="each", data=str(text_file), max_bytes=200_000, seq_len=32,
                                  out=str(tmp_path / "run")))
    res = json.loads((out / "results.json").read_text())["context"]
    assert res["contexts"] == [16, 64] and res["trained_context"][HOOK] == 32
    r64 = res["by_context"]["64"]
    assert r64["bins"] == [[0, 16], [16, 32], [32, 64]] and len(r64["saes"][HOOK]["ev_bins"]) == 3
    assert len(res["by_context"]["16"]["saes"][HOOK]["ev_bins"]) == 1
    for name in ("context_explained_variance", "context_delta_ce", "position_ev_bins", "position_delta_ce_bins"):
        assert (out / "plots" / f"{name}.png").is_file()


def test_density_shift():
    base = torch.tensor([0.1, 0.01, 0.0, 0.001, 0.05])
    ft = torch.tensor([0.1, 0.0, 0.0, 0.02, 0.05])
    r = density_shift(base, ft, over_ratio=4, min_density=1e-3, top=2)
    assert r["newly_dead"] == 1 and r["dead_ft"] == 2 and r["dead_base"] == 1 and r["overactive"] == 1
    assert {m["latent"] for m in r["most_changed"]} == {1, 3}


def test_transfer_end_to_end(ref_zoo, text_file, tmp_path):
    save_sae(_random_sae(), tmp_path / "sae")
    out = main_transfer(TransferConfig(sae=[str(tmp_path / "sae")], finetune_data=str(text_file),
                                       finetune_steps=3, finetune_batch=2, finetune_seq_len=32, tokens=256,
                                       sae_tokens="1k", sae_batch_size=256, sae_data=str(text_file),
                                       max_bytes=200_000, seq_len=32, out=str(tmp_path / "run")))
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"base SAE on base model", "base SAE on fine-tuned model",
                                "SAE trained on fine-tuned model"}
    ft = res["finetune"]
    assert ft["steps"] == 3 and ft["val_loss_after"] != ft["val_loss_before"]
    assert (out / "finetuned" / "config.json").is_file()
    assert res["rows"]["base SAE on base model"]["saes"][HOOK]["delta_ce"] != \
        res["rows"]["base SAE on fine-tuned model"]["saes"][HOOK]["delta_ce"]
    assert len(res["density_shift"][HOOK]["most_changed"]) == 20


def test_every_context_sees_the_same_text(ref_zoo, text_file):
    model, tok, _ = _source(ref_zoo, text_file, 32)
    src = same_text_sources(model, tok, [HOOK], [16, 64], 300, data=str(text_file), max_bytes=200_000)
    short, long = src[16].seqs[:, 1:], src[64].seqs[:, 1:]  # bodies without BOS: (n, 15), (n_chunks, 63)
    n_chunks = long.shape[0]
    assert n_chunks == 5 and short.shape[0] == 4 * n_chunks  # ceil(300 / 63) chunks; 63 // 15 = 4 per chunk
    for c in range(n_chunks):
        assert torch.equal(short[4 * c: 4 * c + 4].reshape(-1), long[c, :60])
    assert not torch.equal(long[0], long[1])  # chunks come from different places of the stream
