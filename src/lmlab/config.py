"""Dataclass configs: the single source of truth for every command.

A run's config is resolved as ``defaults -> -c file.yaml -> key.sub=value overrides``:

>>> cfg = resolve(MyConfig, "paper.yaml", ["lr=3e-4", "sae.k=64"])

* Defaults are the dataclass defaults; nested dataclasses are built recursively.
* Values from the command line are parsed with ``yaml.safe_load`` so ``1e-3``, ``true``, ``[0, 1]`` just work.
* An unknown key is an error that lists the valid keys (``ConfigError``).
* Each field's documentation is the string literal right below it (an *attribute docstring*, as in
  sparsify/litgpt); :func:`field_docs` reads it from the source, and it becomes ``--help`` and the comments in
  ``lmlab config show``.

This module imports only the standard library and PyYAML, so ``lmlab --help`` stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError


class ConfigError(LmlabError, ValueError):
    """A config file or override that cannot be applied (one clear line for the CLI)."""


@dataclasses.dataclass
class RunArgs:
    """Fields every command shares (the CLI exposes them as ``--out``, ``--device`` ...)."""

    out: str | None = None
    """Run directory; default ``runs/<command>-<YYYYmmdd-HHMMSS>``."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that support it, else fp32)."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    threads: int | None = None
    """torch intra-op threads (default: leave torch's choice)."""

    def __post_init__(self) -> None:
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device must be auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


# ----------------------------------------------------------------------------------------------------
# field documentation


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its dataclass bases): ``{field: first paragraph}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:]):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg  # type: ignore[return-value]
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Light type coercion for YAML scalars: int -> float, str paths, tuples from lists."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:  # first type that accepts the value wins
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot use {value!r} as {tp}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is int and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is int and not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple) and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        return tuple(value)
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _allows_none(tp: Any) -> bool:
    if tp is Any or tp is type(None):
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly nested) dict; unknown keys raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__name__} has no field {', '.join(repr(prefix + k) for k in unknown)}; "
            f"valid: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = _dataclass_type(tp)
        if sub is not None and isinstance(value, dict):
            # a partial section overrides the field's own default (its default_factory), not the class defaults
            f = fields[name]
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(base):
                value = {**to_dict(base), **value}
            kwargs[name] = from_dict(sub, value, prefix=f"{prefix}{name}.")
        elif value is None and not _allows_none(tp) and fields[name].default is not None:
            raise ConfigError(f"{prefix}{name}: expected {getattr(tp, '__name__', tp)}, got null")
        elif sub is not None and not isinstance(value, sub) and value is not None:
            raise ConfigError(f"{prefix}{name}: is a section (set {prefix}{name}.KEY=...), got {value!r}")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) ready for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
        d = nxt
    d[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001)``; values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML syntax the user did not mean: "note=#1" (a comment -> null), "prompt=Q: x" (a mapping) stay text
    if (value is None and raw.strip() not in ("null", "Null", "NULL", "~")) or (
        isinstance(value, dict) and not raw.lstrip().startswith("{")
    ):
        value = raw
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a one-line error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not a UTF-8 text file: {e.reason} at byte {e.start}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML in {p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def resolve(cls: type, file: str | Path | None = None, overrides: list[str] | None = None,
            extra: dict[str, Any] | None = None) -> Any:
    """defaults -> YAML file -> ``extra`` (parsed CLI flags) -> ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if file:
        data = load_yaml(file)
    for k, v in (extra or {}).items():
        _set_path(data, k, v)
    for text in overrides or []:
        k, v = parse_override(text)
        _set_path(data, k, v)
    return from_dict(cls, data)


def dump_yaml(cfg: Any, with_docs: bool = False) -> str:
    """YAML of a config; with ``with_docs`` each field is preceded by its docstring as a comment."""
    if not with_docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)

    def emit(obj: Any, indent: int) -> list[str]:
        docs = field_docs(type(obj))
        lines: list[str] = []
        pad = " " * indent
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name in docs:
                lines.append(f"{pad}# {docs[f.name]}")
            if dataclasses.is_dataclass(v) and not dataclasses.fields(v):
                lines.append(f"{pad}{f.name}: {{}}")
            elif dataclasses.is_dataclass(v):
                lines.append(f"{pad}{f.name}:")
                lines.extend(emit(v, indent + 2))
            else:
                val = to_dict(v)
                # flow style only inside collections ("tags: [a, b]"); a scalar here stays block style, else
                # PyYAML writes "{seed: 0}" and the concatenated lines no longer parse as one mapping
                flow = None if isinstance(val, list | dict) else False
                text = yaml.safe_dump({f.name: val}, sort_keys=False, default_flow_style=flow).rstrip()
                lines.extend(pad + ln for ln in text.splitlines())
        return lines

    return "\n".join(emit(cfg, 0)) + "\n"
