"""The `daisee-node` entry point: catches a stop request before the heavy imports start."""

from __future__ import annotations

import sys

from daisee_node.paths import DEFAULT_CONFIG_PATH
from daisee_node.signals import install_early_stop

__all__ = ["DEFAULT_CONFIG_PATH", "main"]


def main() -> int:
    """Run the command line; `--version` alone answers without loading the commands."""
    if sys.argv[1:] == ["--version"]:
        # The same line argparse prints, without importing the config models and the parser.
        from daisee_node import __version__

        print(f"daisee-node {__version__}")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        install_early_stop()
    from daisee_node.cli import main as cli_main

    return cli_main()
