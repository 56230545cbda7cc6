"""Run directories: the output contract every command follows.

```
runs/<name>/ config.yaml meta.json metrics.jsonl results.json
             *.safetensors (+ same-stem .json)   plots/*.png   samples.jsonl   report.html
```

* ``config.yaml`` is the resolved config (rerun with ``-c runs/<name>/config.yaml``).
* ``meta.json`` records versions, git sha, argv, device, dtype, seed, threads, start/end time and ``status``
  (``running`` -> ``complete`` | ``failed``).
* ``results.json`` is written last, atomically: a run dir without it (or whose status is not ``complete``) is
  not a finished run.
* Every file write goes through :func:`atomic_write` (temp file in the same folder + ``os.replace``).

Use :func:`start_run` as a context manager in a command's ``main``::

    with start_run(cfg, "zoo-train") as run:
        run.log({"step": 1, "loss": 2.3})
        run.save_tensors("weights", {"w": w}, {"note": "..."})
        run.finish({"val_loss": 2.1})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmlab.config import dump_yaml
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


class RunError(LmlabError):
    """A problem with the run directory itself (unwritable, already complete ...)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed onto ``path``, else removed.

    Use it for writers that want a file name (``safetensors.save_file``, ``np.save``):
    ``with atomic_path(p) as tmp: save_file(t, tmp)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file + rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Atomically save ``{name: tensor}`` as safetensors plus a same-stem ``.json`` sidecar with ``meta``."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":  # append, don't replace: "blocks.0.hook_resid_post" keeps its dots
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp))
    if meta is not None:
        write_json(path.with_suffix(".json"), meta)
    return path


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def git_sha() -> str | None:
    """The lmlab checkout's commit, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("lmlab", "torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def default_run_name(command: str) -> str:
    return f"{command.replace(' ', '-')}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RunDir:
    """A run directory following the output contract. Create with :func:`start_run`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        self._t0 = time.time()

    # -- paths ---------------------------------------------------------------------------------------------
    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # -- writes --------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (a line is written whole, then flushed)."""
        line = json.dumps({**record, "time": round(time.time() - self._t0, 3)}, default=_json_default)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()

    def write_samples(self, rows: Iterable[dict[str, Any]], name: str = "samples.jsonl") -> Path:
        text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in rows)
        return atomic_write(self.path / name, text)

    def save_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def save_tensors(self, name: str, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        return save_tensors(self.path / name, tensors, meta)

    def update_meta(self, **kv: Any) -> None:
        self.meta.update(kv)
        write_json(self.path / "meta.json", self.meta)

    def finish(self, results: dict[str, Any]) -> Path:
        """Write results.json (the completion marker) and mark the run complete."""
        p = write_json(self.path / "results.json", results)
        self.update_meta(status="complete", end_time=_now(), wall_seconds=round(time.time() - self._t0, 3))
        return p

    @property
    def complete(self) -> bool:
        return (self.path / "results.json").is_file() and self.meta.get("status") == "complete"


def _check_writable(path: Path) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"cannot write run directory {path}: {probe} is not a writable directory")


def check_out(path: str | Path) -> None:
    """Raise :class:`RunError` unless ``path`` can become a new run dir (writable, not already complete).

    ``start_run`` checks this; the CLI also calls it before a command starts any work, so a bad ``--out``
    fails at once instead of after loading models or building a corpus."""
    path = Path(path)
    _check_writable(path)
    if (path / "results.json").exists():
        raise RunError(f"{path} already holds a complete run; pass a new --out")


@contextlib.contextmanager
def start_run(cfg: Any, command: str, *, device: Any = None, dtype: Any = None, threads: int | None = None,
              extra_meta: dict[str, Any] | None = None) -> Iterator[RunDir]:
    """Create the run dir, write config.yaml + meta.json, and close it as complete/failed.

    ``cfg.out`` (if set) is the directory, else ``runs/<command>-<time>``. An existing *complete* run dir is
    refused (no silent overwrite); an existing incomplete one is reused so long jobs can resume in place.
    On an exception the run is marked ``failed``; if it produced nothing beyond config/meta, the directory is
    removed so no half-made run is left behind.
    """
    out = getattr(cfg, "out", None)
    path = Path(out) if out else Path("runs") / default_run_name(command)
    check_out(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run directory {path}: {e.strerror}") from None
    run = RunDir(path)
    try:
        atomic_write(path / "config.yaml", dump_yaml(cfg))
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    run.meta = {
        "command": command,
        "status": "running",
        "argv": sys.argv,
        "versions": versions(),
        "git_sha": git_sha(),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": str(device) if device is not None else getattr(cfg, "device", None),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else getattr(cfg, "dtype", None),
        "seed": getattr(cfg, "seed", None),
        "threads": threads if threads is not None else getattr(cfg, "threads", None),
        "start_time": _now(),
        **(extra_meta or {}),
    }
    write_json(path / "meta.json", run.meta)
    try:
        yield run
    except BaseException as e:
        leftovers = {p.name for p in path.iterdir()} - {"config.yaml", "meta.json", "metrics.jsonl"}
        if created and not leftovers:
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # never mask the original error
                run.update_meta(status="failed", error=f"{type(e).__name__}: {e}", end_time=_now())
        raise
    if not run.complete:
        run.finish({})
    log.info("run written to %s", path)
