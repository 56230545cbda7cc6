"""Policy: KV-cached batched expansion (same text as the uncached path, exact token counts), completion-only SFT,
the OpenAI-compatible backend against a real HTTP server, and the end-to-end commands on tiny settings."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.reason.policy import (
    CharTokenizer,
    LMPolicy,
    OpenAIPolicy,
    ScriptedPolicy,
    encode_pairs,
    rollout,
    sft,
    tiny_gpt,
)
from lmlab.reason.tasks import ColumnAdd


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer()
    return tiny_gpt(len(tok), d_model=32, n_head=2).eval(), tok


def test_kv_cache_matches_uncached_and_counts_tokens(tiny):
    model, tok = tiny
    pol = LMPolicy(model, tok)
    prefixes = ["Q12+34:", "Q123+456:01", "Q1+2:"]  # different lengths -> separate groups
    a = pol.expand(prefixes, 2, stop="|", max_new_tokens=6, temperature=0.0)
    slow = LMPolicy(model, tok)
    slow.use_cache = False
    b = slow.expand(prefixes, 2, stop="|", max_new_tokens=6, temperature=0.0)
    assert [[e.text for e in r] for r in a] == [[e.text for e in r] for r in b]
    assert [e.logprob for r in a for e in r] == pytest.approx([e.logprob for r in b for e in r], abs=1e-4)
    assert pol.tokens_generated == sum(len(tok.encode(e.text)) for r in a for e in r)
    for r in a:
        for e in r:
            assert e.n_tokens == len(e.text) and (e.text.endswith("|") == e.finished)
    with pytest.raises(LmlabError):
        pol.expand(prefixes, 0)


def test_sft_masks_the_prompt_and_learns(tiny):
    model, tok = tiny
    ids, labels = encode_pairs(tok, ["Q1+2:", "Q10+20:"], ["003|", "003|030|"])
    assert (labels[0, :5] == -100).all() and labels[0, 5:9].tolist() == tok.encode("003|")
    assert (labels[0, 9:] == -100).all() and ids.shape == (2, 15)
    task = ColumnAdd(1)
    probs = task.sample(400, random.Random(0))
    prompts = [p.prompt for p in probs]
    comps = ["".join(task.solution(p)) for p in probs]
    losses = sft(model, tok, prompts, comps, steps=60, batch_size=64, lr=1e-2, warmup=5, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(LmlabError):
        sft(model, tok, [], [], steps=1)


def test_rollout_reaches_terminal_states():
    task = ColumnAdd(5)
    probs = task.sample(10, random.Random(0))
    pol = ScriptedPolicy(5, q_sys=0.0, q_rand=0.0)
    out = rollout(pol, task, probs, [task.solution(p)[:2] for p in probs], 3)
    assert all(len(c) == 3 and task.check(p, task.solution(p)[:2] + c) for p, row in zip(probs, out) for c in row)


class _Handler(BaseHTTPRequestHandler):
    policy = ScriptedPolicy(4, q_sys=0.0, q_rand=0.0)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        exps = self.policy.expand(body["prompt"], body["n"], body["stop"][0], body["max_tokens"],
                                  body["temperature"])
        choices = []
        for i, row in enumerate(exps):
            for j, e in enumerate(row):
                text = e.text[:-1] if e.text.endswith(body["stop"][0]) else e.text  # servers strip the stop
                choices.append({"index": i * body["n"] + j, "text": text, "finish_reason": "stop",
                                "logprobs": {"token_logprobs": [-0.1] * e.n_tokens}})
        data = json.dumps({"choices": choices, "usage": {"completion_tokens": sum(e.n_tokens for r in exps
                                                                                  for e in r)}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_backend_against_a_real_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        pol = OpenAIPolicy(f"http://127.0.0.1:{srv.server_address[1]}")
        task = ColumnAdd(4)
        probs = task.sample(5, random.Random(0))
        out = pol.expand([p.prompt for p in probs], 2, "|", 8, 1.0)
        assert all(e.text == task.solution(p)[0] and e.n_tokens == 4 for p, r in zip(probs, out) for e in r)
        sols = rollout(pol, task, probs, [[] for _ in probs], 1)
        assert all(task.check(p, s[0]) for p, s in zip(probs, sols))
        assert pol.tokens_generated == 5 * 2 * 4 + 5 * 4 * 4
    finally:
        srv.shutdown()
    with pytest.raises(LmlabError, match="completion server"):
        OpenAIPolicy("http://127.0.0.1:9", timeout=2).expand(["Q1+2:"], 1)
