"""The supervisor: one TaskGroup of named tasks, signals, restarts with backoff, ordered shutdown.

Tasks: `store.writer`, one `sampler.<sensor>` per sensor, `systemd.watchdog`, `config.reload`.
Readings flow from each sampler through `Node.publish` to the store and to every subscriber (rules,
MQTT and the ledger plug in there).

Shutdown (SIGTERM/SIGINT) is ordered and bounded to `SHUTDOWN_S`: stop sampling, commit what the
store holds, checkpoint and close. SIGHUP re-reads the config file; a config with errors is
rejected, its problems logged, and the running one kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node import logs
from daisee_node.actuators.relays import RelayController, RelayState
from daisee_node.backoff import Backoff
from daisee_node.checks import ChannelChecks
from daisee_node.clock import Clock, ScaledClock
from daisee_node.config import Config, load_config
from daisee_node.errors import ConfigError, DaiseeError, NodeLockedError
from daisee_node.readings import Quality, Reading
from daisee_node.rules.engine import Decision, RuleEngine
from daisee_node.sensors import Sensor, SensorContext, build_sensor
from daisee_node.sensors.base import SourceUnavailable
from daisee_node.sensors.simulated import SITE as SIMULATED_SITE
from daisee_node.store import Store, db_path, ensure_private_dir
from daisee_node.systemd import Notifier

if TYPE_CHECKING:
    from daisee_node.ledger.service import LedgerService
    from daisee_node.mqtt.service import NodeMqtt

SHUTDOWN_S = 5.0
#: past SHUTDOWN_S plus this, a stop that still hangs ends the process (see `request_stop`)
BACKSTOP_GRACE_S = 2.0
#: the relays get this long to reach their safe state at a stop
SAFE_STATE_S = 3.0
#: how often the wall clock is compared with the steady clock, and what counts as a step
CLOCK_WATCH_S = 1.0
CLOCK_STEP_S = 2.0
EXIT_UNSAFE = 3
EXIT_OVERRUN = 4
RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0
#: a task that ran this long before crashing starts its backoff from the beginning again
RESTART_RESET_S = 60.0
LOCK_NAME = "daisee-node.pid"

ReadingSink = Callable[[Sequence[Reading]], None]


def make_clock(config: Config) -> Clock:
    node = config.node
    if node.time_speed == 1.0 and node.time_start is None:
        return Clock()
    start = None
    if node.time_start is not None:
        ts = node.time_start
        start = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
    return ScaledClock(start=start, speed=node.time_speed)


@dataclass
class SensorStats:
    """Per-sensor counts, also persisted as store counters `sensor.<name>.*`."""

    reads: int = 0
    errors: int = 0
    bad: int = 0
    overruns: int = 0
    errors_in_row: int = 0


class DataDirLock:
    """An exclusive lock on the data dir: two daemons must never share one database."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DaiseeError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeLockedError(
                f"another daisee-node (pid {other}) is running on {self.path.parent}"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            # The lock is the flock, not the text: a full disk must not keep the relays unsafe.
            logs.get_logger("daemon").warning(
                "cannot write the pid into the lock file; running without it",
                path=str(self.path),
                error=exc.strerror,
            )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def make_private_dir(path: Path) -> None:
    """The data dir, private to the node's user (see `ensure_private_dir`), or a clear error."""
    try:
        ensure_private_dir(path)
    except OSError as exc:
        raise DaiseeError(f"cannot create the data dir {path}: {exc.strerror}") from None


def running_pid(data_dir: Path) -> int | None:
    """The pid of the daemon holding `data_dir`, or None when no daemon runs there."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


class Node:
    """One running node: its store, its samplers and everything that plugs into them."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or make_clock(config)
        self.notifier = notifier or Notifier()
        self.log = logs.get_logger("daemon")
        data_dir = config.node.data_dir
        self.store = Store(
            db_path(data_dir),
            retention=config.store.retention(),
            clock=self.clock,
            synchronous=config.store.synchronous.upper(),
        )
        #: the newest reading of every channel, as published (and, at start, as stored)
        self.latest: dict[str, Reading] = {}
        self.ctx = SensorContext(self.clock, data_dir, config.simulation, latest=self.latest)
        self.sensors: dict[str, Sensor] = {}
        self.sensor_stats: dict[str, SensorStats] = {}
        self._checks: dict[str, ChannelChecks] = {}
        self._sinks: list[ReadingSink] = [self.store.put_many, self._remember]
        self.relays: RelayController | None = None
        if config.relays:
            self.relays = RelayController(
                config.relays, config.gpio, data_dir, on_change=self._relay_changed
            )
        if self.relays is not None:
            relays = self.relays
            self.ctx.relay_on = lambda name: name in relays.relays and relays.relays[name].on
        self.rules: RuleEngine | None = None
        if config.rules:
            self.rules = self._build_rules(config)
            self._sinks.append(self.rules.on_readings)
        self.ledger: LedgerService | None = None
        if config.chain is not None:
            from daisee_node.ledger.service import LedgerService

            self.ledger = LedgerService(
                config.chain, self.store, self.clock, data_dir, config.rules, config.derived
            )
        self.mqtt: NodeMqtt | None = None
        if config.mqtt is not None:
            from daisee_node.mqtt.service import NodeMqtt

            self.mqtt = NodeMqtt(self, config.mqtt)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._lock = DataDirLock(data_dir)
        self.started = asyncio.Event()
        self.exit_code = 0
        #: why the relays could not be made safe, if they could not
        self.safe_state_error: str | None = None
        self._safe_done = False
        self._backstop: threading.Timer | None = None
        self._sink_failures: dict[str, int] = {}
        self._rule_errors: dict[str, int] = {}
        self.clock_steps = 0

    # -- the reading bus ---------------------------------------------------------------------

    def subscribe(self, sink: ReadingSink) -> None:
        """Call `sink` with every batch of readings any source publishes."""
        self._sinks.append(sink)

    def publish(self, readings: Sequence[Reading]) -> None:
        """Hand readings to every sink. A failing sink is logged and counted; the others, and
        the sampler that published, carry on."""
        if self.ledger is not None:
            readings = self._flag_late(readings)
        for sink in self._sinks:
            try:
                sink(readings)
            except Exception as exc:
                self._sink_failed(sink, exc)

    def _sink_failed(self, sink: ReadingSink, exc: Exception) -> None:
        name = getattr(sink, "__qualname__", repr(sink))
        count = self._sink_failures.get(name, 0) + 1
        self._sink_failures[name] = count
        with contextlib.suppress(Exception):
            self.store.add_counter("bus.sink_errors", 1)
        # A bug: loud the first time, then once per hundred so the log stays readable.
        if count == 1 or count % 100 == 0:
            self.log.error("a reading consumer failed", consumer=name, failures=count, exc_info=exc)

    def _flag_late(self, readings: Sequence[Reading]) -> Sequence[Reading]:
        """Mark readings stamped inside a period that is already sealed (after a backward clock
        step): they are kept and counted, and a sealed period is never reopened."""
        assert self.ledger is not None
        sealed = self.ledger.sealed_until_ms
        if not sealed:
            return readings
        out: list[Reading] | None = None
        for i, r in enumerate(readings):
            if r.t_ms < sealed and r.quality != Quality.LATE:
                if out is None:
                    out = list(readings)
                out[i] = r._replace(quality=Quality.LATE)
        if out is None:
            return readings
        late = sum(1 for r in out if r.quality == Quality.LATE)
        self.store.add_counter("readings.late", late)
        return out

    def _remember(self, readings: Sequence[Reading]) -> None:
        latest = self.latest
        for r in readings:
            latest[r.channel] = r

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        if self._backstop is None:
            # Whatever a source, the broker or the chain are doing, the process ends: a stop
            # that hangs ends in SIGKILL from systemd, which is worse than leaving now.
            self._backstop = threading.Timer(SHUTDOWN_S + BACKSTOP_GRACE_S, self._overrun)
            self._backstop.daemon = True
            self._backstop.start()

    def _overrun(self) -> None:
        """The stop took too long: say what was still running, then leave."""
        try:
            stuck = sorted(n for n, t in self._tasks.items() if not t.done())
            self.log.error(
                "stop overran its deadline; exiting now",
                deadline_s=SHUTDOWN_S + BACKSTOP_GRACE_S,
                still_running=stuck,
                relays_safe=self.safe_state_error is None and self._safe_done,
            )
        finally:
            os._exit(EXIT_OVERRUN)

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self) -> int:
        """Run until stopped. Returns the process exit code."""
        logs.bind_node(self.config.node.id)
        data_dir = self.config.node.data_dir
        make_private_dir(data_dir)
        self._lock.acquire()
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop)
        try:
            # Relays first: they reach their safe state before anything slow or fallible (the
            # store may be large, damaged, or on a full disk).
            if self.relays is not None:
                self.relays.open()
            await self.store.open()
            self.latest.update(await self.store.load_latest())
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self._spawn("store.writer", self.store.run)
                    if self.relays is not None:
                        self._spawn("relays.worker", self.relays.run)
                    if self.rules is not None or self.relays is not None:
                        self._spawn("rules.tick", self._rules_tick)
                    for sensor_config in self.config.sensors:
                        if sensor_config.enabled:
                            self._start_sensor(sensor_config)
                    if self.ledger is not None:
                        self._spawn("ledger.sealer", self.ledger.seal_loop)
                        self._spawn("ledger.submitter", self.ledger.submit_loop)
                    if self.mqtt is not None:
                        self._spawn("mqtt", self.mqtt.run)
                    self._spawn("systemd.watchdog", self._watchdog, supervise=False)
                    self._spawn("clock.watch", self._watch_clock)
                    self._spawn("config.reload", self._reload_loop)
                    self.store.set_counter("node.started_ms", self.clock.now_ms())
                    self.notifier.ready(self._status_text())
                    self.log.info(
                        "node started",
                        sensors=sorted(self.sensors),
                        data_dir=str(data_dir),
                        pid=os.getpid(),
                    )
                    self.started.set()
                    await self._stop.wait()
                    await self._shutdown()
            finally:
                if self.relays is not None:
                    # Also after a crash: whatever happened, the relays end safe.
                    await self._relays_safe()
                    self.relays.close()
                await self.store.close()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self._lock.release()
            if self._backstop is not None:
                self._backstop.cancel()
        self.log.info("node stopped")
        return self.exit_code

    async def _relays_safe(self) -> bool:
        """Every relay to its safe state; a failure is an error everyone can see, never silent."""
        assert self.relays is not None
        try:
            async with asyncio.timeout(SAFE_STATE_S):
                await self.relays.all_safe()
        except Exception as exc:
            self.exit_code = self.exit_code or EXIT_UNSAFE
            self.safe_state_error = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
            self.log.exception("relays did not reach their safe state", error=self.safe_state_error)
            self.notifier.status(f"ERROR: relays not in their safe state ({self.safe_state_error})")
            return False
        return True

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed = []
        handlers = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: self.request_reload,
        }
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):  # not the main thread
                continue
            installed.append(sig)
        return installed

    async def _shutdown(self) -> None:
        """Stop sampling, then commit what the store holds, then stop the rest; ≤ SHUTDOWN_S."""
        self.notifier.stopping()
        self.log.info("stopping")
        deadline = time.monotonic() + SHUTDOWN_S
        samplers = [t for name, t in self._tasks.items() if name.startswith("sampler.")]
        for task in samplers:
            task.cancel()
        if samplers:
            await asyncio.wait(samplers, timeout=max(0.1, (deadline - time.monotonic()) / 2))
        stopping = [
            t
            for name in ("rules.tick", "relays.worker", "ledger.sealer", "ledger.submitter")
            if (t := self._tasks.get(name)) is not None
        ]
        for task in stopping:
            task.cancel()
        if stopping:
            # A task that ignores its cancellation must not hold the relays or the store back.
            await asyncio.wait(stopping, timeout=max(0.1, (deadline - time.monotonic()) / 3))
        if self.relays is not None:
            self._safe_done = await self._relays_safe()
        if self.mqtt is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self.mqtt.goodbye()
            except Exception as exc:
                self.log.warning("MQTT goodbye not sent", error=repr(exc))
        self.store.stop()
        writer = self._tasks.get("store.writer")
        if writer is not None:
            left = max(0.1, deadline - time.monotonic())
            _, not_done = await asyncio.wait([writer], timeout=left)
            if not_done:
                self.log.error("store did not drain in time", pending=self.store.pending)
        for task in self._tasks.values():
            task.cancel()

    # -- tasks -------------------------------------------------------------------------------

    def _spawn(
        self, name: str, factory: Callable[[], Awaitable[None]], *, supervise: bool = True
    ) -> None:
        assert self._tg is not None
        coro = self._supervise(name, factory) if supervise else factory()
        task = self._tg.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks[name] = task
        task.add_done_callback(lambda t, n=name: self._forget(n, t))

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run a task; when it crashes, log it by name and start it again after a capped backoff."""
        backoff = Backoff(RESTART_BASE_S, RESTART_CAP_S)
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stop.is_set():
                    # Stopping: a TaskGroup inside the task may raise its children's errors
                    # instead of the cancellation (Python 3.11). Never restart on the way out.
                    self.log.exception("task failed while stopping", task=name)
                    raise asyncio.CancelledError from exc
                if time.monotonic() - started > RESTART_RESET_S:
                    backoff.reset()
                delay = backoff.next_delay()
                failures = backoff.failures
                log = self.log.bind(task=name, attempt=failures, restart_in_s=round(delay, 2))
                if failures == 1:
                    log.exception("task crashed; restarting")
                else:
                    log.error("task crashed again; restarting", error=repr(exc))
                self.store.add_counter(f"task.{name}.crashes", 1)
                await asyncio.sleep(delay)

    def _start_sensor(self, sensor_config: Any) -> None:
        sensor = build_sensor(sensor_config, self.ctx)
        self.sensors[sensor.name] = sensor
        self._checks[sensor.name] = ChannelChecks(sensor.channels)
        self.sensor_stats.setdefault(sensor.name, SensorStats())
        self.store.declare(sensor.channels)
        self._spawn(f"sampler.{sensor.name}", lambda s=sensor: self._sample(s))

    async def _stop_sensor(self, name: str) -> None:
        task = self._tasks.get(f"sampler.{name}")
        self.sensors.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self, sensor: Sensor) -> None:
        """Read one sensor every `interval_s` until cancelled. A failed read never ends the loop."""
        stats = self.sensor_stats[sensor.name]
        checks = self._checks[sensor.name]
        prefix = f"sensor.{sensor.name}"
        try:
            await sensor.setup()
        except Exception:
            self._publish_failure(sensor, Quality.UNAVAILABLE)
            raise
        try:
            interval = float(sensor.config.interval_s)
            clock = self.clock
            # Scheduled on the steady clock: a wall-clock step changes stamps, never the pace.
            next_t = clock.monotonic()
            while True:
                try:
                    readings = await sensor.read()
                except Exception as exc:
                    stats.errors += 1
                    stats.errors_in_row += 1
                    self.store.add_counter(f"{prefix}.errors", 1)
                    if stats.errors_in_row == 1:
                        self.log.warning("sensor read failed", sensor=sensor.name, error=repr(exc))
                    unavailable = isinstance(exc, SourceUnavailable)
                    quality = Quality.UNAVAILABLE if unavailable else Quality.SOURCE_ERROR
                    readings = self._publish_failure(sensor, quality)
                else:
                    if stats.errors_in_row:
                        self.log.info(
                            "sensor recovered", sensor=sensor.name, failed_reads=stats.errors_in_row
                        )
                    stats.errors_in_row = 0
                    readings = checks.apply(self._screen(readings), self.latest)
                    if readings:
                        self.publish(readings)
                stats.reads += 1
                bad = sum(1 for r in readings if r.quality != Quality.GOOD)
                if bad:
                    stats.bad += bad
                    self.store.add_counter(f"{prefix}.bad", bad)
                self.store.add_counter(f"{prefix}.reads", 1)
                next_t += interval
                now = clock.monotonic()
                if next_t < now:
                    # Too slow for the interval: skip the missed ticks instead of bursting.
                    stats.overruns += 1
                    next_t = now
                await clock.sleep(next_t - now)
        finally:
            with contextlib.suppress(Exception):
                await sensor.close()

    def _publish_failure(self, sensor: Sensor, quality: Quality) -> list[Reading]:
        t_ms = self.clock.now_ms()
        readings = [Reading(ch.name, t_ms, math.nan, quality) for ch in sensor.channels]
        self.publish(readings)
        return readings

    @staticmethod
    def _screen(readings: Sequence[Reading]) -> Sequence[Reading]:
        """Mark a value no source could mean (NaN, ±inf, not a number) instead of trusting it."""
        out: list[Reading] | None = None
        for i, r in enumerate(readings):
            value = r.value
            if type(value) is float and math.isfinite(value):
                continue
            try:
                fixed = float(value)
            except (TypeError, ValueError):
                fixed = math.nan
            if not math.isfinite(fixed):
                fixed_reading = Reading(
                    r.channel, r.t_ms, math.nan, r.quality or Quality.OUT_OF_RANGE
                )
            else:
                fixed_reading = Reading(r.channel, r.t_ms, fixed, r.quality)
            if out is None:
                out = list(readings)
            out[i] = fixed_reading
        return readings if out is None else out

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the loop turns and the store makes progress."""
        interval = self.notifier.watchdog_s
        tick = 0
        while True:
            if interval:
                self.notifier.watchdog()
            if tick % 10 == 0:
                self.notifier.status(self._status_text())
            tick += 1
            await asyncio.sleep(interval / 2 if interval else 5.0)

    def _status_text(self) -> str:
        text = (
            f"{len(self.sensors)} sensor(s); {self.store.stats.written} readings stored; "
            f"{self.store.pending} pending"
        )
        if not self.store.healthy:
            text += f"; STORE: {self.store.status_line()}"
        if self.safe_state_error:
            text = f"ERROR: relays not in their safe state ({self.safe_state_error}); " + text
        return text

    async def _watch_clock(self) -> None:
        """Notice wall-clock steps (NTP, an operator, a dead RTC battery): log and count them.
        Sampling runs on the steady clock and carries on; stamps simply follow the wall clock."""
        clock = self.clock
        offset = clock.now() - clock.monotonic()
        while True:
            await asyncio.sleep(CLOCK_WATCH_S)
            now = clock.now()
            new_offset = now - clock.monotonic()
            step = new_offset - offset
            if abs(step) >= CLOCK_STEP_S:
                self.clock_steps += 1
                self.store.add_counter("clock.steps", 1)
                self.store.put_event(
                    int(now * 1000), "clock", "wall", None, None, f"stepped {step:+.3f} s"
                )
                self.log.warning(
                    "wall clock stepped; sampling carries on, stamps follow the new time",
                    step_s=round(step, 3),
                    direction="back" if step < 0 else "forward",
                )
            offset = new_offset

    # -- rules and relays ----------------------------------------------------------------------

    def _build_rules(self, config: Config) -> RuleEngine:
        safe = {r.name: r.safe_state for r in config.relays}
        clock = self.clock
        return RuleEngine(
            config.rules,
            config.derived,
            self.latest,
            safe,
            now_ms=clock.now_ms,
            request=self._rule_request,
            record=self._record_decision,
        )

    def _rule_request(self, relay: str, on: bool | None, reason: str) -> None:
        if self.relays is not None:
            self.relays.request(relay, on, reason)

    def _record_decision(self, d: Decision) -> None:
        self.store.put_event(
            d.t_ms, "rule", d.rule, d.relay, d.state, d.reason, json.dumps(d.inputs, sort_keys=True)
        )
        self.store.set_counter(f"rule.{d.rule}.active", int(d.active))

    def _relay_changed(self, r: RelayState, reason: str) -> None:
        name = r.config.name
        self.store.put_event(
            self.clock.now_ms(), "relay", name, None, "on" if r.on else "off", reason
        )
        self.store.add_counter(f"relay.{name}.switches", 1)
        self.store.set_counter(f"relay.{name}.state", int(r.on))
        self.store.set_counter(f"relay.{name}.since_ms", self.clock.now_ms())

    async def _rules_tick(self) -> None:
        """Timers (hold, minimum on/off, override expiry) and staleness, four times a second."""
        while True:
            if self.relays is not None:
                self.relays.expire_overrides()
                if self.rules is not None:
                    for name, r in self.relays.relays.items():
                        self.rules.set_suspended(name, r.override is not None)
            if self.rules is not None:
                self.rules.tick()
                for r in self.rules.rules:
                    if r.errors != self._rule_errors.get(r.config.name):
                        self._rule_errors[r.config.name] = r.errors
                        self.store.set_counter(f"rule.{r.config.name}.errors", r.errors)
            await asyncio.sleep(0.25)

    def override(
        self, relay: str, mode: str, expires_s: float | None = None, reason: str = "manual"
    ) -> None:
        """Manual ON / OFF / AUTO of a relay (the API the MQTT commands use)."""
        if self.relays is None:
            raise DaiseeError("this node has no relays")
        self.relays.override(relay, mode, expires_s, reason)  # type: ignore[arg-type]
        if self.rules is not None:
            self.rules.set_suspended(relay, mode != "auto")
        self.store.put_event(
            self.clock.now_ms(),
            "override",
            relay,
            relay,
            mode,
            f"{reason}" + (f" for {expires_s:g} s" if expires_s else ""),
        )

    # -- SIGHUP ------------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file and apply it; keep the running config if it has errors."""
        if self.config_path is None:
            self.log.warning("reload asked, but the node was not started from a file")
            return False
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                self.log.error(
                    "config reload rejected; keeping the running config",
                    problems=[str(p) for p in exc.problems],
                )
                return False
            old = self.config
            fixed = ("id", "data_dir", "time_speed", "time_start")
            changed = [f"node.{k}" for k in fixed if getattr(old.node, k) != getattr(new.node, k)]
            if new.relays != old.relays or new.gpio != old.gpio:
                changed.append("relays/gpio")
            if new.chain != old.chain:
                changed.append("chain")
            if changed:
                self.log.error("config reload rejected: these need a restart", keys=changed)
                return False
            await self._apply(old, new)
            if self.ledger is not None:
                from daisee_node.ledger.outbox import rules_hash

                # Periods sealed from now on name the rules that now run.
                self.ledger.sealer.rules_hash = rules_hash(new.rules, new.derived)
            self.log.info("config reloaded", sensors=sorted(self.sensors))
            return True
        finally:
            self.notifier.notify("READY=1")

    async def _apply(self, old: Config, new: Config) -> None:
        self.config = new
        self.store.retention = new.store.retention()
        if new.log != old.log:
            logs.configure(new.log.level, new.log.format)
        site_changed = new.simulation != old.simulation
        if site_changed:
            self.ctx.simulation = new.simulation
            self.ctx.resources.pop(SIMULATED_SITE, None)
        if new.rules != old.rules or new.derived != old.derived:
            if self.rules is not None:
                self._sinks.remove(self.rules.on_readings)
            self.rules = self._build_rules(new) if new.rules else None
            if self.rules is not None:
                self._sinks.append(self.rules.on_readings)
            if self.relays is not None:
                # Wishes of removed rules must not outlive them (a relay held on by a rule
                # that is gone would stay on).
                named = {relay for rule in new.rules for relay in rule.relays()}
                for name, relay in self.relays.relays.items():
                    if name not in named:
                        safe = relay.config.safe_state == "on"
                        self.relays.request(name, safe, "no rule drives it: safe state")
                if self.rules is not None:
                    for name, r in self.relays.relays.items():
                        self.rules.set_suspended(name, r.override is not None)
                    self.rules.tick()
        old_by_name = {s.name: s for s in old.sensors if s.enabled}
        new_by_name = {s.name: s for s in new.sensors if s.enabled}
        for name, cfg in old_by_name.items():
            if new_by_name.get(name) != cfg or (site_changed and cfg.kind == "simulated"):
                await self._stop_sensor(name)
        for name, cfg in new_by_name.items():
            if name not in self.sensors:
                self._start_sensor(cfg)
