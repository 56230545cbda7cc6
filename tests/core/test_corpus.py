"""lmlab.core.corpus: domains, dedup, split stability, cap, hashes, cache, user data, token files."""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest

from lmlab.core import corpus as C
from lmlab.errors import LmlabError

# --------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="session")
def code_math(corpus_cache):
    """The full code domain and 50k math problems (about 1.5 s; prose is tested on a file subset)."""
    return C.build_corpus(("code", "math"), cache_dir=corpus_cache)


# --------------------------------------------------------------------------------------------------------------
# built-in domains


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LMLAB_CACHE")
    assert C.cache_dir() == tmp_path / "xdg" / "lmlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C.cache_dir() == tmp_path / "home" / ".cache" / "lmlab"


def test_stdlib_files_exclude_tests_and_site_packages():
    root = C.stdlib_root()
    files = C.stdlib_files()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300
    assert "os.py" in rels and "json/decoder.py" in rels
    for r in rels:
        parts = r.split("/")
        assert not C.EXCLUDED_DIRS.intersection(parts[:-1]), r
        assert not parts[-1].startswith("test_"), r
    # the directories the brief names exist in CPython and are excluded
    assert not any(r.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/", "unittest/test/")) for r in rels)


def test_code_domain_nonempty_and_deterministic(code_math, corpus_cache):
    again = C.build_corpus(("code", "math"), cache_dir=corpus_cache, use_cache=False)
    assert again.hash == code_math.hash and again.hashes == code_math.hashes
    st = code_math.stats["code"]
    assert st["train"]["docs"] > 300 and st["train"]["bytes"] > 5_000_000
    assert st["train"]["bytes"] == sum(len(d.encode()) for d in code_math.train["code"])
    bisect_src = C.normalize_text((C.stdlib_root() / "bisect.py").read_text())
    assert bisect_src in code_math.train["code"] + code_math.val["code"]


def test_cache_is_used_and_keyed(code_math, corpus_cache):
    folders = sorted(p.name for p in corpus_cache.iterdir() if (p / "manifest.json").is_file())
    assert any(f.startswith("code-") for f in folders) and any(f.startswith("math-") for f in folders)
    t0 = time.perf_counter()
    again = C.build_corpus(("code", "math"), cache_dir=corpus_cache)
    assert time.perf_counter() - t0 < 5
    assert again.hash == code_math.hash
    # a different seed is a different math cache entry and different content; code is shared
    other = C.build_corpus(("code", "math"), cache_dir=corpus_cache, seed=1)
    assert other.hashes["code"] == code_math.hashes["code"]
    assert other.hashes["math"] != code_math.hashes["math"]
    assert len([p for p in corpus_cache.iterdir() if p.name.startswith("math-")]) == 2


def test_registered_domain_is_built_once_then_cached(monkeypatch, tmp_path):
    calls = []

    def counted(seed: int) -> list[str]:
        calls.append(seed)
        return [f"document number {i} from seed {seed}" for i in range(50)]

    monkeypatch.setitem(C.DOMAINS, "counted", counted)
    a = C.build_corpus(("counted",), cache_dir=tmp_path)
    b = C.build_corpus(("counted",), cache_dir=tmp_path)
    assert calls == [0] and a.hash == b.hash
    C.build_corpus(("counted",), cache_dir=tmp_path, use_cache=False)
    C.build_corpus(("counted",), cache_dir=tmp_path, seed=3)
    assert calls == [0, 0, 3]
    manifest = json.loads(next(tmp_path.glob("counted-*/manifest.json")).read_text())
    assert manifest["docs"] == 50 and manifest["fingerprint"]["seed"] == 0
    assert not list(tmp_path.glob(".*tmp"))  # no temp dirs left behind


def test_prose_extraction_subset_deterministic():
    files = C.stdlib_files()[::25]
    a, b = C.prose_docs(files, topics=False), C.prose_docs(files, topics=False)
    assert a == b and len(a) > 10
    paras = [p for d in a for p in d.split("\n\n")]
    assert len(paras) == len(set(paras))  # each paragraph kept once
    assert all(len(p) >= C.MIN_PARAGRAPH_CHARS for p in paras)
    assert not any(p.lstrip().startswith(">>>") for p in paras)
    words = re.findall(r"[A-Za-z]+", " ".join(paras))
    assert len(words) > 2000
    assert sum(w.lower() in {"the", "a", "of", "to", "is"} for w in words) / len(words) > 0.08  # English


def test_pydoc_topics_are_prose():
    topics = C._pydoc_topics()
    assert len(topics) > 50
    assert any("assert" in t and "statement" in t for t in topics)


def test_comments_are_joined_and_filtered(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        '#!/usr/bin/env python3\n'
        '"""Module docstring that is long enough to be kept as a prose paragraph."""\n'
        "# This comment explains the algorithm in some detail and\n"
        "# continues on a second line that belongs to the same paragraph.\n"
        "#\n"
        "# short one\n"
        "x = 1  # an inline comment after code is not a full-line comment at all\n"
        "# y = compute_something(x, z)\n"
        "s = '# this is a string, not a comment, even though it is long enough'\n"
        "def f():\n"
        '    """Return one.\n\n    >>> f()\n    1\n    """\n'
        "    return 1\n"
    )
    (doc,) = C.prose_docs([src], topics=False)
    paras = doc.split("\n\n")
    assert paras == [
        "Module docstring that is long enough to be kept as a prose paragraph.",
        "This comment explains the algorithm in some detail and continues on a second line that belongs "
        "to the same paragraph.",
    ]


@pytest.mark.parametrize("text, code", [
    (">>> import os\n>>> os.getcwd()", True),
    ("x = compute(a, b)\nreturn x", True),
    ("if self._closed:\n    raise ValueError('closed')", True),
    ("{'a': [1, 2], 'b': (3, 4)} <=> {}", True),
    ("Return the index where to insert item x in list a, assuming a is sorted.", False),
    ("This is only needed if we don't already have the internal subset as a string.", False),
])
def test_looks_like_code(text, code):
    assert C.looks_like_code(text) is code


# --------------------------------------------------------------------------------------------------------------
# math


def _numbers(s: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", s)]


def test_math_problems_are_correct_and_deterministic():
    probs = C.math_problems(600, seed=0)
    assert probs == C.math_problems(600, seed=0)
    assert probs != C.math_problems(600, seed=1)
    assert len({p["question"] for p in probs}) == 600
    kinds = {p["kind"] for p in probs}
    assert {"add", "sub", "mul", "div", "boxes", "change", "share", "equation"} <= kinds
    step = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)\.")
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    for p in probs:
        q, ans, text = p["question"], p["answer"], p["text"]
        assert isinstance(ans, int)
        assert C.eval_expr(p["expr"]) == ans
        assert set(_numbers(p["expr"])) <= set(_numbers(q)), p
        assert text.startswith(f"Q: {q}\nA: ")
        m = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\?", q)
        if m:  # one-operation arithmetic: re-evaluate from the question itself
            assert ops[m[2]](int(m[1]), int(m[3])) == ans
            assert text.endswith(f"A: {ans}")
            continue
        steps = step.findall(text)
        assert steps, text
        for a, op, b, c in steps:
            assert ops[op](int(a), int(b)) == int(c), text
        assert int(steps[-1][3]) == ans
        assert text.endswith(f"The answer is {ans}.")


def test_eval_expr_rejects_non_arithmetic():
    assert C.eval_expr("(3+4)*2-10/5") == 12
    with pytest.raises(ValueError):
        C.eval_expr("__import__('os')")


# --------------------------------------------------------------------------------------------------------------
# dedup, split, cap, hashes


def _docs(n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice("abcdefgh") * rng.randint(1, 5) for _ in range(rng.randint(5, 60)))
            for i in range(n)]


def test_dedup_normalises_and_drops_exact_copies():
    docs = ["hello world", "hello world  \n", "\r\nhello world\r\n", "e\u0301t\u00e9", "\u00e9t\u00e9", "other", ""]
    unique, hashes, dropped = C.dedup(docs)
    assert unique == ["hello world", "\u00e9t\u00e9", "other"]
    assert dropped == 3 and hashes == [C.doc_hash(d) for d in unique]
    c = C.corpus_from_docs({"d": docs + ["other"]}, val_fraction=0.0)
    assert c.train["d"] == unique and c.stats["d"]["duplicates"] == 4


def test_split_is_stable_when_docs_are_added():
    base = _docs(1000)
    c1 = C.corpus_from_docs({"d": base}, val_fraction=0.1)
    c2 = C.corpus_from_docs({"d": base + _docs(300, seed=1, prefix="new")}, val_fraction=0.1)
    val1, val2 = set(c1.val["d"]), set(c2.val["d"])
    assert val1 <= val2 and set(c1.train["d"]) <= set(c2.train["d"])
    assert 60 <= len(val1) <= 140  # ~10 %
    assert c1.train["d"] == [d for d in base if d not in val1]  # source order kept
    assert c1.hashes["d"] != c2.hashes["d"]


def test_max_bytes_is_respected_and_deterministic():
    docs = _docs(500)
    for cap in (1, 500, 5_000, 20_000):
        c = C.corpus_from_docs({"d": docs}, max_bytes=cap)
        total = c.stats["d"]["train"]["bytes"] + c.stats["d"]["val"]["bytes"]
        assert total <= cap
        if cap >= 5_000:
            assert total >= cap - 200  # greedy fill comes close
        assert C.corpus_from_docs({"d": list(reversed(docs))}, max_bytes=cap).hash == c.hash
    per = C.corpus_from_docs({"a": docs, "b": docs}, max_bytes={"a": 3000, "b": None})
    assert per.n_bytes("train") + per.n_bytes("val") > 3000 + 20_000
    assert per.stats["a"]["train"]["bytes"] + per.stats["a"]["val"]["bytes"] <= 3000


def test_hash_depends_on_content_not_order():
    docs = _docs(200)
    c = C.corpus_from_docs({"d": docs, "e": docs[:10]}, val_fraction=0.2)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert C.corpus_from_docs({"e": docs[:10], "d": shuffled}, val_fraction=0.2).hash == c.hash
    changed = docs[:]
    changed[5] += "!"
    assert C.corpus_from_docs({"d": changed, "e": docs[:10]}, val_fraction=0.2).hash != c.hash
    assert C.corpus_from_docs({"d": docs, "e": docs[:10]}, val_fraction=0.3).hash != c.hash
    assert c.texts("train") == c.train["d"] + c.train["e"]


def test_build_corpus_argument_errors(tmp_path):
    with pytest.raises(LmlabError, match="val_fraction"):
        C.build_corpus(("math",), val_fraction=1.5, cache_dir=tmp_path)
    with pytest.raises(LmlabError, match="max_bytes"):
        C.build_corpus(("math",), max_bytes=0, cache_dir=tmp_path)
    with pytest.raises(LmlabError, match="neither a domain"):
        C.build_corpus(("no-such-domain",), cache_dir=tmp_path)


def test_optional_domain_absent_is_skipped(tmp_path):
    if C.GCIDE_PATH.exists():
        pytest.skip("dict-gcide is installed here")
    c = C.build_corpus(("math", "gcide"), max_bytes=10_000, cache_dir=tmp_path)
    assert c.domains == ["math"]


def test_gcide_reader_strips_tags(tmp_path):
    p = tmp_path / "gcide.dict.dz"
    entry = "<p><ent>Apple</ent><br/\n<def>The fleshy pome or fruit of a rosaceous tree.</def></p>\n\n"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(entry * 40)
    docs = C.gcide_docs(p, chunk_chars=500)
    assert len(docs) > 1
    assert "<" not in "".join(docs) and "The fleshy pome or fruit of a rosaceous tree." in docs[0]
    assert C.gcide_docs(tmp_path / "absent.dz") == []


# --------------------------------------------------------------------------------------------------------------
# user data


def test_read_texts_txt_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first paragraph\nstill first\n\n  \nsecond one\n\n\nthird\n")
    assert C.read_texts(p) == ["first paragraph\nstill first", "second one", "third"]
    assert C.read_texts(p, sample_by="document") == [p.read_text()]
    assert C.read_texts(p, sample_by="line") == ["first paragraph", "still first", "second one", "third"]
    with pytest.raises(LmlabError, match="sample_by"):
        C.read_texts(p, sample_by="chapter")


def test_read_texts_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n"three"\n{"text": ""}\n')
    assert C.read_texts(p) == ["one", "two", "three"]
    q = tmp_path / "e.jsonl"
    q.write_text('{"body": "x"}\n')
    assert C.read_texts(q, text_field="body") == ["x"]
    with pytest.raises(LmlabError, match=r"e\.jsonl:1: no field 'text'"):
        C.read_texts(q)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(LmlabError, match="invalid JSON"):
        C.read_texts(tmp_path / "bad.jsonl")


def test_read_texts_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bee\n\nbuzz")
    (tmp_path / "a.jsonl").write_text('{"text": "ant"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert C.read_texts(tmp_path) == ["ant", "bee", "buzz"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(LmlabError, match="no such file or directory"):
        C.read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(LmlabError) as e:
        C.read_texts(tmp_path / "empty.txt")
    assert str(tmp_path / "empty.txt") in str(e.value) and "\n" not in str(e.value)
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(LmlabError, match="holds no"):
        C.read_texts(d)
    (d / "blank.jsonl").write_text("\n")
    with pytest.raises(LmlabError, match="no text found"):
        C.read_texts(d)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LmlabError, match="unsupported file type"):
        C.read_texts(tmp_path / "x.csv")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(LmlabError, match="not UTF-8"):
        C.read_texts(tmp_path / "latin.txt")


def test_read_texts_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install 'lmlab[datasets]')")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert C.read_texts(tmp_path / "t.parquet") == ["alpha", "beta"]
    with pytest.raises(LmlabError, match="no column 'body'"):
        C.read_texts(tmp_path / "t.parquet", text_field="body")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(LmlabError, match="needs pyarrow"):
        C.read_texts(tmp_path / "t.parquet")


def test_load_source_specs(tmp_path):
    assert C.load_source("math")[:3] == [p["text"] for p in C.math_problems(3)]
    (tmp_path / "a.txt").write_text("hello\n\nworld")
    assert C.load_source(str(tmp_path / "a.txt")) == ["hello", "world"]
    with pytest.raises(LmlabError, match="neither a domain"):
        C.load_source("nonexistent-thing")
    with pytest.raises(LmlabError, match="bad dataset spec"):
        C.load_source("hf:")


def test_hf_dataset_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed")
    with pytest.raises(LmlabError, match=r"pip install 'lmlab\[datasets\]'"):
        C.load_source("hf:someone/some-data:train")


def test_user_path_domain_cache_invalidates_on_change(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = data / "a.txt"
    f.write_text("\n\n".join(f"paragraph {i} about nothing in particular" for i in range(40)))
    cache = tmp_path / "cache"
    c1 = C.build_corpus((str(data),), cache_dir=cache, val_fraction=0.2)
    assert c1.domains == [str(data)] and c1.stats[str(data)]["source_docs"] == 40
    f.write_text(f.read_text() + "\n\na brand new paragraph appended later")
    c2 = C.build_corpus((str(data),), cache_dir=cache, val_fraction=0.2)
    assert c2.stats[str(data)]["source_docs"] == 41 and c2.hash != c1.hash


# --------------------------------------------------------------------------------------------------------------
# tokenise + pack


def test_encode_docs_inserts_eos_and_roundtrips(tiny_tok, tiny_corpus):
    docs = tiny_corpus.texts("val")
    eos = tiny_tok.eos_token_id
    ids = C.encode_docs(tiny_tok, docs, eos)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    assert int((ids == eos).sum()) == len(docs) and ids[-1] == eos
    pieces = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
    assert [tiny_tok.decode(p[:-1].tolist()) for p in pieces] == docs
    # same result through the raw tokenizers.Tokenizer and with the eos taken from the tokenizer
    assert np.array_equal(C.encode_docs(tiny_tok.backend_tokenizer, docs, eos), ids)
    assert np.array_equal(C.encode_docs(tiny_tok, docs), ids)
    assert C.encode_docs(tiny_tok, [], eos).size == 0
    with pytest.raises(LmlabError, match="outside the vocabulary"):
        C.encode_docs(tiny_tok, docs, 10**6)


def test_token_dtype():
    assert C.token_dtype(300) == np.uint16 and C.token_dtype(65536) == np.uint16
    assert C.token_dtype(65537) == np.uint32


def test_save_load_tokens(tmp_path):
    ids = np.arange(70_000, dtype=np.uint32)[::7]
    p = C.save_tokens(tmp_path / "sub" / "train", ids)
    assert p.name == "train.npy" and p.is_file()
    back = C.load_tokens(p)
    assert isinstance(back, np.memmap) and back.dtype == np.uint32
    assert np.array_equal(back, ids)
    assert [q.name for q in p.parent.iterdir()] == ["train.npy"]  # no temp file left
    with pytest.raises(LmlabError, match="not found"):
        C.load_tokens(tmp_path / "nope.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LmlabError, match="not a token"):
        C.load_tokens(tmp_path / "obj.npy")


@pytest.mark.slow
def test_full_default_build_is_deterministic_and_cached(tmp_path):
    t0 = time.perf_counter()
    a = C.build_corpus(cache_dir=tmp_path)
    t1 = time.perf_counter()
    b = C.build_corpus(cache_dir=tmp_path)
    t2 = time.perf_counter()
    assert a.hash == b.hash and a.domains == ["code", "prose", "math"]
    assert a.stats["prose"]["train"]["bytes"] > 1_000_000
    assert t2 - t1 < (t1 - t0) / 3


def test_hf_dataset_from_a_local_dataset_repo(tmp_path, monkeypatch):
    """The real datasets.load_dataset path on a local dataset folder (what a hub repo clone looks like)."""
    pytest.importorskip("datasets", reason="datasets not installed (pip install 'lmlab[datasets]')")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    repo = tmp_path / "my_dataset"
    (repo / "data").mkdir(parents=True)
    rows = [{"text": f"document number {i} about lists", "id": i} for i in range(6)] + [{"text": "", "id": 6}]
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = C.load_hf_dataset(str(repo), split="train")
    assert docs == [r["text"] for r in rows[:6]]
    assert C.load_source(f"hf:{repo}:train") == docs
    with pytest.raises(LmlabError, match="no column 'body'"):
        C.load_hf_dataset(str(repo), split="train", text_field="body")
    with pytest.raises(LmlabError, match="could not load dataset"):
        C.load_hf_dataset(str(tmp_path / "missing_dataset"))
