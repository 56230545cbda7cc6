"""``lmlab eval ppl``: byte accounting of the scored stream, bpb = loss·tokens/(ln2·bytes) against a direct
forward pass, and ``main`` end to end on the tiny reference zoo (run-dir contract, fail before the run dir)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_llama

from lmlab.config import ConfigError, from_dict
from lmlab.core.models import load_model, n_params
from lmlab.errors import LmlabError
from lmlab.evaluate import perplexity as P

DOCS = ["def add(a, b):\n    return a + b\n", "Grüße aus München: naïve café ☕ costs 3 €.",
        "Q: What is 17 + 25?\nA: 42", "x" * 8]


def test_stream_counts_bytes_and_eos(tiny_tok):
    eos = tiny_tok.eos_token_id
    ids, n_bytes = P.stream(tiny_tok, DOCS, max_tokens=10_000)
    assert n_bytes == sum(len(t.encode()) + 1 for t in DOCS)  # UTF-8 bytes, not characters, + one per EOS
    assert n_bytes > sum(len(t) + 1 for t in DOCS)  # the non-ASCII doc makes the difference visible
    encs = [tiny_tok(t, add_special_tokens=False)["input_ids"] for t in DOCS]
    assert ids.tolist() == [i for e in encs for i in e + [eos]]
    assert ids.dtype == np.int64


def test_stream_truncates_last_document(tiny_tok):
    encs = [tiny_tok(t, add_special_tokens=False)["input_ids"] for t in DOCS]
    first = len(encs[0]) + 1
    for cut in range(1, len(encs[1])):
        ids, n_bytes = P.stream(tiny_tok, DOCS, max_tokens=first + cut)
        assert len(ids) == first + cut
        assert ids[:first].tolist() == encs[0] + [tiny_tok.eos_token_id]
        assert ids[first:].tolist() == encs[1][:cut]
        cut_bytes = n_bytes - len(DOCS[0].encode()) - 1
        # byte-level BPE: each character of a token string is one byte of the text
        covered = sum(len(s) for s in tiny_tok.convert_ids_to_tokens(encs[1][:cut]))
        # counted: the kept tokens' bytes, less at most a split multi-byte character (never more)
        assert covered - 3 <= cut_bytes <= covered, cut
        DOCS[1].encode()[:cut_bytes].decode()  # ends on a character boundary (raises otherwise)
    # exactly at a document boundary nothing is cut
    ids, n_bytes = P.stream(tiny_tok, DOCS, max_tokens=first)
    assert len(ids) == first and n_bytes == len(DOCS[0].encode()) + 1


def test_evaluate_model_matches_direct_forward(tiny_tok):
    model = make_tiny_llama(vocab_size=len(tiny_tok))
    texts = {"mix": DOCS}
    ids, n_bytes = P.stream(tiny_tok, DOCS, max_tokens=10_000)
    assert len(ids) < 128  # one window holds the whole stream
    res = P.evaluate_model(model, tiny_tok, texts, max_tokens=10_000, window=128)["mix"]
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1]
    direct = torch.nn.functional.cross_entropy(logits.double(), x[0, 1:]).item()
    assert res["tokens"] == len(ids) - 1 and res["bytes"] == n_bytes
    assert res["loss"] == pytest.approx(direct, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)
    assert res["bpb"] == pytest.approx(res["loss"] * res["tokens"] / (math.log(2) * res["bytes"]), rel=1e-9)
    # a random-init model is close to uniform over the vocabulary
    assert abs(res["loss"] - math.log(len(tiny_tok))) < 0.5
    # shorter windows score the same tokens with less context
    small = P.evaluate_model(model, tiny_tok, texts, max_tokens=10_000, window=8, batch_size=3)["mix"]
    assert small["tokens"] == res["tokens"] and small["bytes"] == res["bytes"]
    with pytest.raises(ConfigError, match="no validation text"):
        P.evaluate_model(model, tiny_tok, {"empty": []}, max_tokens=100, window=8)


def test_config_validation():
    with pytest.raises(ConfigError, match="at least one model"):
        P.PerplexityConfig(model=[])
    with pytest.raises(ConfigError, match="window"):
        P.PerplexityConfig(window=1)
    with pytest.raises(ConfigError, match="window"):
        P.PerplexityConfig(window=64, max_tokens=32)


def _user_text(path):
    path.write_text("\n\n".join(f"Note {i}: the lamp by window {i % 7} is {i * 3 % 11} metres from the door."
                                for i in range(300)) + "\n")
    return str(path)


def test_main_on_reference_zoo(ref_zoo, tmp_path, tiny_tok):
    notes = _user_text(tmp_path / "notes.txt")
    cfg = P.PerplexityConfig(model=["ref:dense", "ref:mamba"], data=["math", notes], max_tokens=256, window=64,
                             batch_size=4, out=str(tmp_path / "run"), device="cpu")
    run = P.main(cfg)
    assert run == tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["window"] == 64 and res["max_tokens"] == 256
    assert set(res["models"]) == {"ref:dense", "ref:mamba"}
    for spec, m in res["models"].items():
        assert m["params"] == n_params(load_model(spec))
        assert set(m["domains"]) == {"math", "notes.txt"}
        for d in m["domains"].values():
            assert d["tokens"] == 255  # 256 tokens, the first one is context only
            assert math.isfinite(d["bpb"]) and d["bpb"] > 0
            assert abs(d["loss"] - math.log(len(tiny_tok))) < 0.5  # random init: ~uniform
            assert d["bpb"] == pytest.approx(d["loss"] * d["tokens"] / (math.log(2) * d["bytes"]), rel=1e-9)
    # the two architectures are different models
    losses = {spec: m["domains"]["math"]["loss"] for spec, m in res["models"].items()}
    assert losses["ref:dense"] != losses["ref:mamba"]
    assert (run / "plots" / "bits_per_byte.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["model"], s["prompt"]) for s in samples] == [(m, p) for m in cfg.model for p in P.PROMPTS]
    assert all(isinstance(s["completion"], str) for s in samples)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["command"] == "eval-ppl"
    assert from_dict(P.PerplexityConfig, yaml.safe_load((run / "config.yaml").read_text())) == cfg


def test_domain_texts_reads_val_split_and_files(tmp_path):
    notes = _user_text(tmp_path / "notes.txt")
    texts = P.domain_texts(["math", notes], max_bytes=50_000)
    assert list(texts) == ["math", "notes.txt"]
    assert texts["math"] and all(t.startswith("Q: ") for t in texts["math"])
    assert len(texts["notes.txt"]) == 300  # a user file is scored whole, one document per paragraph


def test_missing_model_fails_before_run_dir(ref_zoo, tmp_path):
    cfg = P.PerplexityConfig(model=["ref:dense", str(tmp_path / "nope")], data=["math"], max_tokens=64,
                             window=16, out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(LmlabError, match="model path not found"):
        P.main(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(LmlabError, match="lmlab zoo train moe"):  # registered but not built
        P.main(P.PerplexityConfig(model=["ref:moe"], out=str(tmp_path / "run2")))
    assert not (tmp_path / "run2").exists()
