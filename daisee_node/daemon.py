"""The node: its rooms put together, started in a safe order and stopped within a deadline.

    sensors ──(sampling)──▶ reading bus ──▶ store ──▶ ledger
                                 │
                                 └──▶ rules ──(control)──▶ relays
    MQTT observes through a narrow view (`mqtt.service.NodeView`) and sends relay commands back.
    Peers' signed readings (`peers`) come in over MQTT straight to the rules, never to the store.

Every long-running part is a named task under the supervisor (`store.writer`, one
`sampler.<sensor>` per sensor, `relays.worker`, `rules.tick`, `ledger.*`, `mqtt`,
`systemd.watchdog`, `clock.watch`, `config.reload`), restarted with backoff when it crashes.

Start: relays to their safe state first, then the store, then everything else, then READY.
Stop (SIGTERM/SIGINT) is ordered and bounded to `SHUTDOWN_S`: stop sampling, relays safe, commit
what the store holds, close; a backstop ends the process if a stop still hangs. SIGHUP re-reads
the config file; a config with errors is rejected, its problems logged, and the running one kept.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node import logs, signals
from daisee_node.actuators.relays import RelayController
from daisee_node.clock import Clock, make_clock
from daisee_node.config import Config, load_config
from daisee_node.control import Control
from daisee_node.datadir import DataDirLock, make_private_dir
from daisee_node.errors import ConfigError
from daisee_node.readings import Channel, Reading, ReadingBus, ReadingSink, mark_late
from daisee_node.rules.engine import RuleEngine
from daisee_node.sensors import Sensor, SensorContext
from daisee_node.sensors.sampler import Sampling, SensorStats
from daisee_node.sensors.simulated import SITE as SIMULATED_SITE
from daisee_node.store import Store, db_path
from daisee_node.supervisor import Supervisor
from daisee_node.systemd import Notifier

if TYPE_CHECKING:
    from daisee_node.ledger.commitment import Commitment
    from daisee_node.ledger.service import LedgerService
    from daisee_node.market_node import MarketService
    from daisee_node.mqtt.service import NodeMqtt
    from daisee_node.peers import PeerInbox

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

__all__ = ["EXIT_OVERRUN", "EXIT_UNSAFE", "SHUTDOWN_S", "Node", "SensorStats"]


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
        self.clock = clock or make_clock(config.node.time_speed, config.node.time_start)
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
        self.bus = ReadingBus(self.log, self.store.add_counter)
        self.bus.subscribe(self.store.put_many)
        self.bus.subscribe(self._remember)
        self.ctx = SensorContext(self.clock, data_dir, config.simulation, latest=self.latest)
        self.sampling = Sampling(
            self.ctx, self.latest, self.publish, self.store.add_counter, self.store.declare
        )
        relays = RelayController(config.relays, config.gpio, data_dir) if config.relays else None
        if relays is not None:
            self.ctx.relay_on = lambda name: name in relays.relays and relays.relays[name].on
        self.control = Control(config, self.clock, self.latest, self.store, relays)
        self.bus.subscribe(self.control.on_readings)
        self.ledger: LedgerService | None = None
        if config.chain is not None:
            from daisee_node.ledger.service import LedgerService

            self.ledger = LedgerService(
                config.chain, self.store, self.clock, data_dir, config.rules, config.derived
            )
            from daisee_node.conformity import attach

            attach(self)  # each sealed period gets its signed conformity report
            # salted leaves: a proof this node gives reveals no other reading (ledger/merkle.py)
            self.ledger.sealer.salted = True
        self.bus.filters.append(self._flag_late)
        #: the declared peers' messages (None: the config declares no peers)
        self.peers: PeerInbox | None = None
        self.mqtt: NodeMqtt | None = None
        exchange = None
        if config.mqtt is not None and config.peers:
            from daisee_node.peers import PeerExchange, PeerInbox

            self.peers = PeerInbox(
                config.peers,
                base_topic=config.mqtt.base_topic,
                now_ms=self.clock.now_ms,
                deliver=self._peer_readings,
                events=self.store,
            )
            # A node shares its readings with its peers only when it declares some.
            unlock = self.ledger.unlock if self.ledger is not None else None
            exchange = PeerExchange(self.peers, unlock, self.clock.now_ms)
        #: the node on the energy market (None: no [market])
        self.market: MarketService | None = None
        if config.market is not None and self.ledger is not None and config.chain is not None:
            from daisee_node.market_node import MarketService

            inbox = self.peers
            self.market = MarketService(
                config.market,
                ledger=self.ledger,
                store=self.store,
                clock=self.clock,
                latest=self.latest,
                peers={p.address: p.id for p in config.peers},
                deliver=self._peer_readings,
                peer_age_s=inbox.heard_age_s if inbox is not None else lambda peer: None,
                period_s=config.chain.period_s,
                confirmations=config.chain.confirmations,
                prove=self._prove,
            )
            self.bus.subscribe(self.market.on_readings)
        if config.mqtt is not None:
            from daisee_node.mqtt.service import NodeMqtt

            self.mqtt = NodeMqtt(MqttView(self), config.mqtt, peers=exchange)
        self.supervisor = Supervisor(
            self.log, on_crash=lambda name: self.store.add_counter(f"task.{name}.crashes", 1)
        )
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._lock = DataDirLock(data_dir)
        self.started = asyncio.Event()
        self.exit_code = 0
        #: why the relays could not be made safe, if they could not
        self.safe_state_error: str | None = None
        self._safe_done = False
        self._backstop: threading.Timer | None = None
        self.clock_steps = 0

    # -- the rooms, by name --------------------------------------------------------------------

    @property
    def relays(self) -> RelayController | None:
        return self.control.relays

    @property
    def rules(self) -> RuleEngine | None:
        """The rules engine, or None when the config has no rules."""
        return self.control.rules

    @property
    def sensors(self) -> dict[str, Sensor]:
        return self.sampling.sensors

    @property
    def sensor_stats(self) -> dict[str, SensorStats]:
        return self.sampling.stats

    # -- the reading bus ---------------------------------------------------------------------

    def subscribe(self, sink: ReadingSink) -> None:
        """Call `sink` with every batch of readings any source publishes."""
        self.bus.subscribe(sink)

    def publish(self, readings: Sequence[Reading]) -> None:
        """Hand readings to every sink. A failing sink is logged and counted; the others, and
        the sampler that published, carry on."""
        self.bus.publish(readings)

    def _flag_late(self, readings: Sequence[Reading]) -> Sequence[Reading]:
        """Mark readings stamped inside a period that is already sealed (after a backward clock
        step): they are kept and counted, and a sealed period is never reopened."""
        if self.ledger is None:
            return readings
        readings, late = mark_late(readings, self.ledger.sealed_until_ms)
        if late:
            self.store.add_counter("readings.late", late)
        return readings

    def _remember(self, readings: Sequence[Reading]) -> None:
        latest = self.latest
        for r in readings:
            latest[r.channel] = r

    async def _prove(self, channel: str, at_ms: int) -> dict[str, Any]:
        """A proof of this node's reading of `channel` at or before `at_ms`, as `prove` writes
        it; on a thread, since it reads the store and asks the chain."""
        from daisee_node.ledger.proofs import build_proof

        config = self.config
        return await asyncio.to_thread(lambda: asyncio.run(build_proof(config, channel, at_ms)))

    def _peer_readings(self, readings: Sequence[Reading]) -> None:
        """A peer's checked readings: for the rules only (the neighbour's data is neither
        stored nor committed here, so they skip the reading bus)."""
        self._remember(readings)
        self.control.on_readings(readings)

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self.supervisor.stopping = True
        if self._backstop is None:
            # Whatever a source, the broker or the chain are doing, the process ends: a stop
            # that hangs ends in SIGKILL from systemd, which is worse than leaving now.
            self._backstop = threading.Timer(SHUTDOWN_S + BACKSTOP_GRACE_S, self._overrun)
            self._backstop.daemon = True
            self._backstop.start()

    def _overrun(self) -> None:
        """The stop took too long: say what was still running, then leave."""
        try:
            self.log.error(
                "stop overran its deadline; exiting now",
                deadline_s=SHUTDOWN_S + BACKSTOP_GRACE_S,
                still_running=self.supervisor.running(),
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
        if signals.stop_requested():
            self.request_stop()
        try:
            # Relays first: they reach their safe state before anything slow or fallible (the
            # store may be large, damaged, or on a full disk).
            if self.relays is not None:
                self.relays.open()
            await self.store.open()
            self.latest.update(await self.store.load_latest())
            try:
                async with asyncio.TaskGroup() as tg:
                    self.supervisor.attach(tg)
                    self._start_tasks()
                    self.store.set_counter("node.started_ms", self.clock.now_ms())
                    self.notifier.ready(self._status_text())
                    self.log.info(
                        "node started",
                        sensors=sorted(self.sensors),
                        data_dir=str(data_dir),
                        pid=os.getpid(),
                    )
                    if self.config.peers and self.ledger is None:
                        self.log.warning(
                            "no node key ([chain]): this node's readings are not sent to its peers"
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

    def _start_tasks(self) -> None:
        spawn = self.supervisor.spawn
        spawn("store.writer", self.store.run)
        if self.relays is not None:
            spawn("relays.worker", self.relays.run)
        if self.control.active:
            spawn("rules.tick", self.control.tick_loop)
        for sensor_config in self.config.sensors:
            if sensor_config.enabled:
                self._start_sensor(sensor_config)
        if self.ledger is not None:
            spawn("ledger.sealer", self.ledger.seal_loop)
            spawn("ledger.submitter", self.ledger.submit_loop)
        if self.market is not None:
            spawn("market.tick", self.market.tick_loop)
            spawn("market.watch", self.market.run)
        if self.mqtt is not None:
            spawn("mqtt", self.mqtt.run)
        spawn("systemd.watchdog", self._watchdog, supervise=False)
        spawn("clock.watch", self._watch_clock)
        spawn("config.reload", self._reload_loop)

    def _start_sensor(self, sensor_config: Any) -> None:
        sensor = self.sampling.add(sensor_config)
        self.supervisor.spawn(f"sampler.{sensor.name}", lambda: self.sampling.sample(sensor))

    async def _stop_sensor(self, name: str) -> None:
        self.sampling.remove(name)
        await self.supervisor.cancel(self.supervisor.named([f"sampler.{name}"]), wait_s=SHUTDOWN_S)

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

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed: list[signal.Signals] = []
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
        tasks = self.supervisor
        samplers = [t for name, t in tasks.tasks.items() if name.startswith("sampler.")]
        await tasks.cancel(samplers, wait_s=(deadline - time.monotonic()) / 2)
        stopping = tasks.named(
            (
                "rules.tick",
                "relays.worker",
                "ledger.sealer",
                "ledger.submitter",
                "market.tick",
                "market.watch",
            )
        )
        await tasks.cancel(stopping, wait_s=(deadline - time.monotonic()) / 3)
        if self.market is not None:
            try:  # what the meters counted for each order outlives the process
                async with asyncio.timeout(0.5):
                    await self.market.save()
            except Exception as exc:
                self.log.warning("market state not saved", error=repr(exc))
        if self.relays is not None:
            self._safe_done = await self._relays_safe()
        if self.mqtt is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self.mqtt.goodbye()
            except Exception as exc:
                self.log.warning("MQTT goodbye not sent", error=repr(exc))
        self.store.stop()
        writer = tasks.named(["store.writer"])
        if writer:
            left = max(0.1, deadline - time.monotonic())
            _, not_done = await asyncio.wait(writer, timeout=left)
            if not_done:
                self.log.error("store did not drain in time", pending=self.store.pending)
        tasks.cancel_all()

    # -- health ------------------------------------------------------------------------------

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

    def override(
        self, relay: str, mode: str, expires_s: float | None = None, reason: str = "manual"
    ) -> None:
        """Manual ON / OFF / AUTO of a relay (the API the MQTT commands use)."""
        self.control.override(relay, mode, expires_s, reason)

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
            if new.peers != old.peers:
                changed.append("peers")  # MQTT subscriptions are made once, at the start
            if new.market != old.market:
                changed.append("market")
            if changed:
                self.log.error("config reload rejected: these need a restart", keys=changed)
                return False
            await self._apply(old, new)
            if self.ledger is not None:
                from daisee_node.ledger.outbox import rules_hash

                # Periods sealed from now on name the rules that now run.
                self.ledger.sealer.rules_hash = rules_hash(new.rules, new.derived)
                from daisee_node.conformity import conformity_spec

                self.ledger.sealer.conformity = conformity_spec(new)
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
            self.control.replace_rules(new)
        old_by_name = {s.name: s for s in old.sensors if s.enabled}
        new_by_name = {s.name: s for s in new.sensors if s.enabled}
        for name, cfg in old_by_name.items():
            if new_by_name.get(name) != cfg or (site_changed and cfg.kind == "simulated"):
                await self._stop_sensor(name)
        for name, cfg in new_by_name.items():
            if name not in self.sensors:
                self._start_sensor(cfg)


class MqttView:
    """The node as MQTT sees it (`mqtt.service.NodeView`): what it may read and ask, no more."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.node_id = node.config.node.id
        self.latest: Mapping[str, Reading] = node.latest
        self.ledger = LedgerFace(node.ledger) if node.ledger is not None else None
        self.market = MarketFace(node.market) if node.market is not None else None

    @property
    def started(self) -> bool:
        return self._node.started.is_set()

    @property
    def safe_state_error(self) -> str | None:
        return self._node.safe_state_error

    def channels(self) -> list[Channel]:
        return [c for sensor in self._node.sensors.values() for c in sensor.channels]

    def channel_interval_s(self, channel: str) -> float | None:
        for sensor in self._node.sensors.values():
            if any(c.name == channel for c in sensor.channels):
                interval = getattr(sensor.config, "interval_s", None)
                return float(interval) if interval is not None else None
        return None

    def relay_names(self) -> tuple[str, ...]:
        relays = self._node.relays
        return tuple(relays.relays) if relays is not None else ()

    def relay_states(self) -> dict[str, dict[str, Any]]:
        relays = self._node.relays
        if relays is None:
            return {}
        return relays.snapshot()

    def rule_states(self) -> dict[str, dict[str, Any]] | None:
        return self._node.control.rule_states()

    def override(self, relay: str, mode: str, expires_s: float | None, reason: str) -> None:
        self._node.override(relay, mode, expires_s, reason)

    def add_counter(self, name: str, delta: int) -> None:
        self._node.store.add_counter(name, delta)

    def get_meta(self, key: str) -> Awaitable[str | None]:
        return self._node.store.get_meta(key)

    def set_meta(self, key: str, value: str) -> Awaitable[None]:
        return self._node.store.set_meta(key, value)


class LedgerFace:
    """The ledger as MQTT sees it (`mqtt.service.LedgerView`)."""

    def __init__(self, ledger: LedgerService) -> None:
        self._ledger = ledger
        self.relays_peers = bool(ledger.settings.relay_peers)

    async def state(self) -> dict[str, Any]:
        return await self._ledger.state()

    def on_sealed(self, callback: Callable[[Commitment, bytes], None]) -> None:
        self._ledger.on_sealed.append(callback)

    async def accept_peer(self, commitment: Commitment, signature: bytes) -> bool:
        return await self._ledger.accept_peer(commitment, signature)


class MarketFace:
    """The market as MQTT sees it: what `status` shows, as the retained `market` state."""

    def __init__(self, market: MarketService) -> None:
        self._market = market

    def state(self) -> dict[str, Any]:
        """The active order, its delivered and remaining Wh, and the credits when known."""
        full = self._market.status()
        keys = ("order_active", "active_order", "delivered_wh", "remaining_wh")
        state = {k: full[k] for k in keys}
        state["orders"] = len(full["orders"])
        return state

    def line_messages(self) -> dict[int, str]:
        """This node's retained proofs of its LINE orders' readings, by order id."""
        return self._market.line_messages()

    def on_line_message(self, peer_id: str, order_id: int, payload: bytes) -> None:
        self._market.on_line_message(peer_id, order_id, payload)
