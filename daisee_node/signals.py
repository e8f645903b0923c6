"""A stop that arrives before the daemon's own signal handlers are in.

Until then, SIGTERM ends the process by raising `SystemExit`. That exception can land where it
is swallowed (a weakref callback during an import prints "Exception ignored" and carries on),
so the request is also remembered here, and the daemon stops as soon as its handlers are in.
"""

from __future__ import annotations

import signal

_stop_requested = False


def early_stop(_signum: int, _frame: object) -> None:
    """The SIGTERM handler of the start-up: remember the request, then end the process."""
    global _stop_requested
    _stop_requested = True
    raise SystemExit(0)


def install_early_stop() -> None:
    """Catch SIGTERM (and ignore SIGHUP: nothing to reload yet) until the daemon takes over."""
    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def stop_requested() -> bool:
    """Whether a stop arrived before the daemon's own signal handlers were installed."""
    return _stop_requested
