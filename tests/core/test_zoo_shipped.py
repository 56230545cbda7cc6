"""The reference models shipped in the package are real, learned models whose cards tell the truth (slow)."""

from __future__ import annotations

import json

import pytest

from lmlab.core import zoo
from lmlab.core.corpus import build_corpus
from lmlab.core.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["dense", "mamba"])
def test_shipped_model_matches_its_card(name):
    path = zoo.PACKAGE_ZOO / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not shipped in this checkout")
    card = json.loads((path / zoo.CARD).read_text())
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    corpus = build_corpus(domains=tuple(card["domains"]), max_bytes=card["max_bytes"], seed=card["seed"])
    assert corpus.hash == card["corpus_hash"], "corpus changed since the model was trained"
    assert zoo.tokenizer_hash(tok) == card["tokenizer_hash"]
    got = zoo.domain_eval(model, tok, corpus)
    for domain, ref in card["val"].items():
        # the card was measured on the fp32 weights; the shipped copy is bf16
        assert got[domain]["bpb"] == pytest.approx(ref["bpb"], rel=0.02), domain
        assert got[domain]["bpb"] < {"code": 2.2, "prose": 2.4, "math": 0.6}[domain], "not a learned model"
