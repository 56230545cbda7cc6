"""lmlab.core.tokenizer: byte-level BPE train -> save -> load, exact round trips, specials, bytes/token."""

from __future__ import annotations

import random
import unicodedata

import pytest

from lmlab.core.tokenizer import bytes_per_token, load_tokenizer, save_tokenizer, train_bpe
from lmlab.errors import LmlabError

TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "caf\u00e9 na\u00efve \u00fcber \u0153uvre",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001f916\U0001f44d\U0001f3fd zwj \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "control \x00\x01\x7f and \ufeff bom",
    "<|endoftext|> looks special but is typed by a user",
    "def f(x):\n    return x ** 2  # \u03bb",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


@pytest.fixture(scope="module")
def saved_tok(tiny_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe"
    save_tokenizer(tiny_tok, path)
    return load_tokenizer(path)


def test_specials_and_vocab_size(tiny_tok, saved_tok):
    for tok in (tiny_tok, saved_tok):
        assert len(tok) == 300
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
        assert tok.bos_token_id == 0 and tok.pad_token == "<|pad|>" and tok.pad_token_id == 1
        ids = tok.encode("hello world")
        assert 0 not in ids and 1 not in ids  # encode adds no special tokens
        assert max(tok.get_vocab().values()) == 299


def test_roundtrip_after_save_and_load(tiny_tok, saved_tok):
    rng = random.Random(0)
    texts = TRICKY + [_random_unicode(rng, rng.randint(1, 200)) for _ in range(50)]
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    for t in texts:
        ids = saved_tok.encode(t, add_special_tokens=False)
        assert saved_tok.decode(ids) == t
        assert ids == tiny_tok.encode(t, add_special_tokens=False)  # same tokenizer after the round trip


def test_nfc_normalisation():
    tok = train_bpe(["e\u0301t\u00e9 " * 20, "plain text " * 20], vocab_size=270)
    assert tok.decode(tok.encode("e\u0301t\u00e9")) == "\u00e9t\u00e9"


def test_merges_compress_and_bytes_per_token(tiny_tok, tiny_corpus):
    bytes_only = train_bpe(["abc"], vocab_size=258)  # no room for merges: one token per byte
    text = tiny_corpus.texts("val")
    assert len(bytes_only) == 258
    assert bytes_per_token(bytes_only, ["hello, world"]) == 1.0
    assert len(bytes_only.encode("\u00e9\U0001f916")) == 6  # one token per UTF-8 byte
    assert bytes_per_token(bytes_only, ["\u00e9\U0001f916 caf\u00e9"]) == 1.0
    bpt = bytes_per_token(tiny_tok, text)
    assert 1.3 < bpt < 6
    assert bytes_per_token(tiny_tok.backend_tokenizer, text) == pytest.approx(bpt)
    with pytest.raises(LmlabError):
        bytes_per_token(tiny_tok, [""])


def test_vocab_size_is_an_upper_bound(tiny_corpus):
    tok = train_bpe(tiny_corpus.texts("train"), vocab_size=400, min_frequency=2)
    assert 300 < len(tok) <= 400
    few = train_bpe(["ab ab"], vocab_size=1000)
    assert len(few) < 1000  # not enough pairs to reach the target


def test_train_errors():
    with pytest.raises(LmlabError, match="vocab_size must be >= 258"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(LmlabError, match="no text"):
        train_bpe(["", ""], vocab_size=300)
    with pytest.raises(LmlabError, match="special token"):
        train_bpe(["x"], special_tokens=())


def test_save_overwrites_atomically(tiny_tok, tmp_path):
    path = tmp_path / "tok"
    save_tokenizer(train_bpe(["abc abc"], vocab_size=260), path)
    assert len(load_tokenizer(path)) < 300
    save_tokenizer(tiny_tok, path)
    assert len(load_tokenizer(path)) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp or backup dirs left
    assert (path / "tokenizer.json").is_file()


def test_load_tokenizer_json_file(tiny_tok, tmp_path):
    save_tokenizer(tiny_tok, tmp_path / "t")
    tok = load_tokenizer(tmp_path / "t" / "tokenizer.json")
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert tok.decode(tok.encode("r\u00e9sum\u00e9 \U0001f916")) == "r\u00e9sum\u00e9 \U0001f916"


def test_load_errors(tmp_path):
    with pytest.raises(LmlabError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LmlabError):
        load_tokenizer(tmp_path / "x.txt")
