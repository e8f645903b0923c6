"""The thread the ledger's blocking chain calls run on (web3 is synchronous).

Kept apart from the submitter so that starting the node does not import web3: it loads with the
first chain call, after the node is READY.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

T = TypeVar("T")


class ChainThread:
    """Runs blocking web3 calls one at a time on a daemon thread.

    A daemon thread, so a chain that does not answer never holds up the process's exit.

    A call given `signer` (the node key's account) is one that signs with it, such as a market
    action: it goes to `sends` instead, which gives its transactions the node key's next nonces
    and waits for their receipts elsewhere, so this thread is never held by a receipt.
    """

    def __init__(self, name: str = "chain") -> None:
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.signer: object | None = None
        self.sends: Callable[..., Awaitable[Any]] | None = None

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
        signs = self.signer is not None and any(
            arg is self.signer for arg in (*args, *kwargs.values())
        )
        if signs and self.sends is not None:
            return cast(T, await self.sends(fn, *args, **kwargs))
        fut: Future[T] = Future()
        with self._cv:
            self._jobs.append((lambda: fn(*args, **kwargs), fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)
