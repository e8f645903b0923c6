"""The one exception hierarchy of daisee-node."""

from __future__ import annotations

from dataclasses import dataclass


class DaiseeError(Exception):
    """Base of every error daisee-node raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file: where (a TOML path such as `sensors[1].interval_s`) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(DaiseeError):
    """A config file that cannot be used; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: {len(self.problems)} problem(s)"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class NodeLockedError(DaiseeError):
    """Another daemon already runs on the same data directory."""
