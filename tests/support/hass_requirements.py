"""Run inside Home Assistant's environment: print the Python requirements of the integrations a
start loads (its defaults, and MQTT), with their dependencies, one a line."""

from __future__ import annotations

import json
from pathlib import Path

import homeassistant
from homeassistant import bootstrap

COMPONENTS = Path(homeassistant.__file__).parent / "components"
WANTED = {"mqtt", "api", "http"}


def main() -> None:
    todo = set(bootstrap.DEFAULT_INTEGRATIONS) | set(bootstrap.CORE_INTEGRATIONS) | WANTED
    for _, stage, _ in bootstrap.STAGE_0_INTEGRATIONS:
        todo |= set(stage)
    seen: set[str] = set()
    requirements: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        manifest = COMPONENTS / name / "manifest.json"
        if not manifest.exists():
            continue
        data = json.loads(manifest.read_text())
        requirements.update(data.get("requirements", []))
        todo.update(data.get("dependencies", []))
    print("\n".join(sorted(requirements)))


if __name__ == "__main__":
    main()
