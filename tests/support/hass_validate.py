"""Run inside Home Assistant's environment: read `[[component, payload], ...]` as JSON on stdin,
put each payload through the MQTT integration's own discovery schema, print the results as JSON.

Abbreviations are expanded as Home Assistant does; keys the schema would silently remove are
reported as `dropped`, since a dropped key is a setting Home Assistant never sees."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import tempfile
from typing import Any

import voluptuous as vol
from homeassistant.components.mqtt.abbreviations import ABBREVIATIONS, DEVICE_ABBREVIATIONS
from homeassistant.components.mqtt.schemas import MQTT_ORIGIN_INFO_SCHEMA


def plain(value: Any) -> Any:
    """What the schema made of a value, as JSON (templates by their text)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    template = getattr(value, "template", None)
    return template if isinstance(template, str) else str(value)


def check(component: str, payload: dict[str, Any]) -> dict[str, Any]:
    config = {ABBREVIATIONS.get(k, k): v for k, v in payload.items()}
    if isinstance(config.get("device"), dict):
        config["device"] = {DEVICE_ABBREVIATIONS.get(k, k): v for k, v in config["device"].items()}
    result: dict[str, Any] = {"errors": [], "dropped": [], "config": None}
    try:
        if "origin" in config:
            MQTT_ORIGIN_INFO_SCHEMA(config["origin"])
        module = importlib.import_module(f"homeassistant.components.mqtt.{component}")
        validated = module.DISCOVERY_SCHEMA(dict(config))
    except vol.Invalid as exc:
        result["errors"].append(str(exc))
        return result
    result["dropped"] = sorted(set(config) - set(validated))
    result["config"] = plain(validated)
    return result


async def main() -> None:
    from homeassistant.core import HomeAssistant

    entities = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as config_dir:
        # Templates are checked (compiled) against a Home Assistant instance, as in the real
        # integration; none is started.
        hass = HomeAssistant(config_dir)
        results = [check(component, payload) for component, payload in entities]
        await hass.async_stop(force=True)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
