"""End-to-end ``interp sae train|eval|dashboard`` on the tiny reference zoo; single LM pass; resume; I/O."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.errors import LmlabError
from lmlab.interp import sae as S
from lmlab.interp.dashboard import SAEDashboardConfig
from lmlab.interp.dashboard import main as dashboard_main


@pytest.fixture(scope="module")
def sae_text(tmp_path_factory, tiny_corpus):
    """~30 kB of paragraphs (tiny_corpus, repeated) as one text file: enough for a train and a val split."""
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("sae-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


def _cfg(tmp_path, text, **kw):
    base = dict(model="ref:dense", hooks=["blocks.*.hook_resid_post", "L1M"], k=4, expansion=2, tokens="6k",
                batch_size=256, data=str(text), max_bytes=200_000, seq_len=32, lm_batch=8, buffer_tokens=1024,
                eval_tokens=512, threads=1, out=str(tmp_path / "train"))
    base.update(kw)
    return S.SAETrainConfig(**base)


@pytest.fixture(scope="module")
def trained(ref_zoo, sae_text, tmp_path_factory):
    """One multi-hook run (2 resid_post + 1 mlp_out SAE + a transcoder), counting LM forward calls."""
    from lmlab.core.models import load_model

    tmp = tmp_path_factory.mktemp("sae-run")
    calls = {"n": 0}
    orig = load_model

    def counting(*a, **k):
        m = orig(*a, **k)
        m.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        return m

    import lmlab.core.models as M

    M.load_model = counting  # count every forward of the model main_train loads
    try:
        cfg = _cfg(tmp, sae_text, hooks=["blocks.*.hook_resid_post", "L1M", "blocks.0.hook_resid_mid->L0M"],
                   eval_tokens=0)
        run = S.main_train(cfg)
    finally:
        M.load_model = orig
    return run, calls["n"], cfg


def test_one_lm_pass_feeds_every_sae(trained):
    run, n_calls, cfg = trained
    res = json.loads((run / "results.json").read_text())
    assert set(res["saes"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
                                "blocks.0.hook_resid_mid__to__blocks.0.hook_mlp_out"}
    # a forward pass per LM batch, shared by the four SAEs (+1: the 2-token probe that reads the widths)
    assert res["lm_forward_calls"] + 1 == n_calls
    masked_per_batch = cfg.lm_batch * (cfg.seq_len - 1)  # BOS excluded (a few EOS too)
    rows = 1024 + res["steps"] * 256  # the filled buffer, then every consumed row is refilled once
    assert rows / masked_per_batch <= res["lm_forward_calls"] <= rows / (0.8 * masked_per_batch) + 1
    # four SAEs, one pass: a pass per SAE would need 4x the forward calls


def test_saelens_layout_and_round_trip(trained, tmp_path):
    run = trained[0]
    d = run / "saes" / "blocks.1.hook_resid_post"
    assert {p.name for p in d.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 2 * cfg["d_in"]
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["model_name"] == "ref:dense"
    sae = S.load_sae(d)
    S.save_sae(sae, tmp_path / "copy")
    a = (d / "sae_weights.safetensors").read_bytes()
    assert (tmp_path / "copy" / "sae_weights.safetensors").read_bytes() == a  # bit-exact
    again = S.load_sae(tmp_path / "copy")
    for n, p in sae.state_dict().items():
        assert torch.equal(p, again.state_dict()[n]), n
    tc = S.load_sae(run / "saes" / "blocks.0.hook_resid_mid__to__blocks.0.hook_mlp_out")
    assert tc.is_transcoder and tc.hook_name_out == "blocks.0.hook_mlp_out"
    x = torch.randn(5, sae.d_in)
    assert sae.encode(x).shape == (5, sae.d_sae) and sae(x).shape == (5, sae.d_out)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)  # folded


def test_eval_reports_metrics_and_jumprelu(trained, sae_text, tmp_path):
    run = trained[0]
    cfg = S.SAEEvalConfig(sae=[str(run / "saes" / "blocks.1.hook_resid_post"), str(run / "saes" /
                                                                                     "blocks.1.hook_mlp_out")],
                          tokens=256, fit_tokens=512, data=str(sae_text), max_bytes=200_000, seq_len=32, lm_batch=4,
                          threads=1, out=str(tmp_path / "eval"), save_jumprelu=True)
    res = json.loads((S.main_eval(cfg) / "results.json").read_text())
    r = res["topk"]["saes"]["blocks.1.hook_resid_post"]
    assert r["l0"] == pytest.approx(4.0, abs=0.01)
    assert -1.0 < r["explained_variance"] <= 1.0 and 0.0 <= r["dead_frac"] <= 1.0
    assert r["kl"] >= -1e-6 and "delta_ce" in r and "ce_score" in r
    assert "all_spliced" in res["topk"]
    for m in ("global", "per_feature"):
        j = res["jumprelu"][m]["saes"]["blocks.1.hook_resid_post"]
        assert j["architecture"] == "jumprelu" and j["l0"] > 0
    assert S.load_sae(tmp_path / "eval" / "jumprelu-global" / "blocks.1.hook_resid_post").architecture == "jumprelu"


def test_jumprelu_thresholds_match_topk_rates():
    torch.manual_seed(0)
    sae = S.SAE(16, 64, 6).init_llama_scope(0.5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    sae.fold()
    x = torch.randn(2000, 16)
    g = S.to_jumprelu(sae, x, "global")
    assert float((g.encode(x) != 0).sum(-1).float().mean()) == pytest.approx(6.0, rel=0.01)  # mean L0 = k
    pf = S.to_jumprelu(sae, x, "per_feature")
    topk_rate = (sae.encode(x) != 0).float().mean(0)
    jr_rate = (pf.encode(x) != 0).float().mean(0)
    assert torch.allclose(jr_rate, topk_rate, atol=2 / 2000)  # every feature keeps its firing rate
    with pytest.raises(LmlabError, match="JumpReLU method"):
        S.jumprelu_thresholds(sae, x, "nope")


def test_dashboard(trained, sae_text, tmp_path):
    run = trained[0]
    cfg = SAEDashboardConfig(sae=[str(run)], tokens=256, features=5, examples=3, context=3, data=str(sae_text),
                             max_bytes=200_000, seq_len=32, lm_batch=4, threads=1, out=str(tmp_path / "dash"))
    out = dashboard_main(cfg)
    index = (out / "dashboard" / "index.html").read_text()
    assert "<input id='q'" in index and "blocks.1.hook_mlp_out.html" in index
    page = (out / "dashboard" / "blocks.1.hook_resid_post.html").read_text()
    assert page.count("class='card'") == 5 and "outline:2px solid" in page and "logit effects" in page
    assert (out / "dashboard" / "blocks.1.hook_resid_post_density.png").stat().st_size > 1000


def test_resume_after_interruption(ref_zoo, sae_text, tmp_path):
    cfg = _cfg(tmp_path, sae_text, hooks=["L0R"], tokens="4k", stop_after=6, eval_tokens=0)
    with pytest.raises(LmlabError, match="stopped after step 6"):
        S.main_train(cfg)
    ck = tmp_path / "train" / "checkpoint" / "state.json"
    assert json.loads(ck.read_text())["step"] == 6 and not (tmp_path / "train" / "results.json").exists()
    run = S.main_train(_cfg(tmp_path, sae_text, hooks=["L0R"], tokens="4k", eval_tokens=0))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert steps[-1] == 15 and steps.count(10) == 1  # logged once: steps 7..15 came from the resumed run
    assert not (run / "checkpoint").exists() and (run / "saes" / "blocks.0.hook_resid_post" / "cfg.json").is_file()


def test_bad_input(ref_zoo, sae_text, tmp_path):
    with pytest.raises(LmlabError, match="unknown hook name.*valid names include"):
        S.main_train(_cfg(tmp_path, sae_text, hooks=["blocks.9.hook_nothing"]))
    with pytest.raises(LmlabError, match="k=999 is larger than the dictionary"):
        S.main_train(_cfg(tmp_path, sae_text, k=999))
    with pytest.raises(ConfigError, match="k=70 is larger"):
        S.SAETrainConfig(k=70, d_sae=64)
    with pytest.raises(ConfigError, match="tokens"):
        S.SAETrainConfig(tokens="lots")
    assert not (tmp_path / "train").exists()  # nothing was started
    with pytest.raises(LmlabError, match="NaN"):
        S.check_finite("blocks.0.hook_resid_post", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(LmlabError, match="NaN/Inf"):
        S.dataset_scale(torch.full((4, 3), float("nan")))
    with pytest.raises(LmlabError, match="not an SAE folder"):
        S.load_sae(tmp_path)


def test_parse_count_and_hook_specs():
    assert S.parse_count("2M") == 2_000_000 and S.parse_count("500k") == 500_000 and S.parse_count(4096) == 4096
    assert S.parse_hook_specs(["a", "x -> y"]) == [("a", "a"), ("x", "y")]


def test_mamba_mixer_and_resid_saes(ref_zoo, sae_text, tmp_path):
    run = S.main_train(_cfg(tmp_path, sae_text, model="ref:mamba", hooks=["blocks.1.hook_mixer_out", "L0R"],
                            tokens="2k", eval_tokens=256))
    res = json.loads((run / "results.json").read_text())
    assert set(res["saes"]) == {"blocks.1.hook_mixer_out", "blocks.0.hook_resid_post"}
    assert res["saes"]["blocks.1.hook_mixer_out"]["eval"]["l0"] == pytest.approx(4.0, abs=0.01)
