"""The `daisee-node` entry point: catches a stop request before the heavy imports start."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        # Until the daemon installs its own handlers, a stop just ends the process cleanly.
        def stop(_signum: int, _frame: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    from daisee_node.cli import main as cli_main

    return cli_main()
