"""The generate/filter pipeline against a real OpenAI-compatible HTTP server on 127.0.0.1; bad inputs; resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmlab.data.comments import (
    DensityConfig,
    GenerateConfig,
    OpenAICommenter,
    density_main,
    generate_main,
    read_jsonl_dir,
)


class _Handler(BaseHTTPRequestHandler):
    """/v1/chat/completions: 'comments' the code it is sent (prepends one comment line), with failure modes
    selected by a marker in the code: GARBAGE (non-JSON 200), SLOW (sleeps past the client timeout), FLAKY (500
    on the first request), DATA (refuses: SKIP), BREAK (changes the code), NAIVE (inserts '#' lines everywhere,
    also inside a multi-line string)."""

    def log_message(self, *a):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append(body)
        assert self.path == "/v1/chat/completions"
        msg = body["messages"][-1]["content"]
        code = re.search(r"```python\n(.*)\n```", msg, re.S).group(1)
        if "SLOW" in code:
            time.sleep(1.5)
        if "FLAKY" in code and srv.flaky_left > 0:
            srv.flaky_left -= 1
            return self._send(500, b'{"error": "overloaded"}')
        if "GARBAGE" in code:
            return self._send(200, b"<html>this is not json</html>")
        if "DATA" in code:
            content = "SKIP"
        elif "NAIVE" in code:  # a naive commenter: a comment line before every line, inside strings too
            content = "```python\n" + "".join(f"# step\n{ln}\n" for ln in code.split("\n")) + "```"
        elif "BREAK" in code:
            content = "```python\n# changed\n" + code.replace("+ 1", "- 1") + "\n```"
        else:
            content = "Here you go:\n```python\n# Module comment written by the server.\n" + code + "\n```"
        out = {"id": "x", "object": "chat.completion", "model": body["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop"}]}
        self._send(200, json.dumps(out).encode())

    def _send(self, code: int, data: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.flaky_left = [], 1
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _inputs(root: Path) -> Path:
    d = root / "in"
    d.mkdir()
    files = {
        "good.py": "def f(x):\n    return x + 1\n",
        "flaky.py": "FLAKY = 1\n\n\ndef g(y):\n    return y * 2\n",
        "garbage.py": "GARBAGE = 2\n",
        "slow.py": "SLOW = 3\n",
        "data.py": "DATA = [1, 2, 3, 4]\n",
        "break.py": "BREAK = 0\n\n\ndef h(x):\n    return x + 1\n",
        "commented.py": '"""A module that is already well documented."""\n# and commented\nX = 1\n',
        "broken.py": "def (:\n",
        "sql.py": 'NAIVE = """\nselect a\nfrom t\n"""\n',
    }
    for n, t in files.items():
        (d / n).write_text(t)
    (d / "blob.py").write_bytes(b"\x00\x01\x02binary")
    (d / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (d / "huge.py").write_text("x = 1\n" * 2000)
    return d


def test_generate_with_real_http_server_records_every_failure(server, tmp_path):
    srv, url = server
    d = _inputs(tmp_path)
    cfg = GenerateConfig(input=[str(d)], backend="openai", endpoint=url, model="test-model", out=str(tmp_path / "r1"),
                         timeout=0.5, retries=1, max_density=0.3, max_file_bytes=4000, concurrency=4)
    run = generate_main(cfg)
    res = json.loads((run / "results.json").read_text())
    acc = {r["id"]: r for r in read_jsonl_dir(run / "accepted")}
    exc = {r["id"]: r["metadata"]["filter_reason"] for r in read_jsonl_dir(run / "excluded")}
    inp = {r["id"]: r["metadata"]["filter_reason"] for r in read_jsonl_dir(run / "excluded_input")}
    assert set(acc) == {"good.py", "flaky.py", "commented.py"}
    assert acc["good.py"]["text"].startswith("# Module comment written by the server.\ndef f(x)")
    assert acc["good.py"]["metadata"]["comment_density"] > acc["good.py"]["metadata"]["density_before"] == 0
    assert acc["commented.py"]["metadata"]["augmented"] is False  # above max_density: passed through
    assert exc == {"garbage.py": "augment_garbage", "slow.py": "augment_timeout", "data.py": "augment_refused",
                   "break.py": "code_changed", "sql.py": "code_changed"}
    assert inp == {"blob.py": "binary", "latin.py": "non_utf8", "huge.py": "too_large", "broken.py": "unparsable"}
    # nothing lost: every input file is in exactly one output file
    assert len(acc) + len(exc) + len(inp) == len(list(d.iterdir()))
    assert res["reasons"]["code_changed"] == 2 and res["accepted_augmented"] == 2
    assert all(r["model"] == "test-model" for r in srv.requests)
    n_first = len(srv.requests)
    assert n_first == 9  # 7 files + one retry each for FLAKY (500) and SLOW (timeout); garbage is not retried
    # a second run with the same cache sends requests only for replies that were not cached (failures)
    cfg2 = GenerateConfig(**{**cfg.__dict__, "out": str(tmp_path / "r2"), "cache_dir": str(run / "cache")})
    run2 = generate_main(cfg2)
    assert {r["id"] for r in read_jsonl_dir(run2 / "accepted")} == set(acc)
    assert len(srv.requests) - n_first == 3  # garbage once, slow twice; the other replies come from the cache


def test_openai_commenter_direct_and_bad_endpoint(server, tmp_path):
    srv, url = server
    c = OpenAICommenter(url, model="m", cache_dir=tmp_path / "c", retries=0, timeout=5)
    r = c.comment(["def f():\n    return 1\n"], ["python"])[0]
    assert r.error == "" and r.text.startswith("# Module comment") and not r.cached
    assert c.comment(["def f():\n    return 1\n"], ["python"])[0].cached
    dead = OpenAICommenter("http://127.0.0.1:9/v1", retries=1, timeout=1, backoff=0.01)
    assert dead.comment(["x = 1\n"], ["python"])[0].error == "connection"
    from lmlab.config import ConfigError

    with pytest.raises(ConfigError):
        OpenAICommenter("127.0.0.1:8000")


def test_density_command_bad_inputs_and_histogram(tmp_path):
    d = _inputs(tmp_path)
    run = density_main(DensityConfig(input=[str(d)], out=str(tmp_path / "dens"), max_file_bytes=4000, tasks=2))
    res = json.loads((run / "results.json").read_text())
    assert res["read_errors"] == {"binary": 1, "non_utf8": 1, "too_large": 1}
    assert res["unparsable"] == 1
    assert res["languages"]["python"]["files"] == 8
    assert (run / "plots" / "density_hist.png").stat().st_size > 1000
    assert (run / "logs" / "completions" / "00000").exists() and (run / "logs" / "completions" / "00001").exists()


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from datatrove.pipeline.base import PipelineStep
    from lmlab.data.comments import DensityAnnotator, ReadErrorFilter, SourceReader, run_pipeline, writer

    src, out, marker = sys.argv[1], sys.argv[2], sys.argv[3]

    class KillOnce(PipelineStep):
        """SIGKILLs the job (its process group: this process and datatrove's manager process) the first time it
        sees file 'kill_me.py' - a real crash mid-task, as when a scheduler kills a job."""
        name = "kill once"
        def run(self, data, rank=0, world_size=1):
            for doc in data:
                if doc.id == "kill_me.py" and not os.path.exists(marker):
                    open(marker, "w").close()
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                yield doc

    run_pipeline([SourceReader([src]), ReadErrorFilter(), DensityAnnotator(), KillOnce(), writer(out + "/docs")],
                 out + "/logs", tasks=4, workers=1)
''')


def test_killed_pipeline_resumes_without_duplicates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [f"f{i:02d}.py" for i in range(11)] + ["kill_me.py"]
    for n in names:
        (src / n).write_text(f"# {n}\nx = {len(n)}\n")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out, marker = tmp_path / "out", tmp_path / "killed"
    args = [sys.executable, str(script), str(src), str(out), str(marker)]
    p1 = subprocess.run(args, capture_output=True, timeout=120, start_new_session=True)
    assert p1.returncode == -signal.SIGKILL and marker.exists()
    done_before = sorted(f.name for f in (out / "logs" / "completions").iterdir())
    assert 0 < len(done_before) < 4  # killed mid-way: some ranks complete, the crashed one not
    p2 = subprocess.run(args, capture_output=True, timeout=120, start_new_session=True)
    assert p2.returncode == 0, p2.stderr.decode()[-2000:]
    assert sorted(f.name for f in (out / "logs" / "completions").iterdir()) == ["00000", "00001", "00002", "00003"]
    ids = [r["id"] for r in read_jsonl_dir(out / "docs")]
    assert sorted(ids) == sorted(names)  # each document exactly once
    assert b"Skipping" in p2.stderr  # completed ranks were not redone


def test_generate_then_separate_filter_step(server, tmp_path):
    from lmlab.data.comments import FilterConfig, filter_main

    srv, url = server
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.py").write_text("def f(x):\n    return x + 1\n")
    (d / "bad.py").write_text("BREAK = 1\nx = 1 + 1\n")
    run = generate_main(GenerateConfig(input=[str(d)], backend="openai", endpoint=url, filter=False,
                                       out=str(tmp_path / "gen"), max_density=0.5))
    aug = {r["id"]: r for r in read_jsonl_dir(run / "augmented")}
    assert set(aug) == {"ok.py", "bad.py"} and all(r["metadata"]["augmented"] for r in aug.values())
    frun = filter_main(FilterConfig(input=[str(run / "augmented")], out=str(tmp_path / "filt")))
    acc = [r["id"] for r in read_jsonl_dir(frun / "accepted")]
    exc = {r["id"]: r["metadata"]["filter_reason"] for r in read_jsonl_dir(frun / "excluded")}
    assert acc == ["ok.py"] and exc == {"bad.py": "code_changed"}
