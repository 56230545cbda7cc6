"""Comment density (exact values on hand-made files) and the code-preservation invariant (mutation test)."""

from __future__ import annotations

import io
import random
import tokenize

import pytest

from lmlab.core.corpus import stdlib_root
from lmlab.data.comments import (
    DensityError,
    comment_density,
    docstring_sites,
    pygments_density,
    python_canon,
    python_comment_spans,
    python_density,
    same_code,
    strip_python_comments,
)

# ------------------------------------------------------------------------------------------------------------
# density


def test_density_comments_exact():
    src = '# hello\nx = 1  # one\ns = "# not a comment"\n'
    d = python_density(src)
    assert d["comment_chars"] == len("# hello") + len("# one") == 12
    assert d["docstring_chars"] == 0
    assert d["total_chars"] == 43 == len(src)
    assert d["density"] == pytest.approx(12 / 43)


def test_density_docstrings_exact_and_lookalikes_not_counted():
    src = '"""Mod."""\ndef f():\n    \'\'\'Doc.\'\'\'\n    return "\'\'\'not a docstring\'\'\'"\nx = 1\n"""late."""\n'
    d = python_density(src)
    assert d["docstring_chars"] == 10 + 10  # '"""Mod."""' and "'''Doc.'''"; the late bare string is not one
    assert d["comment_chars"] == 0
    assert d["density"] == pytest.approx(20 / len(src))


def test_density_counts_characters_not_bytes():
    src = 'def f():\n    """é → ü"""\n    return 1  # ß\n'
    d = python_density(src)
    assert d["docstring_chars"] == len('"""é → ü"""') == 11
    assert d["comment_chars"] == 3
    assert d["total_chars"] == len(src)


def test_density_class_and_async_and_empty():
    src = 'class A:\n    "A."\n    async def g(self):\n        "G."\n        return 2\n'
    assert python_density(src)["docstring_chars"] == 8
    assert python_density("")["density"] == 0.0


def test_density_other_languages_via_pygments():
    js = '// a\nvar s = "// no"; /* b */\n'
    d = pygments_density(js, "javascript")
    assert d["comment_chars"] == len("// a") + len("/* b */") == 11
    c = "#include <stdio.h>\nint x; // hi\n"
    assert pygments_density(c, "c")["comment_chars"] == len("// hi")  # preprocessor lines are not comments
    assert comment_density(js, "javascript")["density"] == pytest.approx(11 / len(js))


def test_unparsable_python_raises_density_error_not_crash():
    with pytest.raises(DensityError) as e:
        python_density("def (:\n")
    assert e.value.reason == "syntax"
    with pytest.raises(DensityError):
        python_density('x = """unterminated\n')


def test_spans_cover_exactly_comment_text():
    src = 'a = 1  # c1\n"""not doc"""\ndef f():\n    """D."""\n'
    spans = python_comment_spans(src)
    assert [src[s:e] for s, e, _ in spans] == ["# c1", '"""D."""']


# ------------------------------------------------------------------------------------------------------------
# invariant

FILES = ["bisect.py", "colorsys.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "keyword.py", "glob.py"]
SWAP = {"+": "-", "-": "+", "*": "/", "/": "*", "<": ">", ">": "<", "==": "!=", "!=": "==", "<=": ">=",
        ">=": "<=", "%": "//", "&": "|", "|": "&", "and": "or", "or": "and"}


def _mutants(src: str, rng: random.Random, n: int) -> list[str]:
    """Single-token code mutations (name, number, operator, non-docstring string)."""
    import keyword

    doc = [(s, e) for s, e, k in python_comment_spans(src) if k == "docstring"]
    lines = src.splitlines(keepends=True)
    offs = [0]
    for ln in lines:
        offs.append(offs[-1] + len(ln))
    cands = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        s = offs[tok.start[0] - 1] + tok.start[1]
        e = offs[tok.end[0] - 1] + tok.end[1]
        if any(a <= s < b for a, b in doc):
            continue
        if tok.type == tokenize.NAME and tok.string in SWAP:
            cands.append((s, e, SWAP[tok.string]))
        elif tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            cands.append((s, e, tok.string + "_m"))
        elif tok.type == tokenize.NUMBER:
            cands.append((s, e, "7" if tok.string != "7" else "8"))
        elif tok.type == tokenize.OP and tok.string in SWAP:
            cands.append((s, e, SWAP[tok.string]))
        elif tok.type == tokenize.STRING:
            q = min(i for i in (tok.string.find("'"), tok.string.find('"')) if i >= 0)
            cands.append((s, e, tok.string[:q + 1] + "Z" + tok.string[q + 1:]))
    rng.shuffle(cands)
    return [src[:s] + new + src[e:] for s, e, new in cands[:n]]


def test_mutation_zero_false_accepts_over_stdlib_files():
    """Every single-token mutation that still parses is rejected (same_code = canon(orig) == canon(aug))."""
    rng = random.Random(0)
    tested = 0
    for name in FILES:
        src = (stdlib_root() / name).read_text(encoding="utf-8")
        ref = python_canon(src)
        assert same_code(src, src) == (True, "")
        for mut in _mutants(src, rng, 50):
            try:
                canon = python_canon(mut)
            except DensityError:
                continue  # not valid Python: rejected as "syntax" anyway
            assert canon != ref, f"false accept in {name}"
            tested += 1
    assert tested >= 300


def _add_comments(src: str, rng: random.Random) -> str:
    """A correct commenter: full-line comments outside multi-line strings + docstrings for undocumented defs."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    lines = src.splitlines(keepends=True)
    sites = {s["body"]: s["indent"] for s in docstring_sites(src)}
    out = []
    for i, ln in enumerate(lines):
        if i in sites:
            out.append(f'{sites[i]}"""Added docstring."""\n')
        elif i + 1 not in inside and rng.random() < 0.2:
            indent = ln[:len(ln) - len(ln.lstrip())]
            out.append(f"{indent}# added comment {i}\n")
        out.append(ln)
    return "".join(out)


def test_comment_only_changes_are_accepted():
    rng = random.Random(1)
    for name in FILES:
        src = (stdlib_root() / name).read_text(encoding="utf-8")
        aug = _add_comments(src, rng)
        assert aug != src
        assert same_code(src, aug) == (True, ""), name
        assert python_density(aug)["density"] > python_density(src)["density"]
        stripped = strip_python_comments(src)
        assert same_code(src, stripped) == (True, ""), name
        assert python_density(stripped)["comment_chars"] == 0


def test_hash_inside_multiline_string_is_rejected():
    src = 'SQL = """\nselect a\nfrom t\n"""\n\ndef q():\n    return SQL\n'
    bad = 'SQL = """\n# the columns\nselect a\nfrom t\n"""\n\ndef q():\n    return SQL\n'
    good = '# the query\nSQL = """\nselect a\nfrom t\n"""\n\n\ndef q():\n    """Return it."""\n    return SQL\n'
    assert same_code(src, bad) == (False, "code_changed")
    assert same_code(src, good) == (True, "")


def test_invariant_reports_syntax_and_other_languages():
    assert same_code("x = 1\n", "x = (1\n") == (False, "syntax")
    assert same_code("x = (1\n", "x = 1\n") == (False, "orig_syntax")
    js = "function f(a) { return a + 1; }\n"
    assert same_code(js, "// add one\nfunction f(a) {\n  /* sum */ return a + 1;\n}\n", "javascript") == (True, "")
    assert same_code(js, js.replace("+", "-"), "javascript") == (False, "code_changed")
    assert same_code(js, js.replace('a + 1', 'a + "// x"'), "javascript")[0] is False


def test_docstring_sites_with_decorated_first_statement():
    src = "class A:\n    @property\n    def x(self):\n        return 1\n"
    sites = docstring_sites(src)
    assert [(s["name"], s["body"], s["indent"]) for s in sites] == [("A", 1, "    "), ("x", 3, "        ")]
    lines = src.splitlines(keepends=True)
    for s in sorted(sites, key=lambda d: -d["body"]):
        lines.insert(s["body"], s["indent"] + '"""Doc."""\n')
    assert same_code(src, "".join(lines)) == (True, "")
