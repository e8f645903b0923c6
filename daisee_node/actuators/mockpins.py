"""gpiozero mock pins whose level outlives the process, as a real GPIO line's does.

gpiozero's MockFactory keeps pin states in memory: enough inside one process, not to check what a
relay looks like after `kill -9` and `daisee-node safe-state` from a fresh process. These pins
keep each output level in `<dir>/<pin>` and append every change to `<dir>/<pin>.log`
(`<unix time> <0|1>` lines), while staying gpiozero's own MockPin in everything else.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin


class PersistentMockPin(MockPin):
    """A MockPin that reloads its last output level and records every change on disk."""

    state_dir: Path = Path(".")

    def __init__(self, factory: Any, info: Any) -> None:
        super().__init__(factory, info)
        self._file = self.state_dir / info.name
        with contextlib.suppress(OSError):
            self._state = self._file.read_text().strip() == "1"

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed and self._function == "output":
            self._persist(value)
        return changed

    def _persist(self, value: bool) -> None:
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text("1" if value else "0")
        os.replace(tmp, self._file)
        with open(f"{self._file}.log", "a") as log:
            log.write(f"{time.time():.6f} {int(value)}\n")

    def close(self) -> None:
        # Releasing the line must not count as driving it low: the level stays as it was.
        self.when_changed = None
        self._function = "input"


def persistent_mock_factory(state_dir: Path) -> MockFactory:
    """A MockFactory whose pins keep their levels under `state_dir`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    pin_class = type("PersistentMockPinIn", (PersistentMockPin,), {"state_dir": state_dir})
    return MockFactory(pin_class=pin_class)


def pin_history(state_dir: Path, pin: int | str) -> list[tuple[float, bool]]:
    """Every level a mock pin was driven to, across processes: [(unix time, high?)]."""
    name = f"GPIO{pin}" if isinstance(pin, int) else pin
    try:
        lines = (state_dir / f"{name}.log").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        t, level = line.split()
        out.append((float(t), level == "1"))
    return out


def pin_level(state_dir: Path, pin: int | str) -> bool | None:
    """The level a mock pin holds now, or None if it was never driven."""
    name = f"GPIO{pin}" if isinstance(pin, int) else pin
    try:
        return (state_dir / name).read_text().strip() == "1"
    except OSError:
        return None
