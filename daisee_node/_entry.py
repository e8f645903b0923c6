"""The `daisee-node` entry point: catches a stop request before the heavy imports start."""

from __future__ import annotations

import signal
import sys

from daisee_node.paths import DEFAULT_CONFIG_PATH

__all__ = ["DEFAULT_CONFIG_PATH", "main"]


def main() -> int:
    """Run the command line; `--version` alone answers without loading the commands."""
    if sys.argv[1:] == ["--version"]:
        # The same line argparse prints, without importing the config models and the parser.
        from daisee_node import __version__

        print(f"daisee-node {__version__}")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        # Until the daemon installs its own handlers, a stop just ends the process cleanly.
        def stop(_signum: int, _frame: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    from daisee_node.cli import main as cli_main

    return cli_main()
