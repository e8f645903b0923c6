"""Start Home Assistant (`python hass_launch.py --config DIR ...`) on the Python it is installed
on, even below the patch release its start-up check asks for (see tests/support/hass.py)."""

from __future__ import annotations

import sys

import homeassistant.__main__ as hass_main

hass_main.REQUIRED_PYTHON_VER = tuple(sys.version_info[:3])  # type: ignore[misc]
sys.exit(hass_main.main())
