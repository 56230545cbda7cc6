"""MPPC maths (streaming Pearson, MPPC, summaries) and the synthetic universality acceptance test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.interp.sae import SAE, dataset_scale, train_step
from lmlab.interp.similarity import PearsonAccumulator, TokenEntropy, mppc, pearson_matrix, summarize, synthetic_codes


def test_streaming_pearson_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 7, generator=g), torch.randn(500, 5, generator=g)
    b[:, 0] = 3 * a[:, 2] + 0.1 * b[:, 0]
    c = pearson_matrix(a, b, chunk=37)  # uneven chunks
    ref = np.corrcoef(a.numpy().T, b.numpy().T)[:7, 7:]
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-10)
    m = mppc(c)
    assert m[2] > 0.99 and int(c[2].argmax()) == 0


def test_dead_features_are_nan_and_excluded():
    a = torch.randn(100, 3)
    a[:, 1] = 0.0  # never fires
    m = mppc(pearson_matrix(a, torch.randn(100, 4)))
    assert torch.isnan(m[1]) and not torch.isnan(m[0])
    s = summarize(m)
    assert s["n"] == 2 and s["n_dead"] == 1 and len(s["mean_ci"]) == 2


def test_empty_stream_is_a_clear_error():
    with pytest.raises(LmlabError, match="empty token stream"):
        PearsonAccumulator(2, 2).corr()
    with pytest.raises(LmlabError, match="different token counts"):
        PearsonAccumulator(2, 2).update(torch.zeros(3, 2), torch.zeros(4, 2))


def test_token_entropy():
    feats = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ent = TokenEntropy(2, 5)
    ent.update(feats, torch.tensor([0, 1, 2, 3]))
    e, top = ent.result()
    assert e[0] == pytest.approx(np.log(4)) and e[1] == pytest.approx(0.0) and top[1] == 1.0


def _train_sae(x: torch.Tensor, d_sae: int, k: int, steps: int, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(x.shape[1], d_sae, k).init_llama_scope(0.5, g)
    sae.scale_in.fill_(dataset_scale(x))
    sae.scale_out.fill_(dataset_scale(x))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (512,), generator=g)]
        out = train_step(sae, batch, batch, k)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return sae.fold().eval()


def test_synthetic_universality():
    """Same sparse codes through different dictionaries -> SAE features match (MPPC mean >= 0.5, many > 0.7);
    independent codes -> MPPC mean < 0.1."""
    torch.manual_seed(0)
    n, latents, d = 20_000, 48, 32
    codes, xa = synthetic_codes(n, latents, d, p=0.04, seed=1)
    _, xb = synthetic_codes(n, latents, d, seed=2, codes=codes)
    xb = torch.tanh(xb)  # a different (nonlinear) embedding of the same features
    _, xc = synthetic_codes(n, latents, d, p=0.04, seed=3)  # independent codes
    saes = {name: _train_sae(x, 96, 4, 400, seed) for seed, (name, x) in enumerate(
        [("a", xa), ("b", xb), ("c", xc)])}
    with torch.no_grad():
        fa, fb, fc = (saes[k].encode(x) for k, x in (("a", xa), ("b", xb), ("c", xc)))
    live = (fa > 0).sum(0) >= 10
    same = summarize(mppc(pearson_matrix(fa, fb))[live])
    indep = summarize(mppc(pearson_matrix(fa, fc))[live])
    print(same["mean"], same["frac_gt_0.7"], indep["mean"], indep["frac_gt_0.7"])
    assert same["mean"] >= 0.5
    assert indep["mean"] < 0.1
    assert same["frac_gt_0.7"] > indep["frac_gt_0.7"] + 0.25


# ----------------------------------------------------------------------------------------------------------
# the command on the tiny reference zoo (random-weight models, freshly initialised SAEs: plumbing, not numbers)


@pytest.fixture(scope="module")
def sim_text(tmp_path_factory, tiny_corpus):
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("sim-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


def _sae_run(root, model_name: str, seed: int = 0):
    """A run dir holding an SAE per resid_post layer of ``model_name`` (SAELens layout, as sae train writes)."""
    from lmlab.core.hooks import n_layers
    from lmlab.core.models import load_model
    from lmlab.interp.sae import save_sae

    model = load_model(model_name)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    for i in range(n_layers(model)):
        hook = f"blocks.{i}.hook_resid_post"
        sae = SAE(d, 4 * d, 4, hook_name=hook, model_name=model_name).init_llama_scope(0.5, g)
        save_sae(sae, root / "saes" / hook)
    return root


def _cfg(a, b, text, tmp_path, **kw):
    from lmlab.interp.similarity import SimilarityConfig

    base = dict(sae_a=str(a), sae_b=str(b), tokens=600, data=str(text), max_bytes=200_000, seq_len=32, lm_batch=8,
                min_fires=2, out=str(tmp_path / "sim"), threads=1)
    base.update(kw)
    return SimilarityConfig(**base)


def test_similarity_command(ref_zoo, sim_text, tmp_path):
    import json

    from lmlab.interp.similarity import main

    a = _sae_run(tmp_path / "a", "ref:dense")
    b = _sae_run(tmp_path / "b", "ref:mamba")
    a2 = _sae_run(tmp_path / "a2", "ref:dense", seed=1)
    run = main(_cfg(a, b, sim_text, tmp_path, extra=[f"sae_seed={a2}"]))
    res = json.loads((run / "results.json").read_text())
    assert set(res["comparisons"]) == {"main", "sae_seed", "random"}
    assert res["tokens"] > 200  # the tiny val split holds ~300 tokens
    for summ in res["comparisons"].values():
        assert -1 <= summ["mean"] <= 1 and summ["mean_ci"][0] <= summ["mean"] <= summ["mean_ci"][1]
    assert np.array(res["depth"]["main"]).shape == (2, 2)
    assert set(res["neurons"]) == {"main", "random"}
    assert (run / "plots" / "mppc_hist.png").is_file() and (run / "plots" / "depth_main.png").is_file()


def test_identical_sides_give_mppc_one(ref_zoo, sim_text, tmp_path):
    """A run compared with itself: every live feature finds itself (MPPC = 1)."""
    import json

    from lmlab.interp.similarity import main

    a = _sae_run(tmp_path / "a", "ref:dense")
    run = main(_cfg(a, a, sim_text, tmp_path, random_baseline=False, neurons=False))
    res = json.loads((run / "results.json").read_text())
    assert res["comparisons"]["main"]["mean"] == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_are_clear_errors(ref_zoo, sim_text, tmp_path, tiny_corpus):
    from lmlab.core.models import load_model
    from lmlab.core.tokenizer import save_tokenizer, train_bpe
    from lmlab.interp.similarity import main

    a = _sae_run(tmp_path / "a", "ref:dense")
    with pytest.raises(LmlabError, match="SAE run not found"):
        main(_cfg(a, tmp_path / "missing", sim_text, tmp_path))
    # another tokenizer: the same tiny model saved with a differently trained BPE
    other = tmp_path / "other-model"
    save_tokenizer(train_bpe(tiny_corpus.texts("train"), vocab_size=280), other)  # (replaces the folder)
    load_model("ref:dense").save_pretrained(other)
    b = _sae_run(tmp_path / "b", str(other))
    with pytest.raises(LmlabError, match="different tokenizers"):
        main(_cfg(a, b, sim_text, tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("x\n")
    with pytest.raises(LmlabError, match="empty token stream|shorter than one sequence|no text|empty"):
        main(_cfg(a, a, empty, tmp_path))
    assert not (tmp_path / "sim").exists()  # validated before the run dir


LEAVES = [
    ("interp similarity", "lmlab.interp.similarity:main", "lmlab.interp.similarity:SimilarityConfig",
     "feature universality of two models' SAEs: max pairwise Pearson correlation (MPPC), baselines, depth",
     ("sae_a", "sae_b")),
    ("interp circuits", "lmlab.interp.circuits:main", "lmlab.interp.circuits:CircuitsConfig",
     "induction heads (Transformer), conv-lag / mixer ablations and the Off-by-One probe (Mamba)", ("model",)),
]


def test_cli_leaves(monkeypatch, ref_zoo, tmp_path, capsys):
    """The proposed cli.COMMANDS rows: --help works, a missing run is a one-line error, circuits runs."""
    from lmlab import cli

    have = {c.words for c in cli.COMMANDS}
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [cli.Leaf(*r) for r in LEAVES if r[0] not in have])
    for words in ("interp similarity", "interp circuits"):
        with pytest.raises(SystemExit) as e:
            cli.main([*words.split(), "--help"])
        assert e.value.code == 0
    rc = cli.main(["interp", "similarity", str(tmp_path / "nope"), str(tmp_path / "nope2"), "-q"])
    assert rc != 0 and "SAE run not found" in capsys.readouterr().err
    rc = cli.main(["interp", "circuits", "ref:mamba", "--half-len", "6", "--n-seq", "8", "--max-offset", "1",
                   "--probe-vocab", "8", "--out", str(tmp_path / "c"), "-q"])
    assert rc == 0 and (tmp_path / "c" / "results.json").is_file()
