"""The thread the ledger's blocking chain calls run on (web3 is synchronous).

Kept apart from the submitter so that starting the node does not import web3: it loads with the
first chain call, after the node is READY.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ChainThread:
    """Runs blocking web3 calls one at a time on a daemon thread.

    A daemon thread, so a chain that does not answer never holds up the process's exit.
    """

    def __init__(self) -> None:
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="chain", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                fn, fut = self._jobs.pop(0)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        fut: Future[T] = Future()
        with self._cv:
            self._jobs.append((lambda: fn(*args, **kwargs), fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)
