"""Comment augmentation for code pretraining data: density, generation, filtering, self-augmentation.

Paper: **Code Needs Comments: Enhancing Code LLMs with Comment Augmentation** (Song, Guo, Zhou, Xing, ..., Qiu,
Lin; arXiv 2402.13013, Findings of ACL 2024). Comment density measures how well code is aligned with natural
language (PL-NL alignment); an instruction-tuned LLM writes comments into existing code; code the commenter fails
on (data-like, low-NL-value files) is dropped (the paper's *implicit filter*); continued pretraining on the
augmented data beats both the commenter and the same model trained on the un-augmented data; the improved model
then comments the next round (*self-augmentation*).

Comment density (the bigcode / NeMo-Curator definition, :func:`comment_density`)::

    density(f) = (chars in comments + chars in docstrings) / total chars of f

Python: ``tokenize`` COMMENT tokens (``#`` included) + docstrings found with ``ast`` (the docstring literal as
written, quotes included) of the module, classes and functions; strings that merely *look* like comments
(``"# not a comment"``) are not counted. Other languages: pygments ``Comment``/``Comment.Single``/
``Comment.Multiline``/``Comment.Special`` and ``String.Doc`` tokens without their line terminators (preprocessor
lines and hash-bangs are not natural language). Unparsable Python is reported (``DensityError("syntax")``),
never crashed on.
Reference keep-range (bigcode SantaCoder data filter): ``0.01 <= density <= 0.8``.

Code-preservation invariant (:func:`same_code`; the paper's consistency check made exact): an augmented file is
accepted only if its *code* is unchanged::

    Python:  ast.dump(strip_docstrings(ast.parse(aug))) == ast.dump(strip_docstrings(ast.parse(orig)))
    other:   [t for t in pygments_tokens(aug) if t is not comment/whitespace] == same for orig

(``ast.dump`` without positions: comments, blank lines, line breaks inside brackets and docstrings may change;
any change to a name, operator, literal, statement or a non-docstring string - e.g. a ``#`` line inserted into a
multi-line string - is rejected.)

Pipeline (datatrove blocks, so ``LocalPipelineExecutor``/``SlurmPipelineExecutor``/``RayPipelineExecutor`` run it
unchanged; documents ``{id, text, metadata}``)::

    SourceReader (dirs of source files | JSONL(.gz) | parquet; rank/world_size sharding; binary, non-UTF-8 and
        over-size inputs become empty documents with metadata["read_error"])
    -> ReadErrorFilter            (drops them into the exclusion file, reason binary|non_utf8|too_large)
    -> DensityAnnotator           (metadata["language"], ["comment_density"] or ["density_error"])
    -> DensityFilter              (keep-range; reasons unparsable|density_low|density_high)
    -> CommentAugmenter           (a commenter backend rewrites text; metadata["original_text"], ["augment_error"])
    -> PreservationFilter         (reasons augment_<error>|syntax|code_changed|no_comments_added)
    -> AlignmentFilter (optional: mean loss of comment tokens given the code under a small LM <= threshold)
    -> JsonlWriter                (+ an exclusion JsonlWriter per filter: every input ends up in exactly one file)

Per-step stats are datatrove's (``logs/stats.json``, ``forwarded``/``dropped_<reason>``); completion markers
``logs/completions/<rank>`` make a killed run resume without redoing (or duplicating) finished ranks.

Commenter backends (:data:`BACKENDS`): ``hf`` (a local causal LM; the tokenizer's chat template when it has one,
else the Alpaca-style Markdown prompt lmlab's ``tune`` step trains on; batched, left-padded greedy decoding) and
``openai`` (any OpenAI-compatible ``/v1/chat/completions`` endpoint - vLLM, SGLang, a hosted model - over stdlib
``urllib``; a thread pool for concurrency, retries with exponential back-off on timeouts/5xx, and a response cache
keyed by the sha256 of (model, prompt, code)). Modes (:data:`MODES`): ``rewrite`` (the paper: the model returns
the whole file with comments inserted) and ``docstrings`` (lmlab's addition, for tiny models: the model writes one
docstring per undocumented def/class given the code, inserted by lmlab, so code is preserved by construction).

Commenter instruction tuning (``tune``, paper Sec. 3): SFT (loss on response tokens only) on ``(code, commented
code)`` pairs; the paper used ~4k GPT-4-commented StarCoder snippets in 10 languages mixed with CodeAlpaca and
Evol-Instruct-Code-80k; lmlab accepts any JSONL of ``{"input", "output"}`` pairs and builds a default set from
well-commented stdlib functions (input = the function with comments and docstrings stripped).

Evaluation: pass@k (unbiased estimator) on HumanEval/MBPP-format JSONL with generated code run only in
:mod:`lmlab.data.sandbox`; and NL<->code alignment on held-out documented functions: ``code|doc`` = mean loss of a
function's code given its docstring, ``doc|code`` = mean loss of the docstring given the code.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import textwrap
import time
import tokenize
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

KEEP_RANGE = (0.01, 0.8)
"""bigcode's comment-density keep-range (SantaCoder data); NeMo-Curator uses (0.01, 0.85)."""
MAX_FILE_BYTES = 1_000_000
"""Inputs larger than this are skipped with reason ``too_large``."""

EXT_LANG: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "csharp", ".kt": "kotlin",
    ".swift": "swift", ".scala": "scala", ".lua": "lua", ".sh": "bash", ".r": "r", ".jl": "julia",
}
"""File extension -> language (a pygments lexer alias, except ``python`` which uses tokenize/ast)."""


class DensityError(ValueError):
    """A file whose comment density cannot be computed (``reason``: syntax)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# comment density


def language_of(path: str | Path | None, default: str = "python") -> str:
    """Language of a file by extension (:data:`EXT_LANG`), else ``default``."""
    if not path:
        return default
    return EXT_LANG.get(Path(str(path)).suffix.lower(), default)


def _docstring_nodes(tree: ast.AST) -> list[ast.Expr]:
    """The docstring statements (first statement, a str constant) of the module, classes and functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.append(first)
    return out


def _parse_python(text: str) -> ast.Module:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise DensityError("syntax", str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _line_offsets(text: str) -> list[int]:
    offs, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offs.append(pos)
    return offs


def python_comment_spans(text: str) -> list[tuple[int, int, str]]:
    """Character spans ``(start, end, kind)`` of comments (``comment``) and docstrings (``docstring``)."""
    tree = _parse_python(text)
    lines = text.splitlines(keepends=True)
    offs = _line_offsets(text)

    def char_off(lineno: int, col_byte: int) -> int:  # ast/tokenize columns: ast in UTF-8 bytes
        line = lines[lineno - 1] if lineno - 1 < len(lines) else ""
        return offs[lineno - 1] + len(line.encode("utf-8")[:col_byte].decode("utf-8", errors="ignore"))

    spans = []
    for node in _docstring_nodes(tree):
        v = node.value
        spans.append((char_off(v.lineno, v.col_offset), char_off(v.end_lineno, v.end_col_offset), "docstring"))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:  # tokenize columns are characters
                s = offs[tok.start[0] - 1] + tok.start[1]
                spans.append((s, s + len(tok.string), "comment"))
    except (tokenize.TokenError, SyntaxError) as e:
        raise DensityError("syntax", str(e)) from None
    return sorted(spans)


def python_density(text: str) -> dict[str, Any]:
    """``{density, comment_chars, docstring_chars, total_chars}`` of Python source (raises DensityError)."""
    spans = python_comment_spans(text)
    c = sum(e - s for s, e, k in spans if k == "comment")
    d = sum(e - s for s, e, k in spans if k == "docstring")
    n = len(text)
    return {"density": (c + d) / n if n else 0.0, "comment_chars": c, "docstring_chars": d, "total_chars": n}


def _lexer(language: str):
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        return get_lexer_by_name(language, stripnl=False, stripall=False, ensurenl=False)
    except ClassNotFound:
        raise LmlabError(f"no pygments lexer for language {language!r}") from None


def _is_nl_comment(ttype) -> bool:
    from pygments.token import Comment, String

    if ttype in Comment.Preproc or ttype in Comment.PreprocFile or ttype in Comment.Hashbang:
        return False
    return ttype in Comment or ttype in String.Doc


def pygments_density(text: str, language: str) -> dict[str, Any]:
    """Comment density via pygments comment tokens (any language pygments knows)."""
    c = sum(len(v.rstrip("\r\n")) for t, v in _lexer(language).get_tokens(text) if _is_nl_comment(t))
    n = len(text)
    return {"density": c / n if n else 0.0, "comment_chars": c, "docstring_chars": 0, "total_chars": n}


def comment_density(text: str, language: str = "python") -> dict[str, Any]:
    """Comment density of one file (see the module docstring); raises :class:`DensityError` if unparsable."""
    return python_density(text) if language == "python" else pygments_density(text, language)


# ----------------------------------------------------------------------------------------------------------------
# the code-preservation invariant


def python_canon(text: str) -> str:
    """``ast.dump`` of the parse tree with docstring statements removed (positions not included)."""
    tree = _parse_python(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_tokens(text: str, language: str) -> list[tuple[str, str]]:
    """Token stream of non-Python code without comments and whitespace: ``[(type, value), ...]``."""
    from pygments.token import Text, Whitespace

    out = []
    for t, v in _lexer(language).get_tokens(text):
        if _is_nl_comment(t) or t in Whitespace or (t in Text and not v.strip()):
            continue
        out.append((str(t), v.strip() if t in Text else v))
    return out


def same_code(original: str, augmented: str, language: str = "python") -> tuple[bool, str]:
    """The preservation invariant: ``(True, "")`` if only comments/docstrings differ, else ``(False, reason)``.

    Reasons: ``syntax`` (augmented does not parse), ``orig_syntax``, ``code_changed``.
    """
    if language == "python":
        try:
            a = python_canon(original)
        except DensityError:
            return False, "orig_syntax"
        try:
            b = python_canon(augmented)
        except DensityError:
            return False, "syntax"
        return (True, "") if a == b else (False, "code_changed")
    return (True, "") if code_tokens(original, language) == code_tokens(augmented, language) \
        else (False, "code_changed")


def strip_python_comments(text: str) -> str:
    """Remove comments and docstrings (a docstring that is a body's only statement stays, so the code parses).

    Lines that held only a comment or docstring are removed; ``same_code(strip(x), x)`` holds for valid x.
    """
    tree = _parse_python(text)
    lines = text.splitlines(keepends=True)
    offs = _line_offsets(text)
    cuts: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            # whole lines of the docstring (it starts its line and the next statement is on a later line)
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str) and len(node.body) > 1 \
                    and node.body[1].lineno > first.end_lineno \
                    and not lines[first.lineno - 1][:first.col_offset].strip():
                cuts.append((offs[first.lineno - 1], offs[first.end_lineno]))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            line = lines[row - 1]
            if not line[:col].strip():  # a full-line comment: drop the line
                cuts.append((offs[row - 1], offs[row]))
            else:  # trailing comment: drop it and the spaces before it
                pre = line[:col].rstrip()
                cuts.append((offs[row - 1] + len(pre), offs[row - 1] + col + len(tok.string)))
    out, pos = [], 0
    for s, e in sorted(cuts):
        if s < pos:
            s = pos
        if e <= s:
            continue
        out.append(text[pos:s])
        pos = e
    out.append(text[pos:])
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# prompts and response parsing

INSTRUCTION = ("Add comments to the following {language} code. Explain what the code does with inline comments "
               "and docstrings. Do not change, add or remove any code. Reply with the complete commented code in "
               "one ```{language} code block. If the code has no logic worth commenting (data, generated tables), "
               "reply with SKIP.")
"""The commenter instruction (the paper's prompts are Markdown; the exact wording is not published)."""


def plain_prompt(code: str, language: str = "python") -> str:
    """The Alpaca-style Markdown prompt (used when a tokenizer has no chat template, and by ``tune``)."""
    return (f"### Instruction:\n{INSTRUCTION.format(language=language)}\n\n### Input:\n```{language}\n{code}\n```"
            f"\n\n### Response:\n")


def sft_target(commented: str, language: str = "python") -> str:
    return f"```{language}\n{commented}\n```"


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)(?:\n```|\Z)", re.S)


def parse_response(content: str | None) -> tuple[str | None, str]:
    """The code in a commenter reply: ``(code, "")`` or ``(None, reason)``, reason refused|empty|no_code_block."""
    if content is None or not str(content).strip():
        return None, "empty"
    text = str(content)
    if text.strip().upper().startswith("SKIP"):
        return None, "refused"
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    if not blocks:
        return None, "no_code_block"
    return max(blocks, key=len), ""


# ----------------------------------------------------------------------------------------------------------------
# commenter backends


@dataclass
class CommentResult:
    text: str | None
    """The augmented file, or None on failure."""
    error: str = ""
    """Failure reason: refused | empty | no_code_block | timeout | http_<code> | garbage | too_long | ..."""
    cached: bool = False


class OpenAICommenter:
    """Any OpenAI-compatible chat-completions endpoint (vLLM ``--api-server``, SGLang, a hosted model).

    ``endpoint`` is the base URL (``http://host:8000/v1``). Requests run on ``concurrency`` threads; timeouts,
    connection errors and HTTP 429/5xx are retried ``retries`` times with exponential back-off; a reply that is not
    a chat-completion JSON is ``garbage`` (not retried). Replies are cached in ``cache_dir`` by
    sha256(model, prompt, code), so a rerun never pays twice.
    """

    def __init__(self, endpoint: str, model: str = "default", api_key: str | None = None, concurrency: int = 8,
                 retries: int = 2, timeout: float = 120.0, temperature: float = 0.0, max_tokens: int = 4096,
                 cache_dir: str | Path | None = None, backoff: float = 0.5):
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint must be an http(s) URL, got {endpoint!r}")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.concurrency = model, api_key, max(1, concurrency)
        self.retries, self.timeout, self.temperature, self.max_tokens = retries, timeout, temperature, max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.backoff = backoff
        self.requests = 0

    def _key(self, code: str, language: str) -> str:
        blob = json.dumps([self.model, INSTRUCTION, language, code, self.temperature])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        p = self.cache_dir / key[:2] / f"{key}.json"
        try:
            return json.loads(p.read_text())["content"]
        except (OSError, ValueError, KeyError):
            return None

    def _cache_put(self, key: str, content: str) -> None:
        if self.cache_dir is None:
            return
        from lmlab.core.runs import write_json

        write_json(self.cache_dir / key[:2] / f"{key}.json", {"model": self.model, "content": content})

    def _post(self, code: str, language: str) -> tuple[str | None, str]:
        body = json.dumps({
            "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": INSTRUCTION.format(language=language)
                          + f"\n\n```{language}\n{code}\n```"}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        err = "error"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                err = f"http_{e.code}"
                if e.code == 429 or e.code >= 500:
                    continue
                return None, err
            except (TimeoutError, OSError) as e:  # URLError and socket.timeout are OSErrors
                err = "timeout" if "timed out" in str(e) or isinstance(e, TimeoutError) else "connection"
                continue
            try:
                content = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError
            except (ValueError, KeyError, IndexError, TypeError):
                return None, "garbage"
            return content, ""
        return None, err

    def comment_one(self, code: str, language: str) -> CommentResult:
        key = self._key(code, language)
        content = self._cache_get(key)
        cached = content is not None
        if content is None:
            content, err = self._post(code, language)
            if content is None:
                return CommentResult(None, err)
            self._cache_put(key, content)
        text, reason = parse_response(content)
        return CommentResult(text, reason, cached)

    def comment(self, codes: list[str], languages: list[str]) -> list[CommentResult]:
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.comment_one, codes, languages))


class HFCommenter:
    """A local Hugging Face causal LM as commenter: batched greedy decoding, left padding.

    Prompt: the tokenizer's chat template if it has one, else :func:`plain_prompt` with the response opened by
    ```` ```python```` (the format ``tune`` trains). The model is loaded on first use (pipeline blocks are
    copied per task, so each task loads it once). Inputs longer than ``max_input_tokens`` are skipped
    (``too_long``).
    """

    def __init__(self, model: str = "ref:dense", device: str = "cpu", batch_size: int = 8,
                 max_new_tokens: int = 512, max_input_tokens: int = 512, mode: str = "rewrite",
                 trust_remote_code: bool = False, model_obj: Any = None, tokenizer_obj: Any = None):
        self.spec, self.device, self.batch_size = model, device, batch_size
        self.max_new_tokens, self.max_input_tokens, self.mode = max_new_tokens, max_input_tokens, mode
        self.trust_remote_code = trust_remote_code
        self._model, self._tok = model_obj, tokenizer_obj

    def __deepcopy__(self, memo):  # datatrove deep-copies the pipeline per task: share the loaded model
        return self

    def _load(self):
        if self._model is None:
            from lmlab.core.models import load

            self._model, self._tok = load(self.spec, self.device, trust_remote_code=self.trust_remote_code)
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
        return self._model, self._tok

    def _prompt(self, code: str, language: str, prefix: str = "") -> str:
        _, tok = self._load()
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": INSTRUCTION.format(language=language)
                     + f"\n\n```{language}\n{code}\n```"}]
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) \
                + f"```{language}\n" + prefix
        return plain_prompt(code, language) + f"```{language}\n" + prefix

    def generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
        """Greedy continuations of ``prompts`` cut at the first ``stop`` string."""
        import torch

        model, tok = self._load()
        ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        outs: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            tok.padding_side = tok.truncation_side = "left"  # keep the end of a long prompt (the response start)
            n_new = max(1, min(max_new_tokens, ctx // 2))
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                      max_length=ctx - n_new)
            with torch.no_grad():
                gen = model.generate(**{k: v.to(model.device) for k, v in enc.items()}, max_new_tokens=n_new,
                                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = tok.decode(row, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop if s in text), default=len(text))
                outs.append(text[:cut])
        return outs

    def comment(self, codes: list[str], languages: list[str]) -> list[CommentResult]:
        if self.mode == "docstrings":
            return [self._docstrings(c, lang) for c, lang in zip(codes, languages)]
        _, tok = self._load()
        results: list[CommentResult | None] = [None] * len(codes)
        todo = []
        for i, c in enumerate(codes):
            if len(tok(c, add_special_tokens=False)["input_ids"]) > self.max_input_tokens:
                results[i] = CommentResult(None, "too_long")
            else:
                todo.append(i)
        prompts = [self._prompt(codes[i], languages[i]) for i in todo]
        outs = self.generate(prompts, self.max_new_tokens, ("\n```",))
        for i, out in zip(todo, outs):
            text, reason = parse_response(f"```{languages[i]}\n{out}\n```")
            results[i] = CommentResult(text, reason)
        return [r for r in results if r is not None]

    # -- docstrings mode: code preserved by construction ----------------------------------------------------
    def _docstrings(self, code: str, language: str) -> CommentResult:
        if language != "python":
            return CommentResult(None, "unsupported_language")
        try:
            sites = docstring_sites(code)
        except DensityError:
            return CommentResult(None, "syntax")
        if not sites:
            return CommentResult(None, "refused")  # nothing to document: the implicit filter drops it
        lines = code.splitlines(keepends=True)
        prompts = []
        for s in sites:
            snippet = textwrap.dedent("".join(lines[s["start"]:s["end"]]))[:1500]
            header = textwrap.dedent("".join(lines[s["start"]:s["body"]]))
            prompts.append(self._prompt(snippet, language, header + s["indent"][s["base"]:] + '"""'))
        outs = self.generate(prompts, 48, ('"""', "\n"))
        inserts = []
        for s, out in zip(sites, outs):
            doc = clean_docstring(out)
            if doc:
                inserts.append((s["body"], f'{s["indent"]}"""{doc}"""\n'))
        if not inserts:
            return CommentResult(None, "empty")
        for at, line in sorted(inserts, reverse=True):
            lines.insert(at, line)
        return CommentResult("".join(lines))


def clean_docstring(text: str) -> str:
    """A generated one-line docstring made safe to insert (no quotes/backslashes that could end or escape it)."""
    text = text.replace("\\", " ").replace('"', "'").strip().strip("'").strip()
    text = " ".join(text.split())
    return text[:200] if sum(c.isalpha() for c in text) >= 3 else ""


def docstring_sites(code: str) -> list[dict[str, Any]]:
    """Undocumented defs/classes whose body starts on a later line: where a docstring line can be inserted.

    Each site: ``start`` (0-based first line incl. decorators), ``end``, ``body`` (0-based line of the first body
    statement), ``indent`` (that line's leading whitespace), ``base`` (the def line's indentation width).
    """
    tree = _parse_python(code)
    lines = code.splitlines(keepends=True)
    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                 str):
            continue
        first_line = min([d.lineno for d in getattr(first, "decorator_list", [])] + [first.lineno])
        if first_line <= node.lineno:
            continue
        # the body must start its own line (a decorated first statement starts at its first decorator)
        body_line = lines[first_line - 1]
        indent = body_line[:len(body_line) - len(body_line.lstrip())]
        if len(indent.expandtabs()) <= len(lines[node.lineno - 1].expandtabs()) - len(
                lines[node.lineno - 1].expandtabs().lstrip()):
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        def_line = lines[node.lineno - 1]
        base = len(def_line) - len(def_line.lstrip())
        sites.append({"start": start, "end": node.end_lineno, "body": first_line - 1, "indent": indent,
                      "base": base, "name": node.name})
    return sites


BACKENDS = {"hf": HFCommenter, "openai": OpenAICommenter}
"""Commenter backends: name -> class."""
MODES = ("rewrite", "docstrings")


# ----------------------------------------------------------------------------------------------------------------
# datatrove pipeline blocks

from datatrove.data import Document  # noqa: E402  (datatrove imports neither torch nor transformers)
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.filters.base_filter import BaseFilter  # noqa: E402
from datatrove.pipeline.writers.jsonl import JsonlWriter  # noqa: E402


def _read_file(path: Path, max_bytes: int) -> tuple[str, str]:
    """``(text, "")`` or ``("", reason)`` with reason too_large | binary | non_utf8 | unreadable."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return "", "too_large"
        raw = path.read_bytes()
    except OSError:
        return "", "unreadable"
    if b"\x00" in raw[:8192]:
        return "", "binary"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return "", "non_utf8"


def list_inputs(inputs: list[str], extensions: tuple[str, ...] | None = None) -> list[tuple[str, Path]]:
    """Expand input specs into ``(kind, path)`` sorted: kind = source | jsonl | parquet. ``stdlib`` = the
    standard library's .py files (lmlab's code domain)."""
    exts = tuple(extensions) if extensions else tuple(EXT_LANG)
    out: list[tuple[str, Path]] = []
    for spec in inputs:
        if spec == "stdlib":
            from lmlab.core.corpus import stdlib_files

            out += [("source", p) for p in stdlib_files()]
            continue
        p = Path(spec).expanduser()
        if not p.exists():
            raise LmlabError(f"input {spec!r} does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            name = f.name.lower()
            if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
                out.append(("jsonl", f))
            elif name.endswith(".parquet"):
                out.append(("parquet", f))
            elif f.suffix.lower() in exts or p.is_file():
                out.append(("source", f))
    if not out:
        raise LmlabError(f"no input files found in {inputs}")
    return out


class SourceReader(PipelineStep):
    """Read documents from source files, JSONL(.gz) (``text``/``id``/``metadata`` keys) and parquet files.

    Files are sharded by rank (``files[rank::world_size]``). A source file that is binary, not UTF-8 or larger than
    ``max_bytes`` yields an empty document with ``metadata["read_error"]`` (drop it with :class:`ReadErrorFilter`,
    which records it); a malformed JSONL line the same (``bad_json``)."""

    name = "source reader"
    type = "📖 - READER"

    def __init__(self, inputs: list[str], max_bytes: int = MAX_FILE_BYTES, limit: int = -1,
                 extensions: tuple[str, ...] | None = None):
        super().__init__()
        self.files = [(k, str(p)) for k, p in list_inputs(inputs, extensions)]
        roots = [Path(s).expanduser() for s in inputs if s != "stdlib"]
        self.roots = [r if r.is_dir() else r.parent for r in roots]
        self.max_bytes, self.limit = max_bytes, limit

    def _rel(self, path: Path) -> str:
        for r in self.roots:
            try:
                return str(path.relative_to(r))
            except ValueError:
                continue
        from lmlab.core.corpus import stdlib_root

        try:
            return str(path.relative_to(stdlib_root()))
        except ValueError:
            return str(path)

    def _docs(self, kind: str, path: Path):
        if kind == "source":
            text, err = _read_file(path, self.max_bytes)
            meta = {"file_path": str(path), "language": language_of(path), "bytes": len(text.encode())}
            if err:
                meta["read_error"] = err
            yield Document(text=text, id=self._rel(path), metadata=meta)
        elif kind == "jsonl":
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        text = row["text"]
                        if not isinstance(text, str):
                            raise TypeError
                    except (ValueError, KeyError, TypeError):
                        yield Document(text="", id=f"{path.name}/{i}", metadata={"read_error": "bad_json"})
                        continue
                    meta = dict(row.get("metadata") or {})
                    meta.setdefault("language", language_of(meta.get("file_path") or row.get("path")))
                    if len(text.encode()) > self.max_bytes:
                        meta["read_error"] = "too_large"
                        text = ""
                    yield Document(text=text, id=str(row.get("id", f"{path.name}/{i}")), metadata=meta)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            cols = table.column_names
            for i, row in enumerate(table.to_pylist()):
                text = row.get("text") or row.get("content") or ""
                meta = {k: v for k, v in row.items() if k not in ("text", "content", "id") and k in cols}
                meta.setdefault("language", language_of(meta.get("path") or meta.get("file_path")))
                yield Document(text=text, id=str(row.get("id", f"{path.name}/{i}")), metadata=meta)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        n = 0
        for kind, p in self.files[rank::world_size]:
            for doc in self._docs(kind, Path(p)):
                if 0 <= self.limit <= n:
                    return
                self.stat_update("documents")
                n += 1
                yield doc


class ReadErrorFilter(BaseFilter):
    """Drop documents the reader could not decode (reason = ``metadata["read_error"]``)."""

    name = "read errors"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        err = doc.metadata.get("read_error")
        return (False, err) if err else True


class DensityAnnotator(PipelineStep):
    """Write ``metadata["comment_density"]`` (and chars) or ``metadata["density_error"]``; stats per language."""

    name = "comment density"
    type = "📊 - STATS"

    def __init__(self, key: str = "comment_density"):
        super().__init__()
        self.key = key

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            lang = doc.metadata.get("language") or "python"
            with self.track_time():
                try:
                    d = comment_density(doc.text, lang)
                    doc.metadata[self.key] = round(d["density"], 6)
                    doc.metadata["comment_chars"] = d["comment_chars"] + d["docstring_chars"]
                    self.stat_update(f"scored_{lang}")
                except DensityError as e:
                    doc.metadata["density_error"] = e.reason
                    self.stat_update(f"unparsable_{lang}")
                except LmlabError:
                    doc.metadata["density_error"] = "unknown_language"
                    self.stat_update("unknown_language")
            yield doc


class DensityFilter(BaseFilter):
    """Keep documents with ``lo <= density <= hi`` (reasons unparsable | density_low | density_high)."""

    name = "density range"

    def __init__(self, lo: float = KEEP_RANGE[0], hi: float = KEEP_RANGE[1], key: str = "comment_density",
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.lo, self.hi, self.key = lo, hi, key

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("density_error"):
            return False, "unparsable"
        d = doc.metadata.get(self.key)
        if d is None:
            return False, "unparsable"
        if d < self.lo:
            return False, "density_low"
        if d > self.hi:
            return False, "density_high"
        return True


class CommentAugmenter(PipelineStep):
    """Rewrite ``text`` with a commenter backend in batches; keeps ``metadata["original_text"]``.

    Documents with density ``>= max_density`` pass through untouched (``metadata["augmented"] = False``); a
    failure is recorded in ``metadata["augment_error"]`` and the original text is kept.
    """

    name = "comment augmenter"
    type = "✍️ - AUGMENT"

    def __init__(self, commenter: Any, batch_size: int = 16, max_density: float = 1.01):
        super().__init__()
        self.commenter, self.batch_size, self.max_density = commenter, batch_size, max_density

    def _flush(self, batch: list[Document]):
        todo = [d for d in batch if d.metadata.get("comment_density", 0.0) < self.max_density]
        with self.track_time("batch"):
            try:
                res = self.commenter.comment([d.text for d in todo],
                                             [d.metadata.get("language") or "python" for d in todo])
            except Exception as e:  # a backend crash must not lose the batch
                log.warning("commenter failed on a batch of %d: %s", len(todo), e)
                res = [CommentResult(None, "backend_error")] * len(todo)
        for d, r in zip(todo, res):
            d.metadata["original_text"] = d.text
            d.metadata["augmented"] = True
            if r.text is None:
                d.metadata["augment_error"] = r.error
                self.stat_update(f"failed_{r.error}")
            else:
                d.text = r.text
                self.stat_update("augmented")
            if r.cached:
                self.stat_update("cache_hits")
        for d in batch:
            d.metadata.setdefault("augmented", False)
        yield from batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        batch: list[Document] = []
        for doc in data:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)


class PreservationFilter(BaseFilter):
    """The code-preservation invariant + the paper's implicit filter.

    Reasons: ``augment_<error>`` (the commenter failed/refused), ``syntax``, ``code_changed``,
    ``no_comments_added`` (density did not increase). Documents that were not augmented pass.
    Accepted documents get ``metadata["density_before"]``/``["comment_density"]`` (after).
    """

    name = "code preserved"

    def __init__(self, exclusion_writer=None, require_more_comments: bool = True):
        super().__init__(exclusion_writer)
        self.require_more_comments = require_more_comments

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not doc.metadata.get("augmented"):
            return True
        if doc.metadata.get("augment_error"):
            return False, f"augment_{doc.metadata['augment_error']}"
        lang = doc.metadata.get("language") or "python"
        ok, reason = same_code(doc.metadata["original_text"], doc.text, lang)
        if not ok:
            return False, reason
        before = comment_density(doc.metadata["original_text"], lang)["density"]
        after = comment_density(doc.text, lang)["density"]
        if self.require_more_comments and after <= before:
            return False, "no_comments_added"
        doc.metadata["density_before"] = round(before, 6)
        doc.metadata["comment_density"] = round(after, 6)
        return True


def comment_token_loss(model: Any, tok: Any, text: str, max_tokens: int = 1024) -> float | None:
    """NL-alignment score: mean NLL (nats) of the comment/docstring tokens of ``text`` given everything before
    them, under a (small) LM. ``None`` if ``text`` has no comments within the first ``max_tokens`` tokens."""
    import torch

    spans = python_comment_spans(text)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_tokens)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    mask = [any(s <= a < e for s, e, _ in spans) for a, _ in offs]
    if sum(mask[1:]) == 0:
        return None
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V)
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")  # (T-1,)
    m = torch.tensor(mask[1:], device=nll.device)
    return float(nll[m].mean())


class AlignmentFilter(BaseFilter):
    """Optional NL-alignment filter: drop augmented files whose comment tokens have mean loss > ``max_loss``
    under a small LM (reason ``misaligned``); the score is stored in ``metadata["comment_loss"]``."""

    name = "nl alignment"

    def __init__(self, model: str = "ref:dense", max_loss: float = 6.0, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.spec, self.max_loss = model, max_loss
        self._m = None

    def __deepcopy__(self, memo):
        return self

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not doc.metadata.get("augmented") or (doc.metadata.get("language") or "python") != "python":
            return True
        if self._m is None:
            from lmlab.core.models import load

            self._m = load(self.spec)
        try:
            score = comment_token_loss(*self._m, doc.text)
        except DensityError:
            return False, "syntax"
        if score is None:
            return False, "no_comments_added"
        doc.metadata["comment_loss"] = round(score, 4)
        return True if score <= self.max_loss else (False, "misaligned")


def run_pipeline(steps: list, logging_dir: str | Path, tasks: int = 1, workers: int = 1) -> dict[str, Any]:
    """Run datatrove blocks with the ``LocalPipelineExecutor`` (completion markers in ``logging_dir``; finished
    ranks are skipped on a rerun). Returns the merged per-step stats as a dict."""
    from datatrove.executor import LocalPipelineExecutor

    ex = LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                               skip_completed=True, start_method="fork")
    ex.run()
    return merged_stats(logging_dir)


def merged_stats(logging_dir: str | Path) -> dict[str, Any]:
    """Per-step counters summed over the per-rank stats files (correct after a resumed run too)."""
    merged: dict[str, Counter] = {}
    for f in sorted(Path(logging_dir, "stats").glob("*.json")):
        for step in json.loads(f.read_text()):
            c = merged.setdefault(step["name"].split(": ", 1)[-1], Counter())
            for k, v in step.get("stats", {}).items():
                if isinstance(v, dict) and "total" in v:
                    c[k] += v["total"]
                elif isinstance(v, int | float):
                    c[k] += v
    return {k: dict(v) for k, v in merged.items()}


def read_jsonl_dir(folder: str | Path) -> list[dict[str, Any]]:
    """All rows of the ``*.jsonl[.gz]`` files in ``folder`` (sorted by file name)."""
    rows = []
    for p in sorted(Path(folder).glob("*.jsonl*")):
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def writer(folder: str | Path, prefix: str = "") -> JsonlWriter:
    """A gzip JSONL writer to ``folder/<prefix><rank>.jsonl.gz`` (one prefix per writer sharing a folder)."""
    return JsonlWriter(str(folder), output_filename=prefix + "${rank}.jsonl.gz", expand_metadata=False)


# ----------------------------------------------------------------------------------------------------------------
# SFT pairs, commenter tuning, alignment evaluation


def function_snippets(text: str, max_chars: int = 1200) -> list[str]:
    """Source of each function/method (dedented, decorators included), at most ``max_chars`` long."""
    try:
        tree = _parse_python(text)
    except DensityError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            seg = textwrap.dedent("".join(lines[start:node.end_lineno]))
            if len(seg) <= max_chars:
                out.append(seg.rstrip() + "\n")
    return out


def make_pairs(texts: list[str], min_density: float = 0.25, max_chars: int = 1200) -> list[dict[str, str]]:
    """``(code, commented code)`` pairs from well-commented files: each function of a file with density >=
    ``min_density`` that has comments; ``input`` = the function with comments/docstrings stripped."""
    pairs = []
    for t in texts:
        try:
            if python_density(t)["density"] < min_density:
                continue
        except DensityError:
            continue
        for seg in function_snippets(t, max_chars):
            try:
                stripped = strip_python_comments(seg)
            except (DensityError, tokenize.TokenError, SyntaxError):
                continue
            if stripped.strip() != seg.strip() and same_code(stripped, seg)[0]:
                pairs.append({"input": stripped, "output": seg})
    return pairs


def documented_functions(texts: list[str], max_chars: int = 1200) -> list[dict[str, str]]:
    """Held-out functions with a docstring: ``{"doc": docstring, "code": function without comments/docstring}``."""
    out = []
    for t in texts:
        for seg in function_snippets(t, max_chars):
            try:
                tree = ast.parse(seg)
                fn = tree.body[0]
                doc = ast.get_docstring(fn)
                if not doc or len(fn.body) < 2:
                    continue
                code = strip_python_comments(seg)
            except (SyntaxError, DensityError, tokenize.TokenError, IndexError, ValueError):
                continue
            out.append({"doc": doc.strip(), "code": code})
    return out


def conditional_loss(model: Any, tok: Any, pairs: list[tuple[str, str]], max_ctx: int = 256,
                     max_tgt: int = 256, batch_size: int = 8, per_item: list[float] | None = None) -> float:
    """Mean per-token NLL (nats) of each ``target`` given its ``context`` (token-weighted over all pairs).

    ``per_item``: a list that receives each pair's own mean NLL (for paired bootstrap CIs)."""
    import torch

    total, count = 0.0, 0
    dev = next(model.parameters()).device
    rows = []
    for ctx, tgt in pairs:
        c = tok(ctx, add_special_tokens=False)["input_ids"][-max_ctx:] if ctx else []
        t = tok(tgt, add_special_tokens=False)["input_ids"][:max_tgt]
        if not c:
            c = [tok.eos_token_id]
        rows.append((c, t))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        L = max(len(c) + len(t) for c, t in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id or 0, dtype=torch.long)
        tmask = torch.zeros((len(chunk), L), dtype=torch.bool)
        amask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (c, t) in enumerate(chunk):
            seq = c + t
            ids[r, :len(seq)] = torch.tensor(seq)
            amask[r, :len(seq)] = 1
            tmask[r, len(c):len(seq)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=amask.to(dev)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1).to(dev),
                                                reduction="none").view(len(chunk), -1)  # (B, L-1)
        m = tmask[:, 1:].to(dev)
        total += float(nll[m].sum())
        count += int(m.sum())
        if per_item is not None:
            per_item.extend(float((nll[r] * m[r]).sum() / m[r].sum().clamp(min=1)) for r in range(len(chunk)))
    return total / max(1, count)


def alignment_eval(model: Any, tok: Any, funcs: list[dict[str, str]], per_function: bool = False
                   ) -> dict[str, Any]:
    """NL<->code alignment: ``code|doc``, ``code`` (no docstring), their gap, and ``doc|code`` (nats/token).

    With ``per_function`` the result also holds each function's mean losses (``per_function``) for paired CIs."""
    code_doc = [(f'"""{f["doc"]}"""\n', f["code"]) for f in funcs]
    code_only = [("", f["code"]) for f in funcs]
    doc_code = [(f["code"] + '\n"""', f["doc"] + '"""') for f in funcs]
    per: dict[str, list[float]] = {"code_given_doc": [], "code_alone": [], "doc_given_code": []}
    a = conditional_loss(model, tok, code_doc, per_item=per["code_given_doc"])
    b = conditional_loss(model, tok, code_only, per_item=per["code_alone"])
    c = conditional_loss(model, tok, doc_code, per_item=per["doc_given_code"])
    out: dict[str, Any] = {"code_given_doc": a, "code_alone": b, "doc_gain": b - a, "doc_given_code": c,
                           "n": len(funcs)}
    if per_function:
        out["per_function"] = per
    return out


def sft_tokens(tok: Any, pairs: list[dict[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Tokenised SFT examples ``(ids, n_prompt)``; examples longer than ``max_len`` are dropped."""
    out = []
    for p in pairs:
        a = tok(plain_prompt(p["input"]), add_special_tokens=False)["input_ids"]
        b = tok(sft_target(p["output"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(a) + len(b) <= max_len:
            out.append((a + b, len(a)))
    return out


def sft_train(model: Any, tok: Any, pairs: list[dict[str, str]], steps: int = 100, batch_size: int = 8,
              lr: float = 1e-3, max_len: int = 1024, seed: int = 0, progress: bool = True) -> list[float]:
    """Instruction-tune a commenter: AdamW, cosine, loss on response tokens only. Returns the loss curve."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from lmlab.core.pretrain import OptimConfig, lr_at, make_optimizer

    data = sft_tokens(tok, pairs, max_len)
    if not data:
        raise LmlabError(f"no SFT pair fits in max_len={max_len} tokens")
    opt = OptimConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10))
    optim = make_optimizer(model, opt)
    rng = np.random.default_rng(seed)
    dev = next(model.parameters()).device
    model.train()
    losses = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for step in tqdm(range(steps), desc="sft", disable=not progress, leave=False):
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt)
        idx = rng.integers(0, len(data), size=batch_size)
        L = max(len(data[i][0]) for i in idx)
        ids = torch.full((batch_size, L), pad, dtype=torch.long)
        labels = torch.full((batch_size, L), -100, dtype=torch.long)
        att = torch.zeros((batch_size, L), dtype=torch.long)
        for r, i in enumerate(idx):
            seq, n = data[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, n:len(seq)] = torch.tensor(seq[n:])
            att[r, :len(seq)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1).to(dev), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """A JSONL of ``{"input", "output"}`` (or ``{"code", "commented"}``) pairs."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"pair file not found: {p}")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            a, b = row.get("input", row.get("code")), row.get("output", row.get("commented"))
        except ValueError:
            raise LmlabError(f"{p}:{i + 1}: not JSON") from None
        if not isinstance(a, str) or not isinstance(b, str):
            raise LmlabError(f"{p}:{i + 1}: need string fields input/output (or code/commented)")
        pairs.append({"input": a, "output": b})
    if not pairs:
        raise LmlabError(f"{p} holds no pairs")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# commands


@dataclass
class _Inputs(RunArgs):
    input: list[str] = field(default_factory=lambda: ["stdlib"])
    """Inputs: directories of source files, files, JSONL(.gz) or parquet (``stdlib``: the Python stdlib)."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Files larger than this are skipped with reason too_large."""
    limit: int = -1
    """Max documents per task (-1: all)."""
    tasks: int = 1
    """datatrove tasks (shards; each writes its own output file and completion marker)."""
    workers: int = 1
    """Parallel worker processes for the tasks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input:
            raise ConfigError("give at least one input")
        if self.tasks < 1 or self.workers < 1:
            raise ConfigError("tasks and workers must be >= 1")
        if self.max_file_bytes < 1:
            raise ConfigError("max_file_bytes must be >= 1")


@dataclass
class DensityConfig(_Inputs):
    """Comment density of a corpus: per-file scores, histogram per language, the bigcode keep-range."""

    keep_lo: float = KEEP_RANGE[0]
    """Lower end of the keep-range (bigcode 0.01)."""
    keep_hi: float = KEEP_RANGE[1]
    """Upper end of the keep-range (bigcode 0.8; NeMo 0.85)."""
    write_kept: bool = True
    """Write the documents inside the range to kept/ and the rest (with reasons) to excluded/."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.keep_lo <= self.keep_hi <= 1:
            raise ConfigError("need 0 <= keep_lo <= keep_hi <= 1")


def density_summary(values: list[float], lo: float, hi: float) -> dict[str, Any]:
    import numpy as np

    if not values:
        return {"files": 0}
    v = np.asarray(values)
    return {"files": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9)),
            "kept_fraction": float(((v >= lo) & (v <= hi)).mean()), "zero_fraction": float((v == 0).mean())}


def _density_plot(path: Path, by_label: dict[str, list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = [i / 40 for i in range(41)]
    for label, vals in by_label.items():
        if vals:
            ax.hist(vals, bins=bins, alpha=0.55, label=f"{label} (n={len(vals)})")
    ax.axvline(KEEP_RANGE[0], color="grey", ls=":", lw=1)
    ax.axvline(KEEP_RANGE[1], color="grey", ls=":", lw=1)
    ax.set(title=title, xlabel="comment density (comment+docstring chars / chars)", ylabel="files")
    if any(by_label.values()):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    from lmlab.core.runs import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def density_main(cfg: DensityConfig) -> Path:
    from lmlab.core.runs import start_run

    reader = SourceReader(cfg.input, cfg.max_file_bytes, cfg.limit)  # bad input fails before the run dir
    with start_run(cfg, "data-comments-density") as run:
        steps = [reader, ReadErrorFilter(exclusion_writer=writer(run / "excluded")), DensityAnnotator()]
        if cfg.write_kept:
            steps += [DensityFilter(cfg.keep_lo, cfg.keep_hi, exclusion_writer=writer(run / "excluded_density")),
                      writer(run / "kept")]
        else:
            steps += [writer(run / "scored")]
        stats = run_pipeline(steps, run / "logs", cfg.tasks, cfg.workers)
        rows = read_jsonl_dir(run / "kept") + read_jsonl_dir(run / "excluded_density") if cfg.write_kept \
            else read_jsonl_dir(run / "scored")
        by_lang: dict[str, list[float]] = {}
        for r in rows:
            m = r["metadata"]
            if "comment_density" in m:
                by_lang.setdefault(m.get("language", "?"), []).append(m["comment_density"])
        errors = Counter(r["metadata"].get("read_error") for r in read_jsonl_dir(run / "excluded"))
        unparsable = sum(1 for r in rows if r["metadata"].get("density_error"))
        _density_plot(run.plots / "density_hist.png", by_lang, "comment density per language")
        summary = {lang: density_summary(v, cfg.keep_lo, cfg.keep_hi) for lang, v in by_lang.items()}
        run.finish({"languages": summary, "unparsable": unparsable, "read_errors": dict(errors),
                    "keep_range": [cfg.keep_lo, cfg.keep_hi], "stats": stats})
    return run.path


@dataclass
class GenerateConfig(_Inputs):
    """Comment augmentation: a commenter rewrites low-density files; the filter step checks them."""

    backend: str = "hf"
    """Commenter backend: hf (a local causal LM) | openai (an OpenAI-compatible endpoint)."""
    model: str = "ref:dense"
    """hf: model spec (ref:NAME, HF name, path); openai: the served model's name."""
    endpoint: str = ""
    """openai: base URL of the server, e.g. http://127.0.0.1:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (optional)."""
    mode: str = "rewrite"
    """rewrite (the paper: the model returns the commented file) | docstrings (tiny models: one docstring per
    undocumented def, inserted by lmlab)."""
    max_density: float = 0.05
    """Only files with comment density below this are sent to the commenter (1.01: all)."""
    concurrency: int = 8
    """openai: parallel requests."""
    retries: int = 2
    """openai: retries on timeouts, connection errors, 429 and 5xx."""
    timeout: float = 120.0
    """openai: seconds per request."""
    cache_dir: str = ""
    """openai: reply cache folder (default: <out>/cache)."""
    batch_size: int = 8
    """Files per commenter call (hf: generation batch)."""
    max_new_tokens: int = 768
    """hf rewrite: new tokens per file."""
    max_input_tokens: int = 512
    """hf rewrite: longer files are skipped (too_long)."""
    filter: bool = True
    """Also run the preservation filter (accepted/ + excluded/ with reasons)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (hf backend; only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.backend == "openai" and not self.endpoint:
            raise ConfigError("backend=openai needs endpoint=http://HOST:PORT/v1")
        if self.backend == "openai" and self.mode != "rewrite":
            raise ConfigError("mode=docstrings needs backend=hf")


def make_commenter(cfg: GenerateConfig, out: Path, device: str = "cpu", model_obj: Any = None, tok_obj: Any = None):
    """The commenter backend a generate config asks for."""
    if cfg.backend == "openai":
        return OpenAICommenter(cfg.endpoint, cfg.model, os.environ.get(cfg.api_key_env) or None, cfg.concurrency,
                               cfg.retries, cfg.timeout, max_tokens=cfg.max_new_tokens * 4,
                               cache_dir=cfg.cache_dir or out / "cache")
    return HFCommenter(cfg.model, device, cfg.batch_size,
                       cfg.max_new_tokens, cfg.max_input_tokens, cfg.mode, cfg.trust_remote_code, model_obj, tok_obj)


def augment_pipeline(cfg: GenerateConfig, out: Path, commenter: Any) -> list:
    """The generate (+ filter) pipeline writing out/augmented or out/accepted + out/excluded."""
    steps = [SourceReader(cfg.input, cfg.max_file_bytes, cfg.limit),
             ReadErrorFilter(exclusion_writer=writer(out / "excluded_input", "read_")),
             DensityAnnotator(),
             DensityFilter(0.0, 1.0, exclusion_writer=writer(out / "excluded_input", "density_")),
             CommentAugmenter(commenter, cfg.batch_size, cfg.max_density)]
    if cfg.filter:
        steps += [PreservationFilter(exclusion_writer=writer(out / "excluded")), writer(out / "accepted")]
    else:
        steps += [writer(out / "augmented")]
    return steps


def summarize_filter(out: Path) -> dict[str, Any]:
    acc = read_jsonl_dir(out / "accepted")
    exc = read_jsonl_dir(out / "excluded")
    aug = [r for r in acc if r["metadata"].get("augmented")]
    reasons = Counter(r["metadata"].get("filter_reason", "?") for r in exc)
    return {"accepted_augmented": len(aug), "passed_unaugmented": len(acc) - len(aug), "rejected": len(exc),
            "reasons": dict(reasons),
            "density_before": [r["metadata"]["density_before"] for r in aug],
            "density_after": [r["metadata"]["comment_density"] for r in aug]}


def generate_main(cfg: GenerateConfig) -> Path:
    from lmlab.core.runs import check_out, start_run
    from lmlab.core.runtime import setup

    SourceReader(cfg.input, cfg.max_file_bytes, cfg.limit)  # bad input fails before the run dir
    if cfg.out:
        check_out(cfg.out)
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads) if cfg.backend == "hf" \
        else ("cpu", None, cfg.threads)
    with start_run(cfg, "data-comments-generate", device=dev, dtype=dtype, threads=threads) as run:
        commenter = make_commenter(cfg, run.path, str(dev))
        stats = run_pipeline(augment_pipeline(cfg, run.path, commenter), run / "logs", cfg.tasks, cfg.workers)
        res: dict[str, Any] = {"stats": stats}
        if cfg.filter:
            s = summarize_filter(run.path)
            _density_plot(run.plots / "density_before_after.png",
                          {"before": s["density_before"], "after": s["density_after"]},
                          "accepted files: density before/after augmentation")
            res.update({k: v for k, v in s.items() if not k.startswith("density_")})
        run.finish(res)
    return run.path


@dataclass
class FilterConfig(RunArgs):
    """Filter augmented documents (JSONL with metadata.original_text): preservation invariant + optional
    NL-alignment threshold."""

    input: list[str] = field(default_factory=list)
    """JSONL(.gz) files or folders written by 'generate filter=false' (augmented/)."""
    alignment_model: str = ""
    """Model for the NL-alignment score (mean loss of comment tokens given the code); empty: off."""
    max_comment_loss: float = 6.0
    """Drop augmented files whose comment tokens have a mean loss above this (nats)."""
    require_more_comments: bool = True
    """Reject augmented files whose comment density did not increase."""

def filter_main(cfg: FilterConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.input:
        raise ConfigError("give input=PATH (the augmented/ folder of a generate run)")
    reader = SourceReader(cfg.input)
    with start_run(cfg, "data-comments-filter") as run:
        steps = [reader, ReadErrorFilter(exclusion_writer=writer(run / "excluded", "read_")),
                 PreservationFilter(writer(run / "excluded", "preserve_"), cfg.require_more_comments)]
        if cfg.alignment_model:
            steps.append(AlignmentFilter(cfg.alignment_model, cfg.max_comment_loss,
                                         writer(run / "excluded", "align_")))
        steps.append(writer(run / "accepted"))
        stats = run_pipeline(steps, run / "logs")
        s = summarize_filter(run.path)
        run.finish({"stats": stats, **{k: v for k, v in s.items() if not k.startswith("density_")}})
    return run.path


@dataclass
class TuneConfig(RunArgs):
    """Instruction-tune a commenter (SFT on (code, commented code) pairs)."""

    model: str = "ref:dense"
    """Base model to tune."""
    pairs: str = ""
    """JSONL of {input, output} pairs; empty: build them from well-commented stdlib functions."""
    min_density: float = 0.25
    """Built-in pairs: only files with at least this comment density."""
    max_pairs: int = 4000
    """Use at most this many pairs (the paper: ~4k)."""
    steps: int = 200
    """SFT steps."""
    batch_size: int = 8
    """Pairs per step."""
    lr: float = 1e-3
    """Peak learning rate (cosine)."""
    max_len: int = 1024
    """Max tokens of prompt + response (longer pairs are dropped)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.batch_size < 1 or self.max_pairs < 1:
            raise ConfigError("steps, batch_size and max_pairs must be >= 1")


def default_pairs(max_pairs: int, min_density: float, seed: int = 0) -> list[dict[str, str]]:
    """Pairs from the train split of lmlab's code domain (never its validation files)."""
    import random

    from lmlab.core.corpus import build_corpus

    corpus = build_corpus(domains=("code",), seed=seed)
    pairs = make_pairs(corpus.train["code"], min_density)
    random.Random(seed).shuffle(pairs)
    return pairs[:max_pairs]


def tune_main(cfg: TuneConfig) -> Path:
    from lmlab.core.models import load
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    pairs = read_pairs(cfg.pairs)[:cfg.max_pairs] if cfg.pairs else default_pairs(cfg.max_pairs, cfg.min_density,
                                                                                     cfg.seed)
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load(cfg.model, dev)
    with start_run(cfg, "data-comments-tune", device=dev, dtype=dtype, threads=threads) as run:
        losses = sft_train(model, tok, pairs, cfg.steps, cfg.batch_size, cfg.lr, cfg.max_len, cfg.seed)
        model.save_pretrained(run / "model")
        tok.save_pretrained(run / "model")
        line_plot(run.plots / "sft_loss.png", list(range(1, len(losses) + 1)), {"sft": losses},
                  title="commenter SFT loss", xlabel="step", ylabel="loss (response tokens)")
        run.finish({"pairs": len(pairs), "first_loss": losses[0], "final_loss": float(sum(losses[-10:]) / min(
            10, len(losses))), "model": str(run / "model")})
    return run.path


@dataclass
class LoopConfig(RunArgs):
    """Self-augmentation: augment -> continue pretraining -> the new model comments the next round."""

    model: str = "ref:dense"
    """Starting model (pretrained on code); also the first commenter unless `commenter` is set."""
    commenter: str = ""
    """First-round commenter (e.g. the model folder of a 'tune' run); empty: `model`."""
    rounds: int = 2
    """Augmentation rounds."""
    mode: str = "docstrings"
    """Commenter mode: rewrite | docstrings."""
    max_density: float = 0.05
    """Files below this density are augmented."""
    max_files: int = 200
    """Low-density training files augmented per round."""
    steps: int = 200
    """Continued-pretraining steps per round."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 256
    """Tokens per sequence."""
    lr: float = 1e-3
    """Continued-pretraining peak learning rate."""
    eval_functions: int = 300
    """Held-out documented functions for the alignment eval."""
    max_bytes: int = 0
    """Cap on the code corpus in bytes (0: all of it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}")
        if self.rounds < 1 or self.steps < 1:
            raise ConfigError("rounds and steps must be >= 1")


def code_split(seed: int = 0, max_bytes: int | None = None) -> tuple[list[str], list[str]]:
    from lmlab.core.corpus import build_corpus

    corpus = build_corpus(domains=("code",), max_bytes=max_bytes, seed=seed)
    return corpus.train["code"], corpus.val["code"]


def augment_texts(texts: list[str], commenter: Any, max_density: float, max_files: int
                  ) -> tuple[list[str], dict[str, Any]]:
    """Replace low-density files by accepted augmented versions (in memory, the same blocks as the pipeline)."""
    docs = [Document(text=t, id=str(i), metadata={"language": "python"}) for i, t in enumerate(texts)]
    scored = list(DensityAnnotator().run(iter(docs)))
    low = [d for d in scored if d.metadata.get("comment_density", 1.0) < max_density][:max_files]
    low_ids = {d.id for d in low}
    aug = list(CommentAugmenter(commenter, 16, 1.01).run(iter(low)))
    pf = PreservationFilter()
    reasons: Counter = Counter()
    accepted: dict[str, str] = {}
    before, after = [], []
    for d in aug:
        ok, reason = _filter_one(pf, d)
        if ok:
            accepted[d.id] = d.text
            before.append(d.metadata["density_before"])
            after.append(d.metadata["comment_density"])
        else:
            reasons[reason] += 1
    out = [accepted.get(str(i), t) for i, t in enumerate(texts)]
    return out, {"candidates": len(low_ids), "accepted": len(accepted), "reasons": dict(reasons),
                 "density_before": before, "density_after": after}


def _filter_one(f: BaseFilter, doc: Document) -> tuple[bool, str]:
    r = f.filter(doc)
    return (r, "") if isinstance(r, bool) else (r[0], r[1])


def continue_pretraining(model: Any, tok: Any, train_texts: list[str], val_texts: list[str], steps: int,
                         batch_size: int, seq_len: int, lr: float, seed: int = 0, run: Any = None) -> Any:
    from lmlab.core.corpus import encode_docs
    from lmlab.core.pretrain import OptimConfig, train

    opt = OptimConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=max(1, steps // 10),
                      eval_every=0, eval_batches=4, log_every=max(1, steps // 20))
    tr = encode_docs(tok, train_texts)
    va = encode_docs(tok, val_texts[:50]) if val_texts else None
    if va is not None and len(va) <= seq_len + 1:
        va = None  # too little validation text for one window: train without evals
    return train(model, tr, va, opt, seed=seed, run=run, progress=True)


def loop_main(cfg: LoopConfig) -> Path:
    from lmlab.core.models import load
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load(cfg.model, dev)
    commenter_spec = cfg.commenter or cfg.model
    train_texts, val_texts = code_split(cfg.seed, cfg.max_bytes or None)
    funcs = documented_functions(val_texts)[:cfg.eval_functions]
    with start_run(cfg, "data-comments-loop", device=dev, dtype=dtype, threads=threads) as run:
        rounds = [{"round": 0, **alignment_eval(model, tok, funcs)}]
        cm, ct = (model, tok) if not cfg.commenter else load(commenter_spec, dev)
        for r in range(1, cfg.rounds + 1):
            commenter = HFCommenter(model_obj=cm, tokenizer_obj=ct, mode=cfg.mode, device=str(dev))
            texts, aug = augment_texts(train_texts, commenter, cfg.max_density, cfg.max_files)
            continue_pretraining(model, tok, texts, val_texts, cfg.steps, cfg.batch_size, cfg.seq_len, cfg.lr,
                                 cfg.seed + r)
            model.save_pretrained(run / f"model_round{r}")
            tok.save_pretrained(run / f"model_round{r}")
            rec = {"round": r, **{k: v for k, v in aug.items() if not k.startswith("density_")},
                   **alignment_eval(model, tok, funcs)}
            rounds.append(rec)
            run.log(rec)
            cm, ct = model, tok  # self-augmentation: the improved model comments the next round
        run.finish({"rounds": rounds})
    return run.path


@dataclass
class EvalConfig(RunArgs):
    """pass@k on HumanEval/MBPP-format JSONL (sandboxed) and NL<->code alignment on held-out functions."""

    model: list[str] = field(default_factory=lambda: ["ref:dense"])
    """Models to evaluate."""
    problems: str = ""
    """HumanEval/MBPP-format JSONL (empty: alignment only)."""
    n_samples: int = 1
    """Completions per problem (n in pass@k)."""
    k: list[int] = field(default_factory=lambda: [1])
    """k values for pass@k."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy; n_samples > 1 needs > 0)."""
    max_new_tokens: int = 256
    """Tokens per completion."""
    timeout: float = 5.0
    """Sandbox wall-clock seconds per program."""
    eval_functions: int = 300
    """Held-out documented stdlib functions for the alignment eval (0: skip)."""
    max_bytes: int = 0
    """Cap on the code corpus in bytes for the alignment eval (0: all of it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(k > self.n_samples or k < 1 for k in self.k):
            raise ConfigError("need 1 <= k <= n_samples")
        if self.n_samples > 1 and self.temperature <= 0:
            raise ConfigError("n_samples > 1 needs temperature > 0")


def read_problems(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"problem file not found: {p}")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise LmlabError(f"{p}:{i + 1}: not JSON") from None
            if not ("prompt" in row and "test" in row and "entry_point" in row) and "test_list" not in row:
                raise LmlabError(f"{p}:{i + 1}: neither HumanEval (prompt/test/entry_point) nor MBPP (test_list)")
            rows.append(row)
    return rows


def stop_completion(text: str) -> str:
    """HumanEval stop sequences: cut at the next top-level statement."""
    cut = min((i for s in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#") if (i := text.find(s)) >= 0),
              default=len(text))
    return text[:cut]


def pass_at_k_eval(model: Any, tok: Any, problems: list[dict[str, Any]], n: int, ks: list[int],
                   temperature: float, max_new_tokens: int, timeout: float) -> dict[str, Any]:
    import torch

    from lmlab.data.sandbox import pass_at_k, program_for, run_sandboxed

    per = []
    for prob in problems:
        prompt = prob["prompt"] if "prompt" in prob else f'"""{prob.get("text", "")}"""\n'
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        c = 0
        for _ in range(n):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            comp = stop_completion(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            c += run_sandboxed(program_for(prob, comp), timeout=timeout).passed
        per.append({"task_id": prob.get("task_id"), "n": n, "correct": c})
    return {f"pass@{k}": sum(pass_at_k(p["n"], p["correct"], k) for p in per) / max(1, len(per)) for k in ks} \
        | {"problems": len(per)}


def eval_main(cfg: EvalConfig) -> Path:
    from lmlab.core.models import load
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    problems = read_problems(cfg.problems) if cfg.problems else []
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    loaded = [(s, *load(s, dev)) for s in cfg.model]
    funcs = documented_functions(code_split(cfg.seed, cfg.max_bytes or None)[1])[:cfg.eval_functions] \
        if cfg.eval_functions else []
    with start_run(cfg, "data-comments-eval", device=dev, dtype=dtype, threads=threads) as run:
        res: dict[str, Any] = {}
        for spec, model, tok in loaded:
            r: dict[str, Any] = {}
            if problems:
                r.update(pass_at_k_eval(model, tok, problems, cfg.n_samples, cfg.k, cfg.temperature,
                                        cfg.max_new_tokens, cfg.timeout))
            if funcs:
                r["alignment"] = alignment_eval(model, tok, funcs)
            res[spec] = r
        run.finish({"models": res})
    return run.path


# ----------------------------------------------------------------------------------------------------------------
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Density of the stdlib corpus, then the preservation filter on commented low-density files.

    Quick: the ref:dense commenter in docstrings mode on 24 low-density stdlib files; full: 200 files.
    """
    from lmlab.core.models import load
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    n_files = 200 if cfg.full else 24
    with start_run(sub, "tour-comments", device=dev, dtype=dtype, threads=threads) as run:
        from lmlab.core.zoo import REF_MAX_BYTES

        train_texts, _ = code_split(cfg.seed, None if cfg.full else REF_MAX_BYTES)
        dens = []
        for t in train_texts:
            with contextlib.suppress(DensityError):
                dens.append(python_density(t)["density"])
        model, tok = load("ref:dense", dev)
        commenter = HFCommenter(model_obj=model, tokenizer_obj=tok, mode="docstrings", device=str(dev))
        _, aug = augment_texts(train_texts, commenter, 0.05, n_files)
        _density_plot(run.plots / "density_corpus.png", {"stdlib code": dens}, "comment density: stdlib corpus")
        _density_plot(run.plots / "density_before_after.png",
                      {"before": aug["density_before"], "after": aug["density_after"]},
                      "accepted files: density before/after")
        summ = density_summary(dens, *KEEP_RANGE)
        run.finish({"corpus_density": summ, "augment": {k: v for k, v in aug.items()
                                                         if not k.startswith("density_")}})
    text = (f"Comment density of {summ['files']} stdlib files: median {summ['median']:.3f} (p10 {summ['p10']:.3f}, "
            f"p90 {summ['p90']:.3f}); bigcode range [0.01, 0.8] keeps {summ['kept_fraction']:.1%}.\n"
            f"ref:dense (docstrings mode) commented {aug['candidates']} low-density files: {aug['accepted']} "
            f"accepted, rejected by reason {aug['reasons']}.")
    return run.path, text
