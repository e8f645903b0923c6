"""Logging, configured once: readable on a terminal, JSON lines otherwise, `node_id` bound.

Libraries log through the standard `logging` module (pymodbus, paho/aiomqtt, web3, aiosqlite,
asyncio, Python warnings). Their records go through the same renderer, one line each (a traceback
becomes the line's `exception`), carrying `logger` (the library's logger name) and the node's
bound context. Libraries that repeat what the node reports in its own words are demoted
(`DEMOTE`): pymodbus's "Failed to connect" and "Repeating...." are debug lines, since the node logs
"sensor read failed" and "meter unavailable" once per outage.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
import structlog.tracebacks

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: top-level logger name (children included) → its levels, as the node logs them. pymodbus logs
#: every failed connect and request of a meter the node already reports in its own words (and
#: retries): those are debug lines; only its critical lines stay visible, as warnings. The same
#: for paho's socket errors, which the MQTT link reports itself.
DEMOTE: dict[str, dict[int, int]] = {
    "pymodbus": {
        logging.INFO: logging.DEBUG,
        logging.WARNING: logging.DEBUG,
        logging.ERROR: logging.DEBUG,
        logging.CRITICAL: logging.WARNING,
    },
    # aiomqtt hands paho its logger "mqtt": paho logs a broken socket as an error, while the
    # node's link already reports the outage (warning) and reconnects.
    "mqtt": {
        logging.WARNING: logging.DEBUG,
        logging.ERROR: logging.DEBUG,
        logging.CRITICAL: logging.WARNING,
    },
}

#: loggers whose debug lines say nothing even when debugging the node (aiosqlite: two lines per
#: database call, several a second): at info at least
QUIET = ("aiosqlite",)

#: the handler `configure` installed on the root logger (replaced when called again)
_handler: logging.Handler | None = None


class _LibraryLevels(logging.Filter):
    """Demotes library records (see `DEMOTE`), then drops those under the node's level.

    Here rather than as the handler's level: the handler's level is compared before filters run,
    so a demoted record would already have passed it."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        levels = DEMOTE.get(record.name.partition(".")[0])
        if levels is not None and record.levelno in levels:
            level = levels[record.levelno]
            record.levelno, record.levelname = level, logging.getLevelName(level)
        return record.levelno >= self.level


def _logger_name(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A library's record says which logger wrote it."""
    record = event.get("_record")
    if record is not None:
        event.setdefault("logger", record.name)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process. Safe to call again (e.g. after SIGHUP)."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(LEVELS[level], processors, stream)


def _route_stdlib(level: int, processors: list[Any], stream: TextIO) -> None:
    """Send the standard `logging` records of every library through the same processors."""
    global _handler
    import structlog.stdlib

    formatter = structlog.stdlib.ProcessorFormatter(
        # the node's own processors but the renderer: they run on each foreign record first
        foreign_pre_chain=[_logger_name, *processors[:-1]],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, processors[-1]],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryLevels(level))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    # Libraries check their logger's level before building a record: nothing under the node's
    # level (nor debug chatter of idle libraries) costs more than that check.
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    # `warnings.warn` from a library (deprecations, unclosed resources) becomes a record too,
    # instead of plain text on stderr.
    logging.captureWarnings(True)


def bind_node(node_id: str) -> None:
    """Every log line from here on (and from tasks started after) carries `node_id`."""
    structlog.contextvars.bind_contextvars(node_id=node_id)


def get_logger(component: str) -> Any:
    """A logger whose lines carry `component`."""
    return structlog.get_logger().bind(component=component)


def reset() -> None:
    """Undo `configure` for the standard `logging` module (a host embedding the node, tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    logging.getLogger().setLevel(logging.WARNING)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(False)
