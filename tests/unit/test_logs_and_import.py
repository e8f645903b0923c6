"""Logging formats, and the promise that the package imports on a machine with no hardware."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import structlog

from daisee_node import logs


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    logs.configure("info", "auto", stream=out)
    structlog.contextvars.clear_contextvars()
    logs.bind_node("house-3")
    logs.get_logger("store").info("hello", n=2)
    logs.get_logger("store").debug("hidden")
    structlog.contextvars.clear_contextvars()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "hello" and event["node_id"] == "house-3"
    assert event["component"] == "store" and event["n"] == 2 and event["level"] == "info"


def test_readable_lines_on_a_terminal() -> None:
    out = FakeTty()
    logs.configure("info", "auto", stream=out)
    logs.get_logger("daemon").warning("sensor read failed", sensor="pv")
    text = out.getvalue()
    assert "sensor read failed" in text and "sensor" in text
    assert not text.lstrip().startswith("{")


def test_importing_the_package_needs_no_hardware_library() -> None:
    code = (
        "import sys, daisee_node, daisee_node.cli, daisee_node.config, daisee_node.daemon\n"
        "heavy = {'board', 'busio', 'adafruit_ads1x15', 'gpiozero', 'pymodbus', 'web3',"
        " 'aiomqtt', 'lgpio'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
