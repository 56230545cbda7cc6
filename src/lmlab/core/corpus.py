"""The offline corpus: named text domains built from what installs with Python, plus user data.

No hub and no network: the built-in domains come from the Python standard library that every install has,
and from a seeded generator. They are the data for the tokenizer, the reference models (``lmlab zoo``) and
the data-mixing experiments (domains = mixture components).

Domains (:data:`DOMAINS`, a plain dict ``name -> fn(seed) -> list[str]``)
-------------------------------------------------------------------------
``code``
    The standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``), one document per file,
    excluding test directories (``test/``, ``tests/``, ``idlelib/idle_test``, ``lib2to3/tests`` ...),
    ``test_*.py`` files, ``site-packages`` and files that are not valid UTF-8 (about 12 MB on CPython 3.11).
``prose``
    English written by people, also from the standard library: docstrings (read with :mod:`ast`), full-line
    comments (read with :mod:`tokenize`; consecutive comment lines are joined into paragraphs) and the
    language-reference topics in ``pydoc_data.topics``. Paragraphs shorter than ~40 characters or that look
    like code (doctests, commented-out statements, symbol-dense lines) are dropped, and each paragraph is
    kept once. One document per source file (its paragraphs in source order, blank-line separated).
    The default ``prose`` depends on nothing outside Python, so every user gets the same one.
``math``
    Synthetic arithmetic and multi-step word problems with exact answers, generated from ``seed`` by the
    pure function :func:`math_problems` (one problem per document). Later modules build verifiable
    reasoning tasks on the same generator.
``gcide``, ``pydocs`` (optional extras)
    Used only when named and present on the machine (Debian packages ``dict-gcide`` and ``python3-doc``);
    an absent extra yields no documents and is skipped with a log line, never an error.

Anything else passed as a domain is a *source spec* (:func:`load_source`): a file or directory of
``.txt``/``.md``/``.rst``/``.jsonl``/``.parquet`` (:func:`read_texts`) or ``hf:NAME[:split]``
(:func:`load_hf_dataset`).

Guarantees of :func:`build_corpus`
----------------------------------
* **Deterministic:** the same parameters on the same Python give the same documents in the same order
  and the same hashes. Documents keep their source order (sorted file paths, generation order).
* **Exact dedup** within a domain: documents are normalised (NFC, ``\\n`` line ends, no trailing
  whitespace, no leading/trailing blank lines) and kept once per sha256 of the normalised text.
* **Stable split:** a document is in ``val`` iff a salted hash of its own text falls below
  ``val_fraction``; adding or removing other documents never moves it between splits.
* **Deterministic cap:** ``max_bytes`` (UTF-8 bytes, train + val) keeps documents in order of their hash,
  skipping any that would overflow, so the cap is a seed-free pseudo-random subset, never exceeded.
* **Content hashes:** per domain, sha256 over the sorted ``"<doc sha256> <split>"`` lines; overall, sha256
  over the sorted ``"<domain> <hash>"`` lines. Equal hashes mean identical train/val contents.
* **Cache:** each domain's deduplicated documents are cached as JSONL + ``manifest.json`` under
  ``cache_dir()/corpus/`` (written into a temp dir, then renamed), keyed by the domain, its source
  fingerprint (Python version and stdlib path, file sizes/mtimes, seed for generated domains) and
  :data:`CORPUS_VERSION`. Cap and split are recomputed on load (cheap), so a second build takes well
  under a second.

Token files
-----------
:func:`encode_docs` tokenises documents and packs them into one array with an EOS token after every
document (``uint16`` when the vocabulary fits, else ``uint32``); :func:`save_tokens` / :func:`load_tokens`
store it as ``.npy`` (atomic write; memory-mapped, pickle-free read).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import tokenize
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

CORPUS_VERSION = 1
"""Bump when extraction or generation changes: it is part of every cache key."""

DEFAULT_DOMAINS: tuple[str, ...] = ("code", "prose", "math")
MATH_DEFAULT_N = 50_000
"""Problems in the default ``math`` domain (before dedup and cap)."""
MIN_PARAGRAPH_CHARS = 40
"""Prose paragraphs shorter than this are dropped."""

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
"""Path components that exclude a stdlib file from ``code`` and ``prose``."""

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
PYDOCS_GLOB = "/usr/share/doc/python3*/html/_sources"

TEXT_SUFFIXES = (".txt", ".md", ".rst")
DATA_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


# ----------------------------------------------------------------------------------------------------------------
# paths and small helpers


def cache_dir() -> Path:
    """lmlab's user cache: ``$LMLAB_CACHE``, else ``$XDG_CACHE_HOME/lmlab``, else ``~/.cache/lmlab``.

    Not created here; writers create the subfolder they need.
    """
    if os.environ.get("LMLAB_CACHE"):
        return Path(os.environ["LMLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lmlab"
    return Path.home() / ".cache" / "lmlab"


def _progress(iterable: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
    """tqdm bar on stderr when it is a terminal (``disable=None``), silent otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)


def normalize_text(text: str) -> str:
    """The canonical form used for storage, dedup and hashing.

    NFC, ``\\r\\n``/``\\r`` -> ``\\n``, trailing whitespace removed from each line, leading and trailing
    blank lines removed (indentation of the first line is kept).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def doc_hash(text: str) -> str:
    """sha256 hex of a (normalised) document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unit(tag: str, h: str) -> float:
    """A number in [0, 1) from a salted document hash."""
    return int(hashlib.sha256(f"{tag}:{h}".encode()).hexdigest()[:16], 16) / 2.0**64


def is_val(h: str, val_fraction: float) -> bool:
    """Whether the document with hash ``h`` belongs to the validation split (depends on nothing else)."""
    return _unit("lmlab-split", h) < val_fraction


# ----------------------------------------------------------------------------------------------------------------
# code


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without test dirs, ``test_*.py`` and site-packages."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if EXCLUDED_DIRS.intersection(rel[:-1]) or p.name.startswith("test_"):
            continue
        out.append(p)
    return out


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_docs(files: Iterable[Path] | None = None) -> list[str]:
    """One document per source file (default: :func:`stdlib_files`); non-UTF-8 files are skipped."""
    files = list(files) if files is not None else stdlib_files()
    docs = []
    for p in _progress(files, "code", total=len(files)):
        text = _read_utf8(p)
        if text is None:
            log.debug("code: skipping non-UTF-8 %s", p)
            continue
        docs.append(text)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# prose

_CODE_LINE = re.compile(
    r"""^\s*(
        >>>|\.\.\.\s|\$\s                                   # doctest / shell prompts
        |(def|class|async\s+def)\s+\w+.*[:(]                 # definitions
        |(import\s+[\w.]+|from\s+[\w.]+\s+import\s)          # imports
        |(return|yield|raise|assert|del|pass|break|continue)\b(\s+\S+)?\s*$
        |(if|elif|while|for|with|try|except|else|finally)\b.*:\s*$
        |[\w.\[\]'"]+\s*(=|\+=|-=|\*=|/=|==|!=)\s*\S+        # assignments / comparisons
        |[\w.]+\(.*\)\s*[:;,]?\s*$                           # bare calls
        |[\]\)\}]+\s*[,;]?\s*$                                # closing brackets
    )""",
    re.VERBOSE,
)
_SYMBOLS = set("=()[]{}<>;*/\\|`@$%^~")


def looks_like_code(text: str) -> bool:
    """Heuristic: doctest prompts, mostly code-shaped lines, symbol-dense or nearly word-free text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return True
    if any(ln.lstrip().startswith((">>>", "$ ")) for ln in lines):
        return True
    if sum(bool(_CODE_LINE.match(ln)) for ln in lines) / len(lines) > 0.3:
        return True
    chars = text.replace(" ", "")
    if sum(c in _SYMBOLS for c in chars) / max(1, len(chars)) > 0.08:
        return True
    words = re.findall(r"[A-Za-z]{2,}", text)
    return len(words) < 5 or sum(len(w) for w in words) / max(1, len(chars)) < 0.6


def _keep_paragraph(p: str) -> bool:
    return len(p) >= MIN_PARAGRAPH_CHARS and not looks_like_code(p)


def _clean_block(text: str) -> list[str]:
    """Split a docstring/topic into blank-line paragraphs; drop short and code-like ones."""
    paras = [normalize_text(p) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if _keep_paragraph(p)]


def _docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = node.body[0].lineno if node.body else 0
                out.extend((line, p) for p in _clean_block(doc))
    return out


_COMMENT_SKIP = re.compile(r"^(!|-\*-|\s*(noqa|type:|pragma|fmt:|pylint:|XXX\s*$|TODO\s*$))")


def _comments(source: str) -> list[tuple[int, str]]:
    """Full-line comments, consecutive lines joined into paragraphs (an empty ``#`` line breaks one)."""
    out: list[tuple[int, str]] = []
    cur: list[str] = []
    start = last = -10

    def flush() -> None:
        if cur:
            text = normalize_text(" ".join(cur))
            if _keep_paragraph(text):
                out.append((start, text))
            cur.clear()

    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue
            row = tok.start[0]
            body = tok.string.lstrip("#").strip()
            skip = not body or bool(_COMMENT_SKIP.match(body))
            if row != last + 1 or skip:
                flush()
            if not skip:
                if not cur:
                    start = row
                cur.append(body)
            last = row
    except (tokenize.TokenError, SyntaxError):
        pass
    flush()
    return out


def _pydoc_topics() -> list[str]:
    """Language-reference topics shipped with the stdlib (``pydoc_data.topics``), one document each."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return ["\n\n".join(_clean_block(topics[k])) for k in sorted(topics)]


def prose_docs(files: Iterable[Path] | None = None, topics: bool = True) -> list[str]:
    """Docstrings and comment paragraphs of ``files`` (default: :func:`stdlib_files`), one doc per file.

    Each paragraph is kept once across the whole domain (first occurrence in sorted file order), so
    repeated boilerplate (licence headers, "XXX" notes) does not pile up. With ``topics`` the
    ``pydoc_data`` language-reference topics are appended, one document each.
    """
    files = list(files) if files is not None else stdlib_files()
    seen: set[str] = set()
    docs = []
    for p in _progress(files, "prose", total=len(files)):
        source = _read_utf8(p)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        paras = sorted(_docstrings(tree) + _comments(source), key=lambda t: t[0])
        kept = []
        for _, para in paras:
            if para not in seen:
                seen.add(para)
                kept.append(para)
        if kept:
            docs.append("\n\n".join(kept))
    if topics:
        docs.extend(d for d in _pydoc_topics() if d)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# optional extra prose (only when installed on this machine)


def gcide_docs(path: str | Path = GCIDE_PATH, chunk_chars: int = 8000) -> list[str]:
    """GNU Collaborative International Dictionary (``dict-gcide``): gzip-readable dictzip, tags stripped.

    Paragraphs are grouped into documents of about ``chunk_chars`` characters. Absent file -> ``[]``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    text = re.sub(r"<[^>]+>", "", raw)
    text = re.sub(r"[ \t]+", " ", text)
    docs, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        cur.append(para)
        size += len(para)
        if size >= chunk_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def pydocs_docs(pattern: str = PYDOCS_GLOB) -> list[str]:
    """Python's reStructuredText documentation sources (``python3-doc``), one doc per file, no changelog."""
    roots = sorted(glob.glob(pattern))
    if not roots:
        return []
    docs = []
    for p in sorted(Path(roots[-1]).rglob("*.txt")):
        if "changelog" in p.name.lower() or "whatsnew" in p.parts:
            continue
        text = _read_utf8(p)
        if text and text.strip():
            docs.append(text)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# math: seeded, verifiable problems

_NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Zoe", "Ben", "Ivy", "Kofi", "Lena", "Yuki", "Max")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "cards", "shells", "stamps")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _num(rng: random.Random, lo: int = 0, hi_digits: int = 3) -> int:
    return rng.randint(lo, 10 ** rng.randint(1, hi_digits) - 1)


def _steps(*steps: tuple[int, str, int, int]) -> str:
    return " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps)


def _problem(rng: random.Random) -> tuple[str, int, str, str, str]:
    """(kind, answer, question, solution, expr); ``expr`` uses only numbers from the question."""
    kind = rng.choice(("add", "sub", "mul", "div", "expr", "boxes", "change", "share", "pages", "speed",
                       "equation"))
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind in ("add", "sub", "mul", "div"):
        if kind == "add":
            a, b = _num(rng), _num(rng)
            c = a + b
        elif kind == "sub":
            a, b = sorted((_num(rng), _num(rng)), reverse=True)
            c = a - b
        elif kind == "mul":
            a, b = _num(rng, 2, 2), _num(rng, 2, 2)
            c = a * b
        else:
            b, c = rng.randint(2, 12), rng.randint(1, 99)
            a = b * c
        op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[kind]
        return kind, c, f"What is {a} {op} {b}?", str(c), f"{a}{op}{b}"
    if kind == "expr":
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(2, 12)
        if rng.random() < 0.5:
            x = a + b
            y = x * c
            return kind, y, f"What is ({a} + {b}) * {c}?", _steps((a, "+", b, x), (x, "*", c, y)), f"({a}+{b})*{c}"
        x = b * c
        y = a + x
        return kind, y, f"What is {a} + {b} * {c}?", _steps((b, "*", c, x), (a, "+", x, y)), f"{a}+{b}*{c}"
    if kind == "boxes":
        a, b = rng.randint(2, 12), rng.randint(2, 24)
        c = rng.randint(1, a * b)
        x, y = a * b, a * b - c
        q = f"{name} has {a} boxes of {b} {item} and gives away {c}. How many {item} are left?"
        return kind, y, q, _steps((a, "*", b, x), (x, "-", c, y)), f"{a}*{b}-{c}"
    if kind == "change":
        a, p = rng.randint(2, 9), rng.randint(1, 11)
        x = a * p
        bill = next(v for v in (10, 20, 50, 100) if v >= x)
        y = bill - x
        q = (f"{name} buys {a} {item} at {p} dollars each and pays with a {bill}-dollar bill. "
             f"How many dollars of change does {name} get?")
        return kind, y, q, _steps((a, "*", p, x), (bill, "-", x, y)), f"{bill}-{a}*{p}"
    if kind == "share":
        k, each = rng.randint(2, 9), rng.randint(1, 20)
        total = k * each
        b = rng.randint(1, total - 1) if total > 1 else 0
        a = total - b
        friend = rng.choice([n for n in _NAMES if n != name])
        q = (f"{name} has {a} {item}. {friend} gives {name} {b} more, and {name} shares them equally "
             f"among {k} friends. How many {item} does each friend get?")
        return kind, each, q, _steps((a, "+", b, total), (total, "/", k, each)), f"({a}+{b})/{k}"
    if kind == "pages":
        a, d, b = rng.randint(2, 40), rng.randint(2, 14), rng.randint(1, 60)
        x, y = a * d, a * d + b
        q = f"{name} reads {a} pages a day for {d} days, then {b} more pages. How many pages does {name} read?"
        return kind, y, q, _steps((a, "*", d, x), (x, "+", b, y)), f"{a}*{d}+{b}"
    if kind == "speed":
        v, t = rng.randint(20, 120), rng.randint(2, 9)
        x = v * t
        q = f"A train travels at {v} km per hour for {t} hours. How many km does it travel?"
        return kind, x, q, _steps((v, "*", t, x)), f"{v}*{t}"
    # equation: a*x + b = c
    a, x, b = rng.randint(2, 12), rng.randint(0, 30), rng.randint(1, 50)
    c = a * x + b
    q = f"Solve for x: {a}*x + {b} = {c}. What is x?"
    return kind, x, q, _steps((c, "-", b, c - b), (c - b, "/", a, x)), f"({c}-{b})/{a}"


def math_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct problems from ``seed``: dicts with ``question``, ``answer`` (int), ``text``,
    ``kind`` and ``expr`` (an arithmetic expression over the question's numbers equal to ``answer``).

    ``text`` is ``"Q: <question>\\nA: <solution>"``: the bare answer for one-operation arithmetic
    (``"A: 82"``), else worked steps ending in ``"The answer is N."``. Pure and deterministic.
    """
    if n < 0:
        raise LmlabError(f"math_problems: n must be >= 0, got {n}")
    rng = random.Random(f"lmlab-math:{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        kind, answer, question, solution, expr = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        if not solution.endswith("."):
            text = f"Q: {question}\nA: {solution}"
        else:
            text = f"Q: {question}\nA: {solution} The answer is {answer}."
        out.append({"question": question, "answer": answer, "text": text, "kind": kind, "expr": expr})
    return out


def eval_expr(expr: str) -> Fraction:
    """Exactly evaluate ``+ - * /`` and parentheses over integers (no ``eval``)."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}.get(type(node.op))
            if op is None:
                raise ValueError(f"unsupported operator in {expr!r}")
            return _OPS[op](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def math_docs(seed: int = 0, n: int = MATH_DEFAULT_N) -> list[str]:
    return [p["text"] for p in math_problems(n, seed)]


# ----------------------------------------------------------------------------------------------------------------
# registry

DomainFn = Callable[[int], list[str]]

DOMAINS: dict[str, DomainFn] = {
    "code": lambda seed: code_docs(),
    "prose": lambda seed: prose_docs(),
    "math": lambda seed: math_docs(seed),
    "gcide": lambda seed: gcide_docs(),
    "pydocs": lambda seed: pydocs_docs(),
}
"""Named domains: ``name -> fn(seed) -> documents``. Only ``math`` uses the seed."""

OPTIONAL_DOMAINS = frozenset({"gcide", "pydocs"})
"""Extras that may be absent on a machine: they yield ``[]`` and are skipped, not errors."""


# ----------------------------------------------------------------------------------------------------------------
# user data


def _read_file_texts(path: Path, text_field: str, sample_by: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LmlabError(f"{path} is not UTF-8 text (byte {e.start})") from None
        if sample_by == "document":
            return [text] if text.strip() else []
        if sample_by == "line":
            return [ln for ln in text.splitlines() if ln.strip()]
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmlabError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if isinstance(row, str):
                    value = row
                elif isinstance(row, dict) and text_field in row:
                    value = row[text_field]
                else:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise LmlabError(f"{path}:{i}: no field {text_field!r} (has {keys}); set text_field")
                if isinstance(value, str) and value.strip():
                    out.append(value)
        return out
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LmlabError(
                f"reading {path} needs pyarrow: pip install pyarrow (or 'lmlab[datasets]')"
            ) from None
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise LmlabError(f"{path}: no column {text_field!r} (has {schema.names}); set text_field")
        values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        return [v for v in values if isinstance(v, str) and v.strip()]
    raise LmlabError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")


def read_texts(path: str | Path, text_field: str = "text", sample_by: str = "paragraph") -> list[str]:
    """Documents from a file or a directory of files (recursively, sorted, hidden files skipped).

    * ``.txt``/``.md``/``.rst``: ``sample_by="paragraph"`` (default) splits on blank lines, so one big
      text file still yields many documents and a meaningful train/val split; ``"document"`` keeps each
      file whole (use it for a folder of code or articles); ``"line"`` gives one document per line.
      These are the modes of the ``datasets`` text loader.
    * ``.jsonl``: one JSON object per line, text in ``text_field`` (a bare JSON string is accepted).
    * ``.parquet``: column ``text_field`` (needs ``pyarrow``).

    A missing path, a file or directory with no text, or an unsupported file raises :class:`LmlabError`.
    """
    if sample_by not in ("paragraph", "document", "line"):
        raise LmlabError(f"sample_by must be paragraph|document|line, got {sample_by!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise LmlabError(f"no such file or directory: {p}")
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in DATA_SUFFIXES
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        if not files:
            raise LmlabError(f"{p} holds no {'/'.join(DATA_SUFFIXES)} files")
        docs = [d for f in files for d in _read_file_texts(f, text_field, sample_by)]
    else:
        docs = _read_file_texts(p, text_field, sample_by)
    if not docs:
        raise LmlabError(f"no text found in {p}")
    return docs


def load_hf_dataset(name: str, split: str = "train", text_field: str = "text", **kw: Any) -> list[str]:
    """Texts of a Hugging Face dataset via ``datasets.load_dataset`` (needs the optional ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise LmlabError(
            f"loading dataset {name!r} needs the datasets package: pip install 'lmlab[datasets]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, **kw)
    except Exception as e:  # noqa: BLE001 -- any loader failure is bad input for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmlabError(f"could not load dataset {name!r} (split {split!r}): {first}") from None
    if text_field not in ds.column_names:
        raise LmlabError(f"dataset {name!r} has no column {text_field!r} (has {ds.column_names}); set text_field")
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise LmlabError(f"no text found in dataset {name!r} split {split!r}")
    return docs


def load_source(spec: str, seed: int = 0, text_field: str = "text") -> list[str]:
    """Documents of a domain name (:data:`DOMAINS`), ``hf:NAME[:split]`` / ``hf:NAME:CONFIG:split``, or a path."""
    if spec in DOMAINS:
        return DOMAINS[spec](seed)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise LmlabError(f"bad dataset spec {spec!r}; use hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        if len(parts) == 3:
            return load_hf_dataset(parts[0], split=parts[2], text_field=text_field, name=parts[1])
        return load_hf_dataset(parts[0], split=parts[1] if len(parts) == 2 else "train", text_field=text_field)
    if not Path(spec).expanduser().exists():
        raise LmlabError(f"{spec!r} is neither a domain ({', '.join(DOMAINS)}), hf:NAME, nor an existing path")
    return read_texts(spec, text_field=text_field)


# ----------------------------------------------------------------------------------------------------------------
# corpus assembly


@dataclasses.dataclass
class Corpus:
    """Train/val documents per domain with content hashes. Build with :func:`build_corpus`."""

    train: dict[str, list[str]]
    """Training documents per domain, in source order."""
    val: dict[str, list[str]]
    """Validation documents per domain, in source order."""
    hashes: dict[str, str]
    """Content hash per domain (sha256 over sorted ``"<doc sha256> <split>"`` lines)."""
    hash: str
    """Hash of the whole corpus (sha256 over sorted ``"<domain> <hash>"`` lines)."""
    stats: dict[str, dict[str, Any]]
    """Per domain: ``{"train": {"docs", "bytes"}, "val": {"docs", "bytes"}, "source_docs": n,
    "duplicates": n}`` (``source_docs``: after dedup, before the cap; ``duplicates``: exact copies dropped)."""

    @property
    def domains(self) -> list[str]:
        return list(self.train)

    def texts(self, split: str = "train", domains: Sequence[str] | None = None) -> list[str]:
        """All documents of ``split`` (``train``/``val``), domain by domain."""
        if split not in ("train", "val"):
            raise LmlabError(f"split must be train or val, got {split!r}")
        data = self.train if split == "train" else self.val
        return [d for name in (domains or data) for d in data[name]]

    def n_bytes(self, split: str = "train") -> int:
        return sum(s[split]["bytes"] for s in self.stats.values())


def dedup(docs: Iterable[str]) -> tuple[list[str], list[str], int]:
    """Normalise and drop exact duplicates (first kept): ``(docs, their sha256s, n_dropped)``."""
    seen: set[str] = set()
    out, hashes, dropped = [], [], 0
    for d in docs:
        d = normalize_text(d)
        if not d:
            continue
        h = doc_hash(d)
        if h in seen:
            dropped += 1
            continue
        seen.add(h)
        out.append(d)
        hashes.append(h)
    return out, hashes, dropped


def split_domain(docs: Sequence[str], hashes: Sequence[str] | None = None, val_fraction: float = 0.02,
                 max_bytes: int | None = None) -> tuple[list[str], list[str], str]:
    """Cap then split already-deduplicated ``docs``: ``(train, val, domain_hash)``.

    The cap walks documents in hash order and keeps each one that still fits in ``max_bytes``; the split
    uses a differently salted hash, so it is independent of the cap and of every other document.
    """
    hashes = list(hashes) if hashes is not None else [doc_hash(d) for d in docs]
    sizes = [len(d.encode("utf-8")) for d in docs]
    keep = set(range(len(docs)))
    if max_bytes is not None:
        keep, total = set(), 0
        for i in sorted(range(len(docs)), key=hashes.__getitem__):
            if total + sizes[i] <= max_bytes:
                keep.add(i)
                total += sizes[i]
    train, val, lines = [], [], []
    for i in sorted(keep):
        v = is_val(hashes[i], val_fraction)
        (val if v else train).append(docs[i])
        lines.append(f"{hashes[i]} {'val' if v else 'train'}")
    return train, val, hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def corpus_from_docs(docs: dict[str, Iterable[str]], val_fraction: float = 0.02,
                     max_bytes: int | dict[str, int | None] | None = None) -> Corpus:
    """Dedup, cap and split in-memory documents per domain into a :class:`Corpus` (no cache, no I/O)."""
    _check_fraction(val_fraction)
    train, val, hashes, stats = {}, {}, {}, {}
    for name, items in docs.items():
        unique, hs, dropped = dedup(items)
        cap = max_bytes.get(name) if isinstance(max_bytes, dict) else max_bytes
        tr, va, h = split_domain(unique, hs, val_fraction, cap)
        train[name], val[name], hashes[name] = tr, va, h
        stats[name] = {
            "train": {"docs": len(tr), "bytes": sum(len(d.encode()) for d in tr)},
            "val": {"docs": len(va), "bytes": sum(len(d.encode()) for d in va)},
            "source_docs": len(unique), "duplicates": dropped,
        }
    total = hashlib.sha256("\n".join(sorted(f"{k} {v}" for k, v in hashes.items())).encode()).hexdigest()
    return Corpus(train=train, val=val, hashes=hashes, hash=total, stats=stats)


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise LmlabError(f"val_fraction must be in [0, 1), got {val_fraction}")


# -- cache -------------------------------------------------------------------------------------------------------


def _path_fingerprint(p: Path) -> list[Any]:
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _fingerprint(spec: str, seed: int) -> dict[str, Any]:
    """What a domain's documents depend on (part of its cache key)."""
    fp: dict[str, Any] = {"spec": spec, "corpus_version": CORPUS_VERSION}
    if spec in ("code", "prose"):
        fp.update(python=sys.version, stdlib=str(stdlib_root()))
    elif spec == "math":
        fp.update(seed=seed, n=MATH_DEFAULT_N)
    elif spec == "gcide":
        fp.update(files=_path_fingerprint(GCIDE_PATH) if GCIDE_PATH.exists() else [])
    elif spec == "pydocs":
        roots = sorted(glob.glob(PYDOCS_GLOB))
        fp.update(files=_path_fingerprint(Path(roots[-1])) if roots else [])
    elif spec in DOMAINS:  # a domain registered by other code: assume it may use the seed
        fp.update(seed=seed)
    elif spec.startswith("hf:"):
        pass  # the datasets library caches and versions its own downloads
    else:
        p = Path(spec).expanduser().resolve()
        fp.update(path=str(p), files=_path_fingerprint(p) if p.exists() else [])
    return fp


def _cache_key(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")[-40:] or "domain"


def _load_cached(folder: Path, key: str) -> tuple[list[str], list[str], int] | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("key") != key:
            return None
        docs, hashes = [], []
        with open(folder / "docs.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                docs.append(row["text"])
                hashes.append(row["sha256"])
        if len(docs) != meta["docs"]:
            raise ValueError("document count does not match the manifest")
        return docs, hashes, int(meta.get("duplicates", 0))
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable corpus cache %s (%s)", folder, e)
        return None


def _write_cache(folder: Path, key: str, fp: dict[str, Any], docs: list[str], hashes: list[str],
                 dropped: int) -> None:
    """Write docs.jsonl + manifest.json into a temp dir, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for d, h in zip(docs, hashes):
                f.write(json.dumps({"sha256": h, "text": d}, ensure_ascii=False) + "\n")
        meta = {"key": key, "fingerprint": fp, "docs": len(docs), "duplicates": dropped,
                "bytes": sum(len(d.encode()) for d in docs), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():  # stale entry (different key) or a concurrent writer: replace it
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        log.warning("could not write corpus cache %s (%s)", folder, e)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def domain_docs(spec: str, seed: int = 0, cache: str | Path | None = None, use_cache: bool = True
                ) -> tuple[list[str], list[str], int]:
    """Deduplicated documents of one domain/source with their sha256s and the duplicate count, cached."""
    fp = _fingerprint(spec, seed)
    key = _cache_key(fp)
    root = Path(cache) if cache is not None else cache_dir() / "corpus"
    folder = root / f"{_safe_name(spec)}-{key[:16]}"
    if use_cache:
        hit = _load_cached(folder, key)
        if hit is not None:
            log.debug("corpus %s: cache hit %s", spec, folder)
            return hit
    t0 = time.perf_counter()
    docs, hashes, dropped = dedup(load_source(spec, seed=seed))
    log.info("corpus %s: %d docs, %.2f MB in %.1f s", spec, len(docs),
             sum(len(d.encode()) for d in docs) / 1e6, time.perf_counter() - t0)
    if use_cache and docs:
        _write_cache(folder, key, fp, docs, hashes, dropped)
    return docs, hashes, dropped


def build_corpus(domains: Sequence[str] = DEFAULT_DOMAINS, max_bytes: int | dict[str, int | None] | None = None,
                 val_fraction: float = 0.02, seed: int = 0, cache_dir: str | Path | None = None,
                 use_cache: bool = True) -> Corpus:
    """Build (or load from cache) the train/val corpus for ``domains``.

    ``domains`` are names from :data:`DOMAINS` or source specs (paths, ``hf:NAME``); a source spec is
    its own domain key. ``max_bytes`` caps each domain (an int for all, or ``{domain: cap}``).
    ``seed`` drives generated domains (``math``). ``cache_dir`` defaults to ``cache_dir()/corpus``.
    Optional extras absent on this machine are skipped; any other domain with no text is an error.
    """
    _check_fraction(val_fraction)
    if isinstance(domains, str):
        domains = (domains,)
    if not domains:
        raise LmlabError("build_corpus needs at least one domain")
    if max_bytes is not None:
        caps = max_bytes.values() if isinstance(max_bytes, dict) else [max_bytes]
        if any(c is not None and c <= 0 for c in caps):
            raise LmlabError(f"max_bytes must be positive, got {max_bytes}")
    parts: dict[str, Iterable[str]] = {}
    dup_counts: dict[str, int] = {}
    for spec in dict.fromkeys(domains):
        docs, _, dropped = domain_docs(spec, seed=seed, cache=cache_dir, use_cache=use_cache)
        if not docs:
            if spec in OPTIONAL_DOMAINS:
                log.info("corpus: optional domain %r is not installed on this machine; skipped", spec)
                continue
            raise LmlabError(f"domain {spec!r} produced no text")
        parts[spec] = docs
        dup_counts[spec] = dropped
    if not parts:
        raise LmlabError(f"none of the domains {list(domains)} is available on this machine")
    corpus = corpus_from_docs(parts, val_fraction=val_fraction, max_bytes=max_bytes)
    for name, n in dup_counts.items():  # duplicates were dropped before caching
        corpus.stats[name]["duplicates"] = n
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# tokenise + pack


def _vocab_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab <= 65536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_docs(tokenizer: Any, docs: Sequence[str], eos_id: int | None = None, batch_size: int = 512
                ) -> np.ndarray:
    """Tokenise ``docs`` (no special tokens added) and concatenate them with ``eos_id`` after each one.

    ``tokenizer`` is a HF tokenizer or a raw ``tokenizers.Tokenizer``; ``eos_id`` defaults to its
    ``eos_token_id``. Returns a 1-D ``uint16`` array when the vocabulary fits in 16 bits, else ``uint32``.
    """
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise LmlabError("encode_docs: the tokenizer has no eos token; pass eos_id")
    vocab = _vocab_size(tokenizer)
    if not 0 <= eos_id < vocab:
        raise LmlabError(f"encode_docs: eos_id {eos_id} is outside the vocabulary (size {vocab})")
    dtype = token_dtype(vocab)
    backend = tokenizer if hasattr(tokenizer, "encode_batch") else getattr(tokenizer, "backend_tokenizer", None)
    chunks: list[np.ndarray] = []
    starts = range(0, len(docs), batch_size)
    for s in _progress(starts, "encode", total=len(starts)):
        batch = list(docs[s:s + batch_size])
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            ids = [tokenizer.encode(d, add_special_tokens=False) for d in batch]
        for seq in ids:
            chunks.append(np.asarray(seq, dtype=dtype))
            chunks.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def save_tokens(path: str | Path, ids: np.ndarray) -> Path:
    """Save a 1-D token array as ``.npy`` atomically (temp file + rename); returns the final path."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    from lmlab.core.runs import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(ids), allow_pickle=False)
    return path


def load_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a token ``.npy`` written by :func:`save_tokens` (read-only, no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"token file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise LmlabError(f"{path} is not a token .npy file ({e})") from None
