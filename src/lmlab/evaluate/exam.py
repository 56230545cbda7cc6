"""Exam runner and scorers (``lmlab eval exam``, ``lmlab eval matrix``), GAOKAO-Bench conventions.

Seed paper: **GAOKAO-Eval** (arXiv 2412.10056), built on **GAOKAO-Bench** (Zhang et al., arXiv 2305.12474,
github.com/OpenLMLab/GAOKAO-Bench, Apache-2.0). A model answers every item of an exam; each answer is
extracted and scored with the benchmark's own rules, and one row per model x item x sample is written to
``samples.jsonl``. ``eval matrix`` turns runs into the models x items response matrix that ``eval irt``
fits.

Items (JSONL, one object per line)::

    {id, subject, year, type, question, answer: [..], points, difficulty?, difficulty_source?, prompt?}
    type ∈ single_choice | multi_choice | multi_question_choice | five_out_of_seven | fill_blank | open

``answer`` has one entry per sub-question; ``points`` is per sub-question. GAOKAO-Bench JSON files
(``{"keywords", "example": [...]}``) and a GAOKAO-Bench checkout (``Data/Objective_Questions`` +
``Bench/Obj_Prompt.json``) are read natively; ``builtin:math`` is lmlab's synthetic arithmetic exam.

Answer extraction (GAOKAO-Bench ``Bench/bench_function.py``, identical in OpenCompass):

* single_choice: the last ``[A-D]`` in the output;
* multi_question_choice: each ``【答案】\\s*[:：]*\\s*[A-Z]`` if their count matches the sub-questions, else the
  first n capitals;
* multi_choice: every ``[A-D]`` after ``【答案】`` (whitespace removed), else those in the last 10 characters;
* five_out_of_seven: the first 5 of ``[A-G]``;
* a length mismatch with the reference turns into ``['Z'] * n`` (all wrong);
* fill_blank: the text after ``【答案】`` / "answer is", else the first non-empty line, compared after
  normalisation (case, spaces, trailing punctuation; numerically when both sides are numbers).

Scoring: ``points`` per matching sub-question; multi-select by :data:`MULTI_RULES` (GAOKAO-Bench physics
6/3/0 = full / correct subset / any wrong, the default; GAOKAO-Eval's proportional rule; OpenCompass 2/1/0).
``strip_thinking`` removes ``<think>...</think>`` before extraction. Open items take human or LLM-judge
scores from a CSV (``item_id, model, rater, score``; averaged over raters).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

TYPES = ("single_choice", "multi_choice", "multi_question_choice", "five_out_of_seven", "fill_blank", "open")

SUBJECTS = {"English": "English", "Math": "Math", "Chinese": "Chinese", "Physics": "Physics",
            "Chemistry": "Chemistry", "Biology": "Biology", "History": "History", "Geography": "Geography",
            "Political": "Politics"}
"""GAOKAO-Bench file keyword fragment -> subject (as in Bench/OBJ_score_evaluation.py)."""


# ---------------------------------------------------------------------------------------------------------------
# items


def _subject_of(keyword: str) -> str:
    for frag, subj in SUBJECTS.items():
        if frag in keyword:
            return subj
    return keyword


def validate_item(d: Any, where: str) -> dict[str, Any]:
    """Check one item dict against the schema; returns a normalised copy."""
    if not isinstance(d, dict):
        raise LmlabError(f"{where}: an item must be a JSON object")
    for k in ("id", "type", "question", "answer"):
        if k not in d:
            raise LmlabError(f"{where}: missing field {k!r}")
    if d["type"] not in TYPES:
        raise LmlabError(f"{where}: unknown question type {d['type']!r} (valid: {', '.join(TYPES)})")
    ans = d["answer"]
    if isinstance(ans, (str, int, float)):
        ans = [ans]
    if not isinstance(ans, list) or not ans:
        raise LmlabError(f"{where}: answer must be a non-empty list (one entry per sub-question)")
    try:
        points = float(d.get("points", 1.0))
    except (TypeError, ValueError):
        raise LmlabError(f"{where}: points must be a number, got {d.get('points')!r}") from None
    out = dict(d)
    out.update(id=str(d["id"]), answer=[str(a) for a in ans], points=points,
               subject=str(d.get("subject", "all")), year=str(d.get("year", "")))
    if d.get("difficulty") is not None:
        try:
            out["difficulty"] = float(d["difficulty"])
        except (TypeError, ValueError):
            raise LmlabError(f"{where}: difficulty must be a number") from None
    return out


def read_jsonl_items(path: Path) -> list[dict[str, Any]]:
    items = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmlabError(f"{path}:{ln}: malformed JSON ({e.msg})") from None
            it = validate_item(d, f"{path}:{ln}")
            if it["id"] in seen:
                raise LmlabError(f"{path}:{ln}: duplicate item id {it['id']!r}")
            seen.add(it["id"])
            items.append(it)
    if not items:
        raise LmlabError(f"{path}: no items")
    return items


def _gaokao_prompts(root: Path | None) -> dict[str, dict[str, str]]:
    if root is None:
        return {}
    p = root / "Bench" / "Obj_Prompt.json"
    if not p.is_file():
        return {}
    return {e["keyword"]: e for e in json.loads(p.read_text(encoding="utf-8"))["examples"]}


def read_gaokao_file(path: Path, prompts: dict[str, dict[str, str]], qtype: str | None = None
                     ) -> list[dict[str, Any]]:
    """Items of one GAOKAO-Bench JSON file ({"keywords"|"keyword", "example": [...]})."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    kw = data.get("keywords") or data.get("keyword") or path.stem
    info = prompts.get(kw, {})
    qtype = qtype or info.get("type")
    if qtype is None:
        raise LmlabError(f"{path}: question type of {kw!r} unknown (no Bench/Obj_Prompt.json entry)")
    out = []
    for n, e in enumerate(data["example"]):
        ans = e.get("answer", e.get("standard_answer"))
        out.append(validate_item({
            "id": f"{kw}/{e.get('index', n)}", "subject": _subject_of(kw), "year": e.get("year", ""),
            "type": qtype, "question": e["question"], "answer": ans, "points": float(e.get("score", 1)),
            "prompt": info.get("prefix_prompt", ""), "source": kw}, f"{path}:example {n}"))
    return out


def builtin_math(n: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """lmlab's synthetic arithmetic exam (core.corpus.math_problems, a seed range disjoint from the training
    corpus's) as fill_blank items. Human-style difficulty: worked steps (``=`` signs in the reference
    solution) + 0.3 x digits of the answer."""
    from lmlab.core.corpus import math_problems

    items = []
    for k, p in enumerate(math_problems(n, seed=10_000 + seed)):
        steps = p["text"].split("\nA:", 1)[1].count("=")
        items.append({"id": f"math/{k}", "subject": "math", "year": "", "type": "fill_blank",
                      "question": f"Q: {p['question']}\nA:", "answer": [str(p["answer"])], "points": 1.0,
                      "difficulty": float(steps + 0.3 * len(str(abs(int(p["answer"]))))),
                      "difficulty_source": "steps+digits", "kind": p["kind"],
                      "prompt": "", "raw_prompt": True})
    return items


def load_items(spec: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Items from a JSONL file, a GAOKAO-Bench JSON file or checkout, or ``builtin:math[:N]``."""
    if spec.startswith("builtin:math"):
        n = int(spec.split(":")[2]) if spec.count(":") == 2 else 40
        items = builtin_math(n)
    else:
        p = Path(spec)
        if not p.exists():
            raise LmlabError(f"items not found: {spec}")
        if p.is_dir():
            files = sorted((p / "Data" / "Objective_Questions").glob("*.json")) or sorted(p.glob("*.json"))
            if not files:
                raise LmlabError(f"{p}: no GAOKAO-Bench JSON files (expected Data/Objective_Questions/*.json)")
            prompts = _gaokao_prompts(p if (p / "Bench").is_dir() else None)
            items = [it for f in files for it in read_gaokao_file(f, prompts)]
        elif p.suffix == ".jsonl":
            items = read_jsonl_items(p)
        elif p.suffix == ".json":
            root = p.parent.parent.parent if p.parent.name == "Objective_Questions" else None
            items = read_gaokao_file(p, _gaokao_prompts(root))
        else:
            raise LmlabError(f"{p}: items must be .jsonl, a GAOKAO-Bench .json or folder, or builtin:math")
    return items[:limit] if limit else items


def build_prompt(item: dict[str, Any]) -> str:
    if item.get("raw_prompt"):
        return item["question"]
    return (item.get("prompt") or "") + str(item["question"]).strip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# extraction and scoring


THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.S)


def strip_thinking(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (an unterminated block runs to the end)."""
    text = THINK_RE.sub("", text)
    if "</think>" in text:  # a template that opened <think> in the prompt: drop everything before the close
        text = text.split("</think>")[-1]
    return text


def extract_single(out: str, n: int) -> list[str]:
    t = re.findall(r"[A-D]", out[::-1])
    return [t[0]] if t else []


def extract_multi_question(out: str, n: int) -> list[str]:
    t = re.findall(r"【答案】\s*[:：]*\s*[A-Z]", out)
    if len(t) == n:
        return [re.findall(r"[A-Z]", x)[0] for x in t]
    caps = re.findall(r"[A-Z]", out)
    return caps[: min(len(caps), n)]


def extract_multi_choice(out: str, n: int) -> list[str]:
    content = re.sub(r"\s+", "", out)
    i = content.find("【答案】")
    temp = content[i:] if i > 0 else content[-10:]
    ans = "".join(re.findall(r"[A-D]", temp))
    return [ans] if ans else []


def extract_five_of_seven(out: str, n: int) -> list[str]:
    return re.findall(r"[A-G]", out)[:5]


def extract_fill(out: str, n: int) -> list[str]:
    m = re.search(r"【答案】\s*[:：]?\s*(.*?)(<eoa>|$)", out, re.S)
    if m:
        parts = [p.strip() for p in re.split(r"[;；\n]", m.group(1)) if p.strip()]
        return parts[:n] if len(parts) >= n else [m.group(1).strip()][:n]
    m = re.search(r"answer is\s*:?\s*([^\n]+?)\s*(\.\s|\.$|\n|$)", out, re.I)
    if m:
        return [m.group(1).strip()]
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return [lines[0]] if lines else []


EXTRACTORS = {"single_choice": extract_single, "multi_question_choice": extract_multi_question,
              "multi_choice": extract_multi_choice, "five_out_of_seven": extract_five_of_seven,
              "fill_blank": extract_fill}
"""GAOKAO-Bench extraction per question type (output text, n sub-questions) -> extracted answers."""

NUM_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def normalize_answer(s: str) -> str:
    s = str(s).strip().lower()
    s = re.sub(r"\s+", "", s)
    s = s.strip(".。,，;；:：$")
    return s


def _as_number(s: str) -> float | None:
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def fill_match(pred: str, gold: str) -> bool:
    """Normalised string match; numerically (last number in ``pred``) when ``gold`` is a number."""
    g = normalize_answer(gold)
    p = normalize_answer(pred)
    if p == g:
        return True
    gv = _as_number(g)
    if gv is not None:
        nums = NUM_RE.findall(pred.replace(",", ""))
        if nums:
            pv = _as_number(nums[-1])
            return pv is not None and abs(pv - gv) <= 1e-9 * max(1.0, abs(gv))
    return False


def rule_physics(pred: str, gold: str, points: float) -> float:
    """GAOKAO-Bench physics multi-select: full marks if exact, half for a correct subset, else 0."""
    if pred == gold:
        return points
    return points / 2 if pred and all(c in gold for c in pred) else 0.0


def rule_proportional(pred: str, gold: str, points: float) -> float:
    """GAOKAO-Eval (2024 new-curriculum math): share of correct options chosen; any wrong option scores 0."""
    if not pred or any(c not in gold for c in pred):
        return 0.0
    return points * len(set(pred)) / len(set(gold))


def rule_opencompass(pred: str, gold: str, points: float) -> float:
    """OpenCompass GaokaoBench multi_choice: 2 for exact, 1 for a correct subset (scaled to points)."""
    return rule_physics(pred, gold, points)


MULTI_RULES = {"physics": rule_physics, "proportional": rule_proportional, "opencompass": rule_opencompass}


def score_output(item: dict[str, Any], output: str, strip_think: bool = False, multi_rule: str = "physics"
                 ) -> dict[str, Any]:
    """Extract and score one output. Returns extracted, sub_scores, score, max_score, full_credit."""
    text = strip_thinking(output) if strip_think else output
    gold = item["answer"]
    n = len(gold)
    pts = float(item["points"])
    res: dict[str, Any] = {"stripped_output": text if strip_think else None, "max_score": pts * n}
    if item["type"] == "open":
        res.update(extracted=[], sub_scores=[], score=None, full_credit=None, graded=False)
        return res
    extracted = EXTRACTORS[item["type"]](text, n)
    used = extracted if len(extracted) == n else ["Z"] * n
    if item["type"] == "fill_blank":
        subs = [pts if fill_match(p, g) else 0.0 for p, g in zip(used, gold)]
    elif item["type"] == "multi_choice":
        subs = [MULTI_RULES[multi_rule](p, g, pts) for p, g in zip(used, gold)]
    else:
        subs = [pts if p == g else 0.0 for p, g in zip(used, gold)]
    score = float(sum(subs))
    res.update(extracted=extracted, sub_scores=subs, score=score, full_credit=bool(score >= pts * n - 1e-9),
               graded=True)
    return res


def rescore_gaokao_results(results_dir: str | Path, prompts_root: str | Path | None = None) -> dict[str, Any]:
    """Re-score GAOKAO-Bench ``Results/<model>_obj`` from the raw ``model_output`` with :func:`score_output`.

    Returns totals as in ``result/correction_score.json`` and the number of extraction mismatches against the
    stored ``model_answer``."""
    results_dir = Path(results_dir)
    root = Path(prompts_root) if prompts_root else results_dir.parent.parent
    prompts = _gaokao_prompts(root)
    if not prompts:
        raise LmlabError(f"{root}: Bench/Obj_Prompt.json not found (needed for question types)")
    total = correct = n_sub = 0.0
    mismatches = []
    by_subject: dict[str, dict[str, float]] = defaultdict(lambda: {"total": 0.0, "correct": 0.0, "n": 0.0})
    n_items = 0
    for f in sorted(results_dir.glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        kw = data.get("keyword") or data.get("keywords")
        qtype = prompts[kw]["type"]
        subj = _subject_of(kw)
        for e in data["example"]:
            item = {"type": qtype, "answer": list(e["standard_answer"]), "points": float(e["score"])}
            r = score_output(item, e["model_output"], multi_rule="physics")
            if r["extracted"] != list(e["model_answer"]):
                mismatches.append(f"{kw}/{e['index']}")
            t = len(e["standard_answer"]) * float(e["score"])
            total += t
            correct += r["score"]
            n_sub += len(e["standard_answer"])
            by_subject[subj]["total"] += t
            by_subject[subj]["correct"] += r["score"]
            by_subject[subj]["n"] += len(e["standard_answer"])
            n_items += 1
    return {"total_score": total, "correct_score": correct, "question_num": n_sub, "items": n_items,
            "scoring_rate": round(correct / total, 3) if total else float("nan"), "mismatches": mismatches,
            "subject": {s: {**v, "rate": round(v["correct"] / v["total"], 3)} for s, v in by_subject.items()}}


def read_open_scores(path: str | Path) -> dict[tuple[str, str], list[float]]:
    """``item_id, model, rater, score`` CSV -> {(item_id, model): [scores]}."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        need = {"item_id", "model", "rater", "score"}
        if not rd.fieldnames or not need <= set(rd.fieldnames):
            raise LmlabError(f"{path}: need columns {sorted(need)}, got {rd.fieldnames}")
        for ln, row in enumerate(rd, 2):
            try:
                out[(row["item_id"], row["model"])].append(float(row["score"]))
            except ValueError:
                raise LmlabError(f"{path}:{ln}: score must be a number, got {row['score']!r}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# backends


@dataclass
class Generation:
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    latency_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None


def _truncate_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class HFBackend:
    """Local HF causal LM: chat template when the tokenizer has one, batched greedy (or sampled) generation,
    stop strings (generation stops once every row of the batch contains one; text is cut at the first)."""

    def __init__(self, spec: str, device: Any, dtype: Any, max_new_tokens: int, stop: list[str],
                 batch_size: int = 8, trust_remote_code: bool = False, chat_template: str = "auto",
                 model: Any = None, tokenizer: Any = None):
        from lmlab.core.models import load

        if model is None:
            model, tokenizer = load(spec, device, dtype, trust_remote_code)
        self.model, self.tok = model, tokenizer
        self.name = spec
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.batch_size = batch_size
        self.use_chat = chat_template == "on" or (chat_template == "auto" and bool(getattr(tokenizer, "chat_template",
                                                                                           None)))

    def format(self, prompt: str) -> str:
        if self.use_chat:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt

    def generate(self, prompts: list[str], temperature: float = 0.0, seed: int = 0) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        dev = next(self.model.parameters()).device
        out: list[Generation] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = [self.format(p) for p in prompts[s:s + self.batch_size]]
            enc = [tok(c, add_special_tokens=not self.use_chat)["input_ids"] for c in chunk]
            T = max(len(e) for e in enc)
            ids = torch.full((len(enc), T), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), T), dtype=torch.long)
            for r, e in enumerate(enc):  # left padding
                ids[r, T - len(e):] = torch.tensor(e)
                mask[r, T - len(e):] = 1
            ids, mask = ids.to(dev), mask.to(dev)

            class _Stop(StoppingCriteria):
                def __init__(self, stop: list[str], start: int):
                    self.stop, self.start = stop, start

                def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
                    if not self.stop:
                        return False
                    texts = tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
                    return all(any(x in t for x in self.stop) for t in texts)

            kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad, "attention_mask": mask,
                                  "stopping_criteria": StoppingCriteriaList([_Stop(self.stop, T)])}
            if temperature > 0:
                torch.manual_seed(seed + s)
                kw.update(do_sample=True, temperature=temperature)
            else:
                kw.update(do_sample=False)
            t0 = time.time()
            with torch.no_grad():
                gen = self.model.generate(ids, **kw)
            dt = (time.time() - t0) / len(enc)
            for r, e in enumerate(enc):
                new = gen[r, T:].tolist()
                eos = tok.eos_token_id
                n_new = next((k + 1 for k, t in enumerate(new) if t == eos), len(new))
                text = tok.decode(new[:n_new], skip_special_tokens=True)
                text, stopped = _truncate_stop(text, self.stop)
                finish = "stop" if stopped or (n_new < len(new) or (new and new[-1] == eos)) else "length"
                rt = None
                if "<think>" in text:
                    inner = "".join(re.findall(r"<think>(.*?)(?:</think>|$)", text, re.S))
                    rt = len(tok(inner, add_special_tokens=False)["input_ids"])
                out.append(Generation(text=text, prompt_tokens=len(e), completion_tokens=n_new, reasoning_tokens=rt,
                                      latency_s=round(dt, 4), finish_reason=finish))
        return out


class OpenAIBackend:
    """Any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint: concurrency, retries with
    exponential backoff, timeouts; usage (incl. ``completion_tokens_details.reasoning_tokens``) recorded.

    A request that still fails after the retries becomes a failed sample (``error`` set); the run goes on."""

    def __init__(self, base_url: str, model: str, max_new_tokens: int, stop: list[str], concurrency: int = 4,
                 retries: int = 3, timeout: float = 60.0, backoff: float = 1.0, api_key_env: str = "OPENAI_API_KEY"):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{base_url}#{model}"
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.concurrency = concurrency
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.api_key = os.environ.get(api_key_env) if api_key_env else None

    def _one(self, prompt: str, temperature: float, seed: int) -> Generation:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": self.max_new_tokens, "temperature": temperature, "seed": seed}
        if self.stop:
            body["stop"] = self.stop[:4]
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        err = None
        t0 = time.time()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                d = json.loads(raw)
                ch = d["choices"][0]
                msg = ch.get("message") or {}
                text = msg.get("content")
                if text is None and "text" in ch:
                    text = ch["text"]
                if not isinstance(text, str):
                    raise ValueError("no text in the response")
                if msg.get("reasoning_content"):
                    text = f"<think>{msg['reasoning_content']}</think>{text}"
                usage = d.get("usage") or {}
                det = usage.get("completion_tokens_details") or {}
                text, _ = _truncate_stop(text, self.stop)
                return Generation(text=text, prompt_tokens=usage.get("prompt_tokens"),
                                  completion_tokens=usage.get("completion_tokens"),
                                  reasoning_tokens=det.get("reasoning_tokens"), latency_s=round(time.time() - t0, 4),
                                  finish_reason=ch.get("finish_reason"))
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code}"
                if e.code in (400, 401, 403, 404):  # not transient
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                err = f"bad response: {type(e).__name__}: {e}"
        return Generation(error=err, latency_s=round(time.time() - t0, 4), finish_reason="error")

    def generate(self, prompts: list[str], temperature: float = 0.0, seed: int = 0) -> list[Generation]:
        with cf.ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(lambda p: self._one(p, temperature, seed), prompts))


def parse_model_spec(spec: str) -> tuple[str, str, str]:
    """``openai:BASE_URL#NAME`` -> ("openai", base_url, name); anything else -> ("hf", spec, spec)."""
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        if "#" not in rest:
            raise ConfigError(f"an OpenAI-compatible model is openai:BASE_URL#MODEL_NAME, got {spec!r}")
        url, name = rest.rsplit("#", 1)
        if not url.startswith(("http://", "https://")) or not name:
            raise ConfigError(f"bad OpenAI-compatible model spec {spec!r} (want openai:http://host:port/v1#name)")
        return "openai", url, name
    return "hf", spec, spec


# ---------------------------------------------------------------------------------------------------------------
# exam command


@dataclass
class ExamConfig(RunArgs):
    """Run models on an exam (items JSONL, GAOKAO-Bench data, or builtin:math) and score every answer."""

    items: str = "builtin:math"
    """Items: a JSONL file, a GAOKAO-Bench JSON file or checkout folder, or builtin:math[:N]."""
    model: list[str] = field(default_factory=lambda: ["ref:dense"])
    """Models: ref:NAME, HF name or path, or openai:BASE_URL#MODEL (comma-separated)."""
    limit: int | None = None
    """Use only the first N items."""
    samples: int = 1
    """Samples per item (K > 1 with temperature > 0 gives binomial counts for IRT)."""
    temperature: float = 0.0
    """Sampling temperature (0 = greedy)."""
    max_new_tokens: int = 256
    """Generation budget per answer."""
    stop: list[str] = field(default_factory=lambda: ["<eoa>"])
    """Stop strings (output is cut at the first)."""
    batch_size: int = 8
    """HF backend: prompts per generate call."""
    concurrency: int = 4
    """OpenAI backend: parallel requests."""
    retries: int = 3
    """OpenAI backend: retries per request (exponential backoff)."""
    timeout: float = 60.0
    """OpenAI backend: seconds per request."""
    backoff: float = 1.0
    """OpenAI backend: first retry delay in seconds (doubles each retry)."""
    strip_thinking: bool = False
    """Remove <think>...</think> before answer extraction."""
    multi_rule: str = "physics"
    """Multi-select scoring: physics (6/3/0) | proportional (GAOKAO-Eval math) | opencompass."""
    open_scores: str | None = None
    """CSV item_id,model,rater,score with human / judge scores for open items."""
    chat_template: str = "auto"
    """HF backend: auto (use it when the tokenizer has one) | on | off."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ConfigError("give at least one model")
        if self.samples < 1:
            raise ConfigError("samples must be >= 1")
        if self.multi_rule not in MULTI_RULES:
            raise ConfigError(f"multi_rule must be one of {list(MULTI_RULES)}, got {self.multi_rule!r}")
        if self.chat_template not in ("auto", "on", "off"):
            raise ConfigError("chat_template must be auto|on|off")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1")
        for m in self.model:
            parse_model_spec(m)


def make_backend(spec: str, cfg: ExamConfig, device: Any = "cpu", dtype: Any = None) -> Any:
    kind, a, b = parse_model_spec(spec)
    if kind == "openai":
        return OpenAIBackend(a, b, cfg.max_new_tokens, cfg.stop, cfg.concurrency, cfg.retries, cfg.timeout,
                             cfg.backoff)
    return HFBackend(spec, device, dtype, cfg.max_new_tokens, cfg.stop, cfg.batch_size, cfg.trust_remote_code,
                     cfg.chat_template)


def run_exam(items: list[dict[str, Any]], backends: list[Any], cfg: ExamConfig,
             open_scores: dict[tuple[str, str], list[float]] | None = None) -> list[dict[str, Any]]:
    """Every backend x item x sample -> one scored row."""
    from tqdm import tqdm

    rows = []
    prompts = [build_prompt(it) for it in items]
    for be in backends:
        for k in range(cfg.samples):
            gens: list[Generation] = []
            bs = max(cfg.batch_size, 1)
            for s in tqdm(range(0, len(prompts), bs), desc=f"{be.name} sample {k}", disable=None, leave=False):
                gens += be.generate(prompts[s:s + bs], cfg.temperature, cfg.seed + k)
            for it, pr, g in zip(items, prompts, gens):
                row: dict[str, Any] = {"model": be.name, "item_id": it["id"], "sample": k, "subject": it["subject"],
                                       "type": it["type"],
                                       "prompt_hash": hashlib.sha256(pr.encode()).hexdigest()[:16],
                                       "raw_output": g.text,
                                       "tokens": {"prompt": g.prompt_tokens, "completion": g.completion_tokens,
                                                  "reasoning": g.reasoning_tokens},
                                       "latency_s": g.latency_s, "finish_reason": g.finish_reason,
                                       "answer": it["answer"]}
                if g.error is not None:
                    row.update(failed=True, error=g.error, extracted=[], sub_scores=[], score=None,
                               max_score=float(it["points"]) * len(it["answer"]), full_credit=None)
                else:
                    row.update(failed=False, **score_output(it, g.text, cfg.strip_thinking, cfg.multi_rule))
                    if it["type"] == "open" and open_scores and (it["id"], be.name) in open_scores:
                        sc = open_scores[(it["id"], be.name)]
                        row.update(score=float(sum(sc) / len(sc)), rater_scores=sc, graded=True,
                                   full_credit=bool(sum(sc) / len(sc) >= row["max_score"] - 1e-9))
                rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: score/max and rate overall and per subject; failed and ungraded counts."""
    out: dict[str, Any] = {}
    for r in rows:
        m = out.setdefault(r["model"], {"score": 0.0, "max": 0.0, "n": 0, "failed": 0, "ungraded": 0,
                                        "full_credit": 0, "subjects": {}})
        m["n"] += 1
        if r.get("failed"):
            m["failed"] += 1
            continue
        if r.get("score") is None:
            m["ungraded"] += 1
            continue
        s = m["subjects"].setdefault(r["subject"], {"score": 0.0, "max": 0.0, "n": 0})
        for d in (m, s):
            d["score"] += r["score"]
            d["max"] += r["max_score"]
        s["n"] += 1
        m["full_credit"] += int(bool(r["full_credit"]))
    for m in out.values():
        m["rate"] = m["score"] / m["max"] if m["max"] else float("nan")
        for s in m["subjects"].values():
            s["rate"] = s["score"] / s["max"] if s["max"] else float("nan")
    return out


def main(cfg: ExamConfig) -> Path:
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    items = load_items(cfg.items, cfg.limit)  # validate before anything else
    open_scores = read_open_scores(cfg.open_scores) if cfg.open_scores else None
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    backends = [make_backend(s, cfg, dev, dtype) for s in cfg.model]
    with start_run(cfg, "eval-exam", device=dev, dtype=dtype, threads=threads) as run:
        t0 = time.time()
        rows = run_exam(items, backends, cfg, open_scores)
        wall = time.time() - t0
        run.write_samples(rows)
        run.save_json("items.json", [{**{k: v for k, v in it.items() if k != "question"},
                                      "question": it["question"][:200]} for it in items])
        summ = summarize(rows)
        subjects = sorted({s for m in summ.values() for s in m["subjects"]})
        if subjects:
            bar_plot(run.plots / "score_rate_by_subject.png", subjects,
                     {m: [v["subjects"].get(s, {}).get("rate", 0.0) for s in subjects] for m, v in summ.items()},
                     title="score rate by subject", ylabel="score / max")
        run.finish({"items": len(items), "samples": cfg.samples, "models": summ,
                    "items_per_s": round(len(items) * cfg.samples * len(backends) / max(wall, 1e-9), 3),
                    "failed": sum(r.get("failed", False) for r in rows)})
    return run.path


# ---------------------------------------------------------------------------------------------------------------
# matrix command


MATRIX_KINDS = ("binary", "partial", "binomial")


@dataclass
class MatrixConfig(RunArgs):
    """Build the models x items response matrix from exam runs (input to `eval irt`)."""

    runs: list[str] = field(default_factory=list)
    """`eval exam` run directories (or samples.jsonl files)."""
    kind: str = "binary"
    """binary (full credit, sample 0) | partial (score/max, mean over samples) | binomial (full-credit count of K)."""
    include_failed: bool = False
    """Count failed samples as wrong (default: missing)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in MATRIX_KINDS:
            raise ConfigError(f"kind must be one of {MATRIX_KINDS}, got {self.kind!r}")


def read_samples(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    rows, meta = [], {}
    for p in paths:
        p = Path(p)
        f = p / "samples.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise LmlabError(f"{p}: no samples.jsonl (is it an `eval exam` run?)")
        for ln, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise LmlabError(f"{f}:{ln}: malformed JSON") from None
        it = (p / "items.json") if p.is_dir() else None
        if it and it.is_file():
            for d in json.loads(it.read_text(encoding="utf-8")):
                meta[d["id"]] = {k: d.get(k) for k in ("subject", "type", "difficulty", "difficulty_source")}
    return rows, meta


def build_matrix(rows: list[dict[str, Any]], kind: str = "binary", include_failed: bool = False,
                 item_meta: dict[str, dict[str, Any]] | None = None):
    import numpy as np

    from lmlab.evaluate.irt import Matrix

    models = list(dict.fromkeys(r["model"] for r in rows))
    items = list(dict.fromkeys(r["item_id"] for r in rows))
    mi, ii = {m: k for k, m in enumerate(models)}, {i: k for k, i in enumerate(items)}
    acc = defaultdict(list)
    toks = defaultdict(list)
    for r in rows:
        if r.get("failed") and not include_failed:
            continue
        if not r.get("failed") and r.get("score") is None:
            continue  # ungraded open item
        if kind == "binary" and r.get("sample", 0) != 0:
            continue
        full = bool(r.get("full_credit")) if not r.get("failed") else False
        part = (r["score"] / r["max_score"]) if not r.get("failed") and r["max_score"] else 0.0
        acc[(r["model"], r["item_id"])].append((full, part))
        t = r.get("tokens") or {}
        n = t.get("reasoning") if t.get("reasoning") is not None else t.get("completion")
        if n is not None:
            toks[r["item_id"]].append(n)
    V = np.full((len(models), len(items)), np.nan)
    K = np.ones_like(V)
    for (m, i), vals in acc.items():
        if kind == "binary":
            V[mi[m], ii[i]] = float(vals[0][0])
        elif kind == "partial":
            V[mi[m], ii[i]] = float(np.mean([v[1] for v in vals]))
        else:
            V[mi[m], ii[i]] = float(sum(v[0] for v in vals))
            K[mi[m], ii[i]] = len(vals)
    meta = {i: dict((item_meta or {}).get(i, {})) for i in items}
    for i in items:
        if toks[i]:
            meta[i]["mean_reasoning_tokens"] = float(np.mean(toks[i]))
    return Matrix(V, K, models, items, meta, kind)


def matrix_main(cfg: MatrixConfig) -> Path:
    import numpy as np

    from lmlab.core.runs import atomic_write, start_run

    if not cfg.runs:
        raise ConfigError("give at least one exam run directory")
    rows, meta = read_samples(cfg.runs)
    m = build_matrix(rows, cfg.kind, cfg.include_failed, meta)
    with start_run(cfg, "eval-matrix") as run:
        run.save_json("matrix.json", m.to_json())
        lines = [",".join(["model"] + [json.dumps(i) if "," in i else i for i in m.items])]
        for p, row in zip(m.persons, m.values):
            lines.append(",".join([p] + ["" if math.isnan(v) else f"{v:g}" for v in row]))
        atomic_write(run.path / "matrix.csv", "\n".join(lines) + "\n")
        run.finish({"kind": m.kind, "models": m.persons, "n_items": len(m.items),
                    "missing": int(np.isnan(m.values).sum()),
                    "score_rate": {p: float(np.nanmean(r / k)) for p, r, k in zip(m.persons, m.values, m.K)}})
    return run.path


# ---------------------------------------------------------------------------------------------------------------
# tour


TAKER_SIZES = (64, 128)
"""Hidden widths of the tour's trained exam takers (tiny Llamas, 2 layers, heads of 32 dims)."""
TAKER_STEPS = (150, 400, 1000)
"""Training steps at which each taker is saved (one schedule of max(steps); earlier ones are its checkpoints)."""


def checkpoint_takers(sizes: tuple[int, ...] = TAKER_SIZES, steps: tuple[int, ...] = TAKER_STEPS, *,
                      schedule: int = max(TAKER_STEPS), domain: str = "math", layers: int = 2, seed: int = 0,
                      device: Any = "cpu", cache: str | Path | None = None, max_bytes: int = 1_000_000
                      ) -> dict[str, Path]:
    """Real exam takers of several sizes and training stages, for a Rasch population of actual models.

    Each size is one tiny Llama trained from scratch on the built-in ``domain`` corpus with the foundation loop
    (:func:`lmlab.core.pretrain.train`, batch 8 x 128 tokens, lr 3e-3, cosine over ``schedule`` steps); at every
    step in ``steps`` (<= schedule) the model is saved as an HF folder (with the reference tokenizer), so takers
    differ by size and by training stage. Everything is cached under ``<lmlab cache>/exam_takers`` (a saved
    checkpoint is never retrained; a killed run resumes from its last trainer checkpoint). Returns
    ``{name: folder}``, names like ``tiny-h64@400``; folders are valid exam MODEL specs."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmlab.core.corpus import cache_dir
    from lmlab.core.pretrain import OptimConfig, train
    from lmlab.core.runs import atomic_write
    from lmlab.core.zoo import _special_ids, reference_tokenizer, token_streams, tokenizer_hash

    steps = tuple(sorted(set(int(s) for s in steps)))
    if not steps or steps[0] < 1 or steps[-1] > schedule or not sizes or any(h < 32 or h % 32 for h in sizes):
        raise LmlabError(f"checkpoint takers: steps must be in [1, schedule={schedule}] and sizes multiples of 32, "
                         f"got {steps}, {sizes}")
    tok = reference_tokenizer()
    opt = OptimConfig(steps=schedule, batch_size=8, seq_len=128, lr=3e-3, warmup=50, eval_every=0,
                      save_every=100, log_every=10 ** 9)
    root = Path(cache) if cache else cache_dir() / "exam_takers"
    out: dict[str, Path] = {}
    ids = None
    for h in sizes:
        key = hashlib.sha256(json.dumps({"h": h, "layers": layers, "domain": domain, "seed": seed, "max_bytes":
                                         max_bytes, "tok": tokenizer_hash(tok), "opt": dataclasses.asdict(opt)},
                                        sort_keys=True).encode()).hexdigest()[:16]
        folder = root / f"h{h}-{key}"
        todo = [n for n in steps if not (folder / f"step{n}" / "config.json").is_file()]
        if todo:
            if ids is None:
                ids = token_streams(tok, domain, max_bytes, seed=seed)[0]
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers,
                              num_attention_heads=max(1, h // 32), num_key_value_heads=max(1, h // 32),
                              intermediate_size=4 * h, max_position_embeddings=512, tie_word_embeddings=True)
            for k, v in _special_ids(tok).items():
                setattr(cfg, k, v)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)
            for n in steps:  # resume=True: each call continues from the trainer checkpoint of the previous one
                st = train(model, ids, None, opt, seed=seed, ckpt_dir=folder / "checkpoint", resume=True,
                           stop_after=n, progress=False)
                if n in todo and st.step != n:  # the trainer checkpoint is past n (a step folder was removed)
                    log.warning("exam taker h%d: cannot rebuild step %d (trainer is at %d); skipped", h, n, st.step)
                elif n in todo:
                    tmp = folder / f".step{n}.tmp"
                    model.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
                    atomic_write(tmp / "taker.json", json.dumps({"hidden": h, "layers": layers, "step": n,
                                                                 "domain": domain, "seed": seed}))
                    tmp.rename(folder / f"step{n}")
                log.info("exam taker h%d: step %d saved", h, n)
        for n in steps:
            if (folder / f"step{n}" / "config.json").is_file():
                out[f"tiny-h{h}@{n}"] = folder / f"step{n}"
    return out


def simulated_takers(b: Any, seed: int = 0) -> dict[str, Any]:
    """Noisy simulated exam takers on items of difficulty b: Rasch-consistent at several abilities, one
    difficulty-invariant (p = 0.6 everywhere) and one flattened (σ(0.3 (θ - b))). Returns {name: 0/1 array}."""
    import numpy as np

    from lmlab.evaluate.irt import sigmoid

    rng = np.random.default_rng(seed)
    b = np.asarray(b, float)
    out = {f"sim:rasch(θ={t:+.1f})": (rng.random(len(b)) < sigmoid(t - b)).astype(float)
           for t in (-1.5, -0.5, 0.5, 1.5)}
    out["sim:invariant(p=.6)"] = (rng.random(len(b)) < 0.6).astype(float)
    out["sim:flattened(a=.3)"] = (rng.random(len(b)) < sigmoid(0.3 * (0.5 - b))).astype(float)
    return out


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Exam on the built-in math items with the reference models, tiny trained takers at several sizes and
    checkpoints (cached; quick: hidden 64 at steps 150/400, --full: hidden 64/128 at 150/400/1000) plus simulated
    takers -> Rasch (CML) fit -> Wright map, model characteristic curves and the D1/D2 detectors."""
    sizes, steps = (TAKER_SIZES, TAKER_STEPS) if cfg.full else (TAKER_SIZES[:1], TAKER_STEPS[:2])
    return tour_exam(cfg, out, taker_sizes=sizes, taker_steps=steps)


def tour_exam(cfg: Any, out: Path, taker_sizes: tuple[int, ...] = (), taker_steps: tuple[int, ...] = (),
              taker_schedule: int = max(TAKER_STEPS)) -> tuple[Path, str]:
    """The tour's exam + IRT section with an explicit trained-taker grid (:func:`checkpoint_takers`; empty: none)."""
    import numpy as np

    from lmlab.core import zoo
    from lmlab.core.runs import atomic_write, start_run
    from lmlab.core.runtime import setup
    from lmlab.evaluate import irt

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    n_items = 200 if cfg.full else 40
    items = builtin_math(n_items, seed=cfg.seed)
    specs = [f"ref:{n}" for n in ("dense", "mamba") if zoo.is_available(n)]
    ecfg = ExamConfig(items="builtin:math", model=specs or ["ref:dense"], max_new_tokens=48 if cfg.full else 16,
                      stop=["\n", "Q:"], batch_size=16, seed=cfg.seed)
    with start_run(RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads),
                   "tour-exam-irt", device=dev, dtype=dtype, threads=threads) as run:
        backends = [make_backend(s, ecfg, dev, dtype) for s in specs]
        t_train = time.time()
        takers = checkpoint_takers(taker_sizes, taker_steps, schedule=taker_schedule, seed=cfg.seed,
                                   device=dev) if taker_sizes and taker_steps else {}
        t_train = time.time() - t_train
        for name, path in takers.items():
            be = make_backend(str(path), ecfg, dev, dtype)
            be.name = name
            backends.append(be)
        t0 = time.time()
        rows = run_exam(items, backends, ecfg)
        wall = time.time() - t0
        hard = np.array([it["difficulty"] for it in items])
        b_true = hard - hard.mean()  # the built-in difficulty is read as logits (steps ~ 1 logit each)
        for name, x in simulated_takers(b_true, cfg.seed).items():
            for it, xi in zip(items, x):
                rows.append({"model": name, "item_id": it["id"], "sample": 0, "subject": "math", "type": "fill_blank",
                             "score": float(xi), "max_score": 1.0, "full_credit": bool(xi), "failed": False,
                             "simulated": True, "tokens": {}})
        run.write_samples(rows)
        meta = {it["id"]: {"difficulty": it["difficulty"], "subject": it["subject"], "type": it.get("kind")}
                for it in items}
        m = build_matrix(rows, "binary", item_meta=meta)
        run.save_json("matrix.json", m.to_json())
        fit = irt.fit_matrix(m, "cml")
        run.save_json("irt.json", fit)
        irt.wright_map(run.plots / "wright_map.png", fit["persons"],
                       [{**i, "type": meta[i["id"]]["type"]} for i in fit["items"]],
                       title="Wright map: reference models + simulated takers, built-in math exam")
        sources = {"human": irt.difficulty_source("human", m, m.values, m.K),
                   "irt": irt.difficulty_source("irt", m, m.values, m.K)}
        n_null = 200 if cfg.full else 60
        sources["human"] = sources["human"] - np.nanmean(sources["human"])
        diag = irt.diagnose(m, sources, 1.0, n_boot=200 if cfg.full else 60, n_null=n_null, seed=cfg.seed,
                            calibrate=False)
        run.save_json("diagnose.json", diag)
        b = np.asarray(diag["sources"]["human"]["b"], float)
        curves = [(p, m.values[v], diag["sources"]["human"]["d1"][p]["theta_wle"], diag["sources"]["human"]["d1"][p])
                  for v, p in enumerate(m.persons)]
        irt.mcc_plot(run.plots / "model_curves_human.png", curves, b)
        atomic_write(run.path / "report.md", irt.report_text(fit, diag))
        summ = summarize([r for r in rows if not r.get("simulated")])
        d1 = diag["sources"]["human"]["d1"]
        results = {"items": n_items, "exam_items_per_s": round(len(items) * len(backends) / max(wall, 1e-9), 2),
                   "takers": {k: str(v) for k, v in takers.items()}, "taker_train_seconds": round(t_train, 1),
                   "models": {k: {"rate": v["rate"]} for k, v in summ.items()},
                   "fit": {"n_items": fit["n_items"], "dropped": {k: len(v) for k, v in fit["dropped"].items()},
                           "reliability": fit["reliability"],
                           "theta": {p["id"]: round(p["theta"], 3) for p in fit["persons"]}},
                   "d1_human": {p: {"label": d["label"], "a": round(d["a"], 3), "spearman": round(d["spearman"], 3),
                                    "r2": round(d["r2"], 3)} for p, d in d1.items()},
                   "r2_pooled": {s: r["r2_pooled"] for s, r in diag["sources"].items()},
                   "d2_phi": {s: r["d2"]["phi_overall"] for s, r in diag["sources"].items()},
                   "source_correlations": diag["source_correlations"]}
        run.finish(results)
    lines = [f"Built-in math exam: {n_items} fill-in items; reference models {', '.join(specs) or '(none built)'} "
             f"+ {len(takers)} trained takers (sizes x checkpoints, cached) + 6 simulated takers; "
             f"CML Rasch on {fit['n_items']} non-extreme items "
             f"({sum(len(v) for v in fit['dropped'].values())} extreme dropped)."]
    for k, v in summ.items():
        lines.append(f"{k}: score rate {v['rate']:.3f}, θ = {results['fit']['theta'].get(k, float('nan')):+.2f}")
    lines.append("D1 (difficulty = steps+digits): " + "; ".join(
        f"{p}: {d['label']} (a={d['a']:.2f})" for p, d in d1.items()))
    lines.append(f"Pooled R² (paper's metric): human {results['r2_pooled']['human']:.3f}, irt "
                 f"{results['r2_pooled']['irt']:.3f}; D2 φ: human {results['d2_phi']['human']:.2f}")
    return run.path, "\n".join(lines)
