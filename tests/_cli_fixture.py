"""A throwaway CLI leaf for tests/test_cli.py: a small config and a ``main`` that follows the run contract."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.config import RunArgs, to_dict
from lmlab.core.runs import start_run


@dataclass
class Section:
    k: int = 2
    """Nested value (override only: section.k=...)."""


@dataclass
class FixtureConfig(RunArgs):
    name: str = "anon"
    """Positional name."""
    lr: float = 1e-3
    """Learning rate."""
    max_steps: int = 3
    """Steps (flag --max-steps)."""
    use_bias: bool = True
    """A boolean switch (--use-bias/--no-use-bias)."""
    tags: list[str] = field(default_factory=lambda: ["a"])
    """Tags."""
    section: Section = field(default_factory=Section)
    """A nested section."""


@dataclass
class ListConfig(RunArgs):
    runs: list[str] = field(default_factory=list)
    """Run directories (positional, any number)."""


def main(cfg: FixtureConfig):
    with start_run(cfg, "fixture") as run:
        run.log({"step": 0})
        run.finish({"cfg": to_dict(cfg)})
    return run.path


def list_main(cfg: ListConfig) -> str:
    return "|".join(cfg.runs)
