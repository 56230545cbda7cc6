"""The sandbox for model-generated code: real subprocesses, a real listening socket, real files."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lmlab.data.sandbox import netns_flags, pass_at_k, program_for, run_sandboxed


def test_infinite_loop_is_killed():
    t0 = time.perf_counter()
    r = run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 10
    r = run_sandboxed("import time\nwhile True:\n    time.sleep(0.05)\n", timeout=1.0)  # not CPU-bound
    assert r.status == "timeout"


@pytest.fixture
def listener():
    """A real TCP server on 127.0.0.1 that counts the connections it accepts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_network_call_is_blocked(listener):
    port, hits = listener
    probe = socket.create_connection(("127.0.0.1", port))  # the listener works from outside the sandbox
    probe.close()
    time.sleep(0.3)
    assert hits == [1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    for netns in (True, False):  # namespace + audit hook, and the audit hook alone
        r = run_sandboxed(code, timeout=5, network_namespace=netns)
        assert r.status == "failed" and "connected" not in r.stdout
        assert "network access blocked" in r.stderr
    urllib_code = f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n"
    assert run_sandboxed(urllib_code, timeout=5).status == "failed"
    time.sleep(0.3)
    assert hits == [1]  # no connection ever arrived from the sandbox


def test_network_namespace_has_no_interfaces_but_lo():
    if not netns_flags():
        pytest.skip("network namespaces are not available on this machine (the audit hook still blocks)")
    code = "print(sorted(ln.split(':')[0].strip() for ln in open('/proc/self/net/dev').readlines()[2:]))\n"
    r = run_sandboxed(code, timeout=5)  # /proc/self/net is per network namespace
    assert r.passed, r.stderr
    assert r.stdout.strip() == "['lo']"
    assert "netns" in r.mechanisms


def test_write_outside_tempdir_is_blocked(tmp_path):
    target = tmp_path / "escape.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    r = run_sandboxed(f"open({str(target)!r}, 'w').write('x')\n", timeout=5)
    assert r.status == "failed" and "outside the sandbox" in r.stderr
    assert not target.exists()
    r = run_sandboxed(f"import os\nos.remove({str(keep)!r})\n", timeout=5)
    assert r.status == "failed" and keep.read_text() == "precious"
    r = run_sandboxed(f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n", timeout=5)
    assert r.status == "failed" and not target.exists()
    r = run_sandboxed("import subprocess\nsubprocess.run(['touch', '/tmp/x'])\n", timeout=5)
    assert r.status == "failed" and "blocked" in r.stderr
    # inside its own temp dir (the cwd) it may write and read
    r = run_sandboxed("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n", timeout=5)
    assert r.passed and r.stdout.strip() == "ok"


def test_memory_limit():
    r = run_sandboxed("x = bytearray(3 * 1024 ** 3)\n", timeout=5, memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.stderr


PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
           "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n", "entry_point": "add"}
MBPP = {"task_id": 1, "text": "Write a function to square a number.", "code": "def sq(x):\n    return x * x\n",
        "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"], "test_setup_code": ""}


def test_humaneval_and_mbpp_programs_pass_and_fail():
    assert run_sandboxed(program_for(PROBLEM, "    return a + b\n")).passed
    assert not run_sandboxed(program_for(PROBLEM, "    return a - b\n")).passed
    assert run_sandboxed(program_for(MBPP, MBPP["code"])).passed
    assert not run_sandboxed(program_for(MBPP, "def sq(x):\n    return x + x\n")).passed


def test_pass_at_k_estimator():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)
