"""Where the node looks for things unless told otherwise."""

from __future__ import annotations

from pathlib import Path

#: the config every command reads unless given `-c` (kept in this small module so that the
#: command line can describe itself without loading the config models)
DEFAULT_CONFIG_PATH = Path("/etc/daisee-node/config.toml")
