"""Named tasks in one TaskGroup; a task that crashes is logged by name and started again.

The supervisor knows nothing of what it runs: the node hands it factories of coroutines and a
callback to count crashes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from daisee_node.backoff import Backoff

RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0
#: a task that ran this long before crashing starts its backoff from the beginning again
RESTART_RESET_S = 60.0

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """Runs named tasks inside the TaskGroup given to `attach`, restarting the supervised ones
    after a capped, jittered backoff. Once `stopping` is set, nothing is restarted."""

    def __init__(self, log: Any, on_crash: Callable[[str], None] | None = None) -> None:
        self.log = log
        self.on_crash = on_crash
        self.stopping = False
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None

    def attach(self, tg: asyncio.TaskGroup) -> None:
        """Tasks spawned from now on run in `tg`."""
        self._tg = tg

    def spawn(self, name: str, factory: TaskFactory, *, supervise: bool = True) -> None:
        """Start `factory()` as task `name`; `supervise`: start it again when it crashes."""
        assert self._tg is not None, "attach a TaskGroup first"
        coro = self._supervise(name, factory) if supervise else factory()
        task: asyncio.Task[None] = self._tg.create_task(coro, name=name)
        self.tasks[name] = task
        task.add_done_callback(functools.partial(self._forget, name))

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(name) is task:
            del self.tasks[name]

    def running(self) -> list[str]:
        """Names of the tasks not finished yet."""
        return sorted(n for n, t in self.tasks.items() if not t.done())

    def named(self, names: Iterable[str]) -> list[asyncio.Task[None]]:
        """The tasks among `names` that exist."""
        return [t for n in names if (t := self.tasks.get(n)) is not None]

    async def cancel(self, tasks: list[asyncio.Task[None]], wait_s: float) -> None:
        """Cancel `tasks` and wait for them at most `wait_s` seconds: a task that ignores its
        cancellation must not hold the rest back."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.1, wait_s))

    def cancel_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()

    async def _supervise(self, name: str, factory: TaskFactory) -> None:
        backoff = Backoff(RESTART_BASE_S, RESTART_CAP_S)
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stopping:
                    # Stopping: a TaskGroup inside the task may raise its children's errors
                    # instead of the cancellation (Python 3.11). Never restart on the way out.
                    self.log.exception("task failed while stopping", task=name)
                    raise asyncio.CancelledError from exc
                if time.monotonic() - started > RESTART_RESET_S:
                    backoff.reset()
                delay = backoff.next_delay()
                log = self.log.bind(
                    task=name, attempt=backoff.failures, restart_in_s=round(delay, 2)
                )
                if backoff.failures == 1:
                    log.exception("task crashed; restarting")
                else:
                    log.error("task crashed again; restarting", error=repr(exc))
                if self.on_crash is not None:
                    self.on_crash(name)
                await asyncio.sleep(delay)
