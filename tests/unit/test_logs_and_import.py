"""Logging formats, and the promise that the package imports on a machine with no hardware."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import warnings

import pytest
import structlog

from daisee_node import logs


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logs.reset()


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


# -- libraries' own logging ------------------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_library_records_are_json_lines_with_their_logger_and_the_node_id() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logs.bind_node("house-3")
    logging.getLogger("web3.manager.RequestManager").warning("provider %s slow", "http")
    logging.getLogger("aiosqlite").debug("executing")  # under the node's level: dropped
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    lines = json_lines(out.getvalue())  # every line parses: no plain text, no bare traceback
    assert [(e["logger"], e["level"], e["event"]) for e in lines] == [
        ("web3.manager.RequestManager", "warning", "provider http slow"),
        ("asyncio", "error", "Task exception was never retrieved"),
    ]
    assert all(e["node_id"] == "house-3" and "timestamp" in e for e in lines)
    assert lines[1]["exception"][0]["exc_type"] == "ConnectionResetError"


def test_pymodbus_noise_is_demoted_to_debug() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    pymodbus = logging.getLogger("pymodbus.logging")
    pymodbus.warning("Failed to connect [Errno 111] Connect call failed")
    pymodbus.warning("Repeating....")
    pymodbus.error("Cancel send, because not connected!")
    pymodbus.critical("cannot go on")
    assert [(e["level"], e["event"]) for e in json_lines(out.getvalue())] == [
        ("warning", "cannot go on")
    ]
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)  # reconfigured: one handler, not two
    pymodbus.warning("Failed to connect [Errno 111] Connect call failed")
    logging.getLogger("aiosqlite").debug("executing <function>")  # noise even when debugging
    lines = json_lines(out.getvalue())
    assert [(e["logger"], e["level"]) for e in lines] == [("pymodbus.logging", "debug")]


def test_python_warnings_become_log_lines() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("unclosed transport", ResourceWarning, stacklevel=1)
    (line,) = json_lines(out.getvalue())
    assert line["logger"] == "py.warnings" and line["level"] == "warning"
    assert "unclosed transport" in line["event"]


def test_library_records_are_readable_on_a_terminal() -> None:
    out = FakeTty()
    logs.configure("debug", "auto", stream=out)
    logging.getLogger("pymodbus.logging").warning("Failed to connect")
    text = out.getvalue()
    assert "Failed to connect" in text and "debug" in text and not text.startswith("{")
