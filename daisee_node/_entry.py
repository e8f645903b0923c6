"""The `daisee-node` entry point: catches a stop request before the heavy imports start."""

from __future__ import annotations

import signal
import sys

from daisee_node.paths import DEFAULT_CONFIG_PATH

__all__ = ["DEFAULT_CONFIG_PATH", "main"]


_stop_requested = False


def _early_stop(_signum: int, _frame: object) -> None:
    """Until the daemon installs its own handlers, a stop ends the process cleanly. The request
    is also remembered: the exception can land where it is swallowed (a weakref callback during
    an import prints "Exception ignored" and carries on), and the daemon must not miss it."""
    global _stop_requested
    _stop_requested = True
    raise SystemExit(0)


def stop_requested() -> bool:
    """Whether a stop arrived before the daemon's own signal handlers were installed."""
    return _stop_requested


def main() -> int:
    """Run the command line; `--version` alone answers without loading the commands."""
    if sys.argv[1:] == ["--version"]:
        # The same line argparse prints, without importing the config models and the parser.
        from daisee_node import __version__

        print(f"daisee-node {__version__}")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        signal.signal(signal.SIGTERM, _early_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    from daisee_node.cli import main as cli_main

    return cli_main()
