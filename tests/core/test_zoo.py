"""Reference model zoo: name resolution (user cache beats shipped), list, build_model, token streams, and
``lmlab zoo train`` end to end on a tiny budget (run-dir contract, bf16 ship copy, refusal to overwrite)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_ref
from safetensors import safe_open

from lmlab import cli
from lmlab.config import ConfigError
from lmlab.core import zoo
from lmlab.core.models import load_model, n_params
from lmlab.core.runs import RunError
from lmlab.errors import LmlabError


def _user_text(path, n: int = 400) -> str:
    """A small user corpus: ``n`` distinct paragraphs (blank-line separated -> one document each)."""
    words = ["river", "stone", "lamp", "window", "garden", "engine", "letter", "silver", "market", "cloud"]
    paras = [f"Paragraph {i}: the {words[i % 10]} near the {words[(i * 7) % 10]} was {i * 13 % 97} steps away."
             for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return str(path)


def _model_dir(path, tok, name: str = "dense"):
    model = make_tiny_ref(name, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


# ---------------------------------------------------------------------------------------------------------------
# resolution


def test_resolve_user_zoo_beats_package(tmp_path, monkeypatch, tiny_tok):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "PACKAGE_ZOO", tmp_path / "pkg")
    with pytest.raises(LmlabError, match="lmlab zoo train dense"):
        zoo.resolve("dense")
    assert not zoo.is_available("dense")
    _model_dir(tmp_path / "pkg" / "dense", tiny_tok)
    assert zoo.resolve("dense") == tmp_path / "pkg" / "dense"
    # a folder without weights in the user zoo does not shadow the shipped model
    (tmp_path / "cache" / "zoo" / "dense").mkdir(parents=True)
    (tmp_path / "cache" / "zoo" / "dense" / "config.json").write_text("{}")
    assert zoo.resolve("dense") == tmp_path / "pkg" / "dense"
    _model_dir(tmp_path / "cache" / "zoo" / "dense", tiny_tok)
    assert zoo.resolve("dense") == tmp_path / "cache" / "zoo" / "dense"
    assert zoo.is_available("dense")
    # mamba is in neither place
    with pytest.raises(LmlabError, match="lmlab zoo train mamba"):
        zoo.resolve("mamba")


def test_unbuilt_and_unknown_names():
    # ref:moe is a registered architecture that is not shipped: resolving it says how to build it
    with pytest.raises(LmlabError, match="lmlab zoo train moe"):
        zoo.resolve("moe")
    with pytest.raises(LmlabError, match=r"unknown reference model 'ref:gpt5'.*dense.*mamba.*moe"):
        zoo.resolve("gpt5")
    with pytest.raises(LmlabError, match="lmlab zoo train moe"):
        load_model("ref:moe")
    zoo.RESERVED["future"] = "ref:future is reserved for a later capability"
    try:
        with pytest.raises(LmlabError, match="reserved for a later capability"):
            zoo.resolve("future")
    finally:
        del zoo.RESERVED["future"]


def test_ref_zoo_fixture_resolves(ref_zoo):
    assert zoo.resolve("dense") == ref_zoo / "dense"
    assert zoo.resolve("mamba") == ref_zoo / "mamba"
    assert zoo.card("dense")["name"] == "dense"


def test_list_rows_and_main(ref_zoo, capsys):
    rows = {r["name"]: r for r in zoo.list_rows()}
    assert set(rows) == {"ref:dense", "ref:mamba", "ref:moe"}
    for name in ("dense", "mamba"):
        r = rows[f"ref:{name}"]
        assert r["source"] == "cache" and r["path"] == str(ref_zoo / name)
        assert r["params"] == json.loads((ref_zoo / name / zoo.CARD).read_text())["params"]
        assert r["bpb"] == {"math": 3.0}
    assert rows["ref:moe"]["source"] == "missing"
    text = zoo.list_main(zoo.ZooListConfig())
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["name", "source"]
    assert [ln.split()[0] for ln in lines[1:]] == ["ref:dense", "ref:mamba", "ref:moe"]
    assert "math 3.0" in lines[1]
    assert json.loads(zoo.list_main(zoo.ZooListConfig(json=True))) == zoo.list_rows()
    # the CLI leaf prints the same table
    assert cli.main(["zoo", "list"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()


# ---------------------------------------------------------------------------------------------------------------
# build_model


@pytest.mark.parametrize("arch,cls,hidden", [("dense", "LlamaForCausalLM", 192), ("mamba", "Mamba2ForCausalLM", 192)])
def test_build_model_reference_arch(arch, cls, hidden):
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    m = zoo.build_model(arch, vocab_size=300, special=special)
    assert type(m).__name__ == cls and m.training
    assert m.config.vocab_size == 300 and m.config.hidden_size == hidden
    assert m.config.eos_token_id == 0 and m.config.pad_token_id == 1
    assert m.get_input_embeddings().weight.shape == (300, hidden)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied
    assert all(p.dtype == torch.float32 for p in m.parameters())
    logits = m(input_ids=torch.randint(0, 300, (1, 8))).logits
    assert logits.shape == (1, 8, 300)


def test_build_model_from_config_folder_and_file(tmp_path, tiny_tok):
    _model_dir(tmp_path / "m", tiny_tok, "mamba")
    for spec in (tmp_path / "m", tmp_path / "m" / "config.json"):
        m = zoo.build_model(str(spec), vocab_size=123)
        assert type(m).__name__ == "Mamba2ForCausalLM"
        assert m.config.vocab_size == 123 and m.config.hidden_size == 32
        assert m.get_input_embeddings().weight.shape == (123, 32)
    with pytest.raises(LmlabError, match="unknown architecture"):
        zoo.build_model("no-such-arch", vocab_size=10)


def test_build_model_pretrained_loads_weights(ref_zoo):
    m = zoo.build_model("ref:dense", vocab_size=0, init="pretrained")
    ref = load_model("ref:dense")
    assert m.training
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------------------------
# token streams


def test_token_streams_user_file(tmp_path, tiny_tok):
    path = _user_text(tmp_path / "notes.txt")
    tr, va, meta = zoo.token_streams(tiny_tok, path, max_bytes=1_000_000)
    assert len(tr) > 1000 and len(va) > 0
    assert meta["train_tokens"] == len(tr) and meta["val_tokens"] == len(va)
    assert meta["tokenizer_hash"] == zoo.tokenizer_hash(tiny_tok)
    eos = tiny_tok.eos_token_id
    assert tr[-1] == eos and va[-1] == eos
    n_docs = 400
    assert int((tr == eos).sum()) + int((va == eos).sum()) == n_docs  # one EOS per paragraph
    # the streams decode back to the paragraphs
    text = tiny_tok.decode(np.asarray(tr[: list(tr).index(eos)]).tolist())
    assert text.startswith("Paragraph ") and text in (tmp_path / "notes.txt").read_text()
    cached = list((zoo.user_zoo().parent / "tokens").glob(f"{meta['corpus_hash']}-*/train.npy"))
    assert len(cached) == 1
    tr2, va2, meta2 = zoo.token_streams(tiny_tok, path, max_bytes=1_000_000)  # from the cache
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert meta2 == meta
    # a cap changes the corpus (and its hash)
    tr3, _, meta3 = zoo.token_streams(tiny_tok, path, max_bytes=5_000)
    assert meta3["corpus_hash"] != meta["corpus_hash"] and len(tr3) < len(tr)


def test_token_streams_errors(tmp_path, tiny_tok):
    with pytest.raises(LmlabError, match="no training data"):
        zoo.token_streams(tiny_tok, " , ", max_bytes=1000)
    (tmp_path / "one.txt").write_text("just one paragraph, so nothing is left for validation\n")
    with pytest.raises(LmlabError, match="too little text"):
        zoo.token_streams(tiny_tok, str(tmp_path / "one.txt"), max_bytes=1000)


# ---------------------------------------------------------------------------------------------------------------
# lmlab zoo train


def test_zoo_train_config_validation():
    with pytest.raises(ConfigError, match="name must be one of"):
        zoo.ZooTrainConfig(name="gpt5")
    assert zoo.ZooTrainConfig(name="moe").name == "moe"
    assert zoo.ZooTrainConfig().optim == zoo.REF_OPTIM
    assert zoo.ZooTrainConfig().optim is not zoo.REF_OPTIM  # each config gets its own copy


def test_zoo_train_end_to_end(ref_zoo, tmp_path):
    text = _user_text(tmp_path / "user.txt")
    optim = dataclasses.replace(zoo.REF_OPTIM, steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=0,
                                eval_batches=1, save_every=0, log_every=1, autocast=False)
    cfg = zoo.ZooTrainConfig(name="dense", max_bytes=20_000, domains=["math", text], optim=optim,
                             install=False, ship_dir=str(tmp_path / "ship"), out=str(tmp_path / "run"),
                             device="cpu")
    run = zoo.train_main(cfg)
    assert run == tmp_path / "run"
    # run-dir contract
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "dense"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["command"] == "zoo-train-dense"
    assert meta["data"]["corpus_hash"] and meta["params"] > 0
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    assert (run / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 3 and res["train_tokens"] == 3 * 2 * 16
    assert set(res["val"]) == {"math", text}
    for dom in res["val"].values():
        assert math.isfinite(dom["bpb"]) and dom["bpb"] > 0 and dom["tokens"] > 0
        assert dom["bpb"] == pytest.approx(dom["loss"] * dom["tokens"] / (math.log(2) * dom["bytes"]), rel=1e-6)
    # the trained model (fp32) loads by path and carries its card
    model = load_model(str(run / "model"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 192
    assert n_params(model) == res["params"]
    assert json.loads((run / "model" / zoo.CARD).read_text()) == res
    # the ship copy: bf16 on disk, loads as fp32, same weights up to bf16 rounding, plus the tokenizer
    ship = tmp_path / "ship"
    shards = list((ship / "dense").glob("*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    shipped = load_model(str(ship / "dense"))
    assert all(p.dtype == torch.float32 for p in shipped.parameters())
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    torch.testing.assert_close(shipped(input_ids=x).logits, model(input_ids=x).logits, atol=0.1, rtol=0.05)
    assert json.loads((ship / "dense" / zoo.CARD).read_text())["name"] == "dense"
    assert (ship / "tokenizer" / "tokenizer.json").is_file()
    # install=False left the user zoo's (tiny) dense model alone
    assert zoo.resolve("dense") == ref_zoo / "dense"
    assert load_model("ref:dense").config.hidden_size == 32
    # a complete run is never overwritten
    with pytest.raises(RunError, match="already holds a complete run"):
        zoo.train_main(cfg)
    assert json.loads((run / "results.json").read_text()) == res


def test_zoo_train_tokenizer_reports_reference(ref_zoo, tmp_path, tiny_tok):
    run = zoo.train_main(zoo.ZooTrainConfig(name="tokenizer", out=str(tmp_path / "tok"), device="cpu"))
    res = json.loads((run / "results.json").read_text())
    assert res == {"vocab_size": len(tiny_tok), "tokenizer_hash": zoo.tokenizer_hash(tiny_tok)}
