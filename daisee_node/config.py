"""The node's one TOML file, validated into typed models.

`load_config` either returns a `Config` or raises `ConfigError` carrying every problem found, each
with its TOML path (`sensors[1].interval_s`) and a reason in plain words. Unknown keys are errors.
"""

from __future__ import annotations

import difflib
import graphlib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError, field_validator

from daisee_node.actuators.relays import GpioSection, RelayConfig
from daisee_node.delivery import CHANNELS as MARKET_CHANNELS
from daisee_node.errors import ConfigError, ConfigProblem
from daisee_node.ledger.chain_node import ChainNodeSection, file_problems, port_problems
from daisee_node.ledger.settings import (
    ADDRESS_PATTERN,
    ChainSection,
    MarketSection,
    http_url_problem,
)
from daisee_node.models import NAME_PATTERN, StrictModel, not_empty_path
from daisee_node.mqtt.settings import MqttSection
from daisee_node.paths import DEFAULT_CONFIG_PATH as DEFAULT_CONFIG_PATH  # re-exported
from daisee_node.peers import PREFIX as PEER_PREFIX
from daisee_node.peers import PeerConfig
from daisee_node.readings import CHANNEL_RE
from daisee_node.rules.engine import RuleConfig
from daisee_node.rules.expressions import TIME_NAMES, Expression, ExpressionError, check
from daisee_node.sensors import SENSOR_KINDS, SensorConfig
from daisee_node.sensors.simulated import SimulationConfig
from daisee_node.store import Retention

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
KEY_FILES = ("keystore", "password_file")

if TYPE_CHECKING:
    # Statically, every entry is a SensorConfig; at run time, the model of its `kind`.
    SensorEntry = SensorConfig
else:
    SensorEntry = Annotated[
        Union[tuple(cls.config_model for cls in SENSOR_KINDS.values())],  # noqa: UP007
        Field(discriminator="kind"),
    ]


class NodeSection(StrictModel):
    """`[node]`: who this node is and where it keeps its data."""

    id: str = Field(
        pattern=NODE_ID_PATTERN,
        description="lower-case letters, digits, '-' and '_'; used in MQTT topics",
    )
    data_dir: Path = Path("/var/lib/daisee-node")
    time_speed: float = Field(
        1.0,
        ge=1.0,
        le=1_000_000,
        description="demos and tests only: simulated time runs this many times faster",
    )
    time_start: datetime | None = Field(
        None, description="demos and tests only: simulated time starts here (default: now)"
    )

    _not_empty = field_validator("data_dir", mode="before")(not_empty_path)


class StoreSection(StrictModel):
    """`[store]`: the SQLite buffer."""

    raw_days: float = Field(14.0, gt=0, description="days raw readings are kept")
    aggregate_days: float = Field(365.0, gt=0, description="days 1-minute aggregates are kept")
    flush_interval_s: float = Field(
        0.25,
        gt=0,
        le=1.0,
        description="most time between two commits; what a kill -9 may lose",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full", description="'normal' is faster but may lose the last commits on a power cut"
    )
    max_pending_readings: int = Field(500_000, ge=1_000)
    events_days: float | None = Field(
        None, gt=0, description="days decisions and relay switches are kept (default: raw_days)"
    )
    integrity_interval_h: float = Field(
        24.0, gt=0, description="hours between full integrity checks (run in the background)"
    )

    def retention(self) -> Retention:
        return Retention(
            raw_days=self.raw_days,
            aggregate_days=self.aggregate_days,
            flush_interval_s=self.flush_interval_s,
            max_pending=self.max_pending_readings,
            events_days=self.events_days,
            integrity_interval_s=self.integrity_interval_h * 3600,
        )


class LogSection(StrictModel):
    """`[log]`: how the daemon logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: readable on a terminal, JSON lines otherwise"
    )


class Config(StrictModel):
    """The whole node configuration."""

    node: NodeSection
    store: StoreSection = StoreSection()
    log: LogSection = LogSection()
    simulation: SimulationConfig | None = None
    sensors: list[SensorEntry] = Field(default_factory=list)
    gpio: GpioSection = GpioSection()
    relays: list[RelayConfig] = Field(default_factory=list)
    derived: dict[str, str] = Field(
        default_factory=dict, description="named values computed from channels, for rules"
    )
    rules: list[RuleConfig] = Field(default_factory=list)
    chain: ChainSection | None = None
    chain_node: ChainNodeSection | None = None
    market: MarketSection | None = None
    mqtt: MqttSection | None = None
    peers: list[PeerConfig] = Field(
        default_factory=list, description="neighbours whose readings rules read as peer.<id>.…"
    )

    def channel_names(self) -> set[str]:
        """Every channel the configured sensors publish."""
        from daisee_node.clock import Clock
        from daisee_node.sensors import build_sensor
        from daisee_node.sensors.base import SensorContext

        ctx = SensorContext(Clock(), self.node.data_dir, self.simulation)
        return {c.name for s in self.sensors for c in build_sensor(s, ctx).channels}

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir


# -- loading ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], *, files: bool = False) -> Config:
    """Read and validate a config file. Relative paths in it are relative to the file.

    `files`: also check that the files the config names for programs other than the daemon
    (`[chain_node]`'s genesis, geth and data dir) can be used; their problems are listed with
    the others. The daemon does not need them, and a node's first boot starts it before the
    community's genesis is there."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        problem = ConfigProblem("", f"cannot read the file: {exc.strerror}")
        raise ConfigError(str(p), [problem]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(p), [ConfigProblem("", f"not UTF-8 text (byte {exc.start})")]
        ) from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent, files=files)


def parse_config(
    text: str, *, source: str = "<config>", base_dir: Path | None = None, files: bool = False
) -> Config:
    """Validate TOML text. Raises `ConfigError` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"TOML syntax error: {exc}")]) from None
    return config_from_dict(data, source=source, base_dir=base_dir, files=files)


def config_from_dict(
    data: dict[str, Any],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    files: bool = False,
) -> Config:
    """Validate already-parsed data (used by `demo`, which builds its config in code)."""
    nul = _nul_strings(data, "")
    if nul:
        # No setting has a use for NUL, and paths with one crash the OS calls that resolve them.
        raise ConfigError(source, [ConfigProblem(path, "contains a NUL character") for path in nul])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(err, data) for err in exc.errors()]
        raise ConfigError(source, problems) from None
    problems = _check_semantics(config)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    if files and config.chain_node is not None:
        problems += file_problems(config.chain_node)
    if problems:
        raise ConfigError(source, problems)
    return config


def _nul_strings(data: Any, path: str) -> list[str]:
    """TOML paths of the strings (keys included) that hold a NUL character."""
    found: list[str] = []
    if isinstance(data, str):
        return [path] if "\0" in data else []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            if "\0" in str(key):
                found.append(sub)
            found += _nul_strings(value, sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _nul_strings(value, f"{path}[{i}]")
    return found


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """Relative paths in the file are relative to the file's folder."""
    if not config.node.data_dir.is_absolute():
        data_dir = (base_dir / config.node.data_dir).resolve()
        node = config.node.model_copy(update={"data_dir": data_dir})
        config = config.model_copy(update={"node": node})
    # Secrets, keys and programs named by path, in the sections that have them. The chain
    # client's too: systemd starts it in /, not beside its config.
    for section, keys in (
        ("mqtt", ("password_file", "ca_file")),
        ("chain", KEY_FILES),
        ("chain_node", ("genesis", "data_dir", "geth")),
    ):
        model = getattr(config, section)
        if model is None:
            continue
        updates = {
            key: (base_dir / path).resolve()
            for key in keys
            if (path := getattr(model, key)) is not None and not path.is_absolute()
        }
        if updates:
            config = config.model_copy(update={section: model.model_copy(update=updates)})
    return config


def _unique(
    section: str, key: str, values: list[Any], message: Callable[[Any, int], str]
) -> list[ConfigProblem]:
    """A problem for each entry of a section that repeats an earlier one's `key`."""
    first: dict[Any, int] = {}
    problems = []
    for i, value in enumerate(values):
        if value in first:
            problems.append(ConfigProblem(f"{section}[{i}].{key}", message(value, first[value])))
        else:
            first[value] = i
    return problems


def _check_semantics(config: Config) -> list[ConfigProblem]:
    """Rules that span several keys."""
    problems: list[ConfigProblem] = []
    problems += _unique(
        "sensors",
        "name",
        [sensor.name for sensor in config.sensors],
        lambda v, j: f"{v!r} is already the name of sensors[{j}]; channel names would collide",
    )
    problems += _check_energy(config)
    problems += _check_relays_and_rules(config)
    problems += _check_chain(config)
    if config.chain_node is not None:
        problems += port_problems(config.chain_node)
    problems += _check_peers(config)
    problems += _check_market(config)
    if config.node.time_speed != 1.0 or config.node.time_start is not None:
        for i, sensor in enumerate(config.sensors):
            if sensor.kind != "simulated" and getattr(sensor, "bus", None) != "fake":
                problems.append(
                    ConfigProblem(
                        f"sensors[{i}].kind",
                        "simulated time (node.time_speed/time_start) needs every sensor to be "
                        "simulated or on the fake bus: real hardware runs on real time",
                    )
                )
    return problems


def _check_energy(config: Config) -> list[ConfigProblem]:
    """Each `energy` entry names a power channel of its sensor, and new counter names."""
    from daisee_node.clock import Clock
    from daisee_node.sensors.base import SensorContext

    problems: list[ConfigProblem] = []
    ctx = SensorContext(Clock(), config.node.data_dir, config.simulation)
    for i, sensor in enumerate(config.sensors):
        if not sensor.energy:
            continue
        channels = {c.name: c for c in SENSOR_KINDS[sensor.kind](sensor, ctx).channels}
        quantities = {name.partition(".")[2]: c for name, c in channels.items()}
        taken = dict.fromkeys(quantities, "a channel of the sensor")
        integrated: dict[str, str] = {}
        for j, spec in enumerate(sensor.energy):
            path = f"sensors[{i}].energy[{j}]"
            channel = quantities.get(spec.power)
            if spec.power in integrated:
                problems.append(
                    ConfigProblem(
                        f"{path}.power",
                        f"{spec.power} is already integrated by {integrated[spec.power]}; "
                        "name both counters in one entry",
                    )
                )
            integrated.setdefault(spec.power, path)
            if channel is None:
                watts = sorted(q for q, c in quantities.items() if c.unit == "W")
                hint = difflib.get_close_matches(spec.power, watts, n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else ""
                listed = f" (its power channels: {', '.join(watts)})" if watts and not hint else ""
                problems.append(
                    ConfigProblem(
                        f"{path}.power",
                        f"{sensor.name!r} has no channel {sensor.name}.{spec.power}{more}{listed}",
                    )
                )
            elif channel.unit != "W":
                problems.append(
                    ConfigProblem(
                        f"{path}.power",
                        f"{channel.name} is in {channel.unit or 'no unit'}, not W: only power "
                        "is integrated into energy",
                    )
                )
            for key in ("positive", "negative"):
                quantity = getattr(spec, key)
                if quantity is None:
                    continue
                if quantity in taken:
                    problems.append(
                        ConfigProblem(
                            f"{path}.{key}",
                            f"{sensor.name}.{quantity} is already {taken[quantity]}",
                        )
                    )
                else:
                    taken[quantity] = f"a counter of {path}"
    return problems


def _check_chain(config: Config) -> list[ConfigProblem]:
    chain = config.chain
    if chain is None:
        return []
    problems = []
    if chain.rpc_url != "embedded" and chain.ledger_address is None:
        problems.append(
            ConfigProblem("chain.ledger_address", "required unless rpc_url is 'embedded'")
        )
    if chain.rpc_url != "embedded" and (problem := http_url_problem(chain.rpc_url)):
        problems.append(ConfigProblem("chain.rpc_url", f"{problem}, or 'embedded'"))
    channels = config.channel_names() if chain.import_channel or chain.export_channel else set()
    for key in ("import_channel", "export_channel"):
        name = getattr(chain, key)
        if name is not None and name not in channels:
            hint = difflib.get_close_matches(name, sorted(channels), n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(ConfigProblem(f"chain.{key}", f"no sensor publishes {name!r}{more}"))
    return problems


def _check_peers(config: Config) -> list[ConfigProblem]:
    """Peers are other nodes, each with its own key, heard over MQTT; `peer.` names them."""
    if not config.peers:
        return []
    problems = _unique(
        "peers",
        "id",
        [p.id for p in config.peers],
        lambda v, j: f"{v!r} is already declared by peers[{j}]",
    )
    problems += _unique(
        "peers",
        "address",
        [p.address.lower() for p in config.peers],
        lambda v, j: f"{v} is already the key of peers[{j}]; each node has its own key",
    )
    for i, peer in enumerate(config.peers):
        if peer.id == config.node.id:
            problems.append(
                ConfigProblem(f"peers[{i}].id", f"{peer.id!r} is this node's own id (node.id)")
            )
        try:
            names = Expression(f"{PEER_PREFIX}{peer.id}.x.y > 0").names
        except ExpressionError:
            names = frozenset()
        if names != {f"{PEER_PREFIX}{peer.id}.x.y"}:
            problems.append(
                ConfigProblem(
                    f"peers[{i}].id",
                    f"{peer.id!r} is a word of the rule language; rules could not name this peer",
                )
            )
    if config.mqtt is None:
        problems.append(
            ConfigProblem("peers", "peers' readings come over MQTT: add an [mqtt] section")
        )
    for i, sensor in enumerate(config.sensors):
        if sensor.name == PEER_PREFIX.rstrip("."):
            problems.append(
                ConfigProblem(
                    f"sensors[{i}].name",
                    "'peer' names the neighbours' readings in rules ([[peers]]); "
                    "rename this sensor",
                )
            )
    for name in config.derived:
        if name.startswith(PEER_PREFIX):
            problems.append(
                ConfigProblem(
                    f"derived.{name}",
                    "'peer.' names the neighbours' readings in rules ([[peers]]); "
                    "rename this value",
                )
            )
    return problems


def _input_checker(
    config: Config, names: set[str]
) -> Callable[[str, Literal["condition", "number"]], list[str]]:
    """Checks an expression over `names`, the declared peers' inputs and, with `[market]`, the
    market's; peer and market names that cannot be read get a reason of their own."""
    peers = {p.id for p in config.peers}
    peer_names: list[str] = []
    market_names: list[str] = []

    def known(name: str) -> bool:
        if name in names:
            return True
        if name.startswith(PEER_PREFIX):
            peer_names.append(name)  # checked apart, with a reason of its own
            return True
        if name in MARKET_CHANNELS:
            market_names.append(name)
            return True
        return False

    def checked(text: str, result: Literal["condition", "number"]) -> list[str]:
        peer_names.clear()
        market_names.clear()
        found = check(text, known, result=result)
        found += _peer_problems(peer_names, peers)
        if config.market is None:
            found += [
                f"{name}: the market's inputs need a [market] section" for name in market_names
            ]
        return found

    return checked


def _check_market(config: Config) -> list[ConfigProblem]:
    """`[market]` acts on the chain with the node key; its channels, peers and buy entries."""
    market = config.market
    if market is None:
        return []
    problems: list[ConfigProblem] = []
    if config.chain is None:
        problems.append(
            ConfigProblem("market", "the market is on the chain, with the node key: add [chain]")
        )
    peers = {p.id for p in config.peers}
    declared = f" (declared: {', '.join(sorted(peers))})" if peers else " (none declared)"
    for i, who in enumerate(market.accept_from):
        if who not in peers and not re.match(ADDRESS_PATTERN, who):
            problems.append(
                ConfigProblem(
                    f"market.accept_from[{i}]",
                    f"{who!r} is neither a [[peers]] id{declared} nor a 0x… address",
                )
            )
    channels = config.channel_names()
    for key in ("battery_channel", "seller_meter", "buyer_meter", "line_meter"):
        name = getattr(market, key)
        if name is not None and name not in channels:
            hint = difflib.get_close_matches(name, sorted(channels), n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(ConfigProblem(f"market.{key}", f"no sensor publishes {name!r}{more}"))
    if market.keep_battery_above_pct is not None and market.battery_channel is None:
        problems.append(
            ConfigProblem(
                "market.battery_channel",
                "keep_battery_above_pct needs the battery's channel, e.g. 'battery.soc_pct'",
            )
        )
    problems += _unique(
        "market.buy",
        "name",
        [b.name for b in market.buy],
        lambda v, j: f"{v!r} is already the name of market.buy[{j}]",
    )
    checked = _input_checker(config, channels)
    for i, entry in enumerate(market.buy):
        if entry.seller not in peers:
            problems.append(
                ConfigProblem(
                    f"market.buy[{i}].seller",
                    f"{entry.seller!r} is not a declared peer{declared}; add it to [[peers]]",
                )
            )
        problems += [
            ConfigProblem(f"market.buy[{i}].when", p) for p in checked(entry.when, "condition")
        ]
        if entry.mode == "line" and market.line_meter is None:
            problems.append(
                ConfigProblem(
                    f"market.buy[{i}].mode",
                    "buying over the line needs market.line_meter, the line's counter at this "
                    "end, e.g. 'line.import_wh'",
                )
            )
    if any(b.mode == "grid" for b in market.buy) and market.buyer_meter is None:
        problems.append(
            ConfigProblem(
                "market.buyer_meter",
                "[[market.buy]] needs the counter that meters what the node buys, "
                "e.g. 'grid.import_wh'",
            )
        )
    return problems


def _peer_problems(names: list[str], peers: set[str]) -> list[str]:
    """What is wrong with the `peer.…` names an expression reads, in words."""
    problems = []
    for name in sorted(set(names)):
        pid, _, channel = name[len(PEER_PREFIX) :].partition(".")
        if pid not in peers:
            declared = f" (declared: {', '.join(sorted(peers))})" if peers else ""
            problems.append(
                f"{name}: {pid!r} is not a declared peer; add it to [[peers]]{declared}"
            )
        elif not CHANNEL_RE.match(channel):
            problems.append(
                f"{name}: a peer input is named peer.<node>.<sensor>.<quantity>, "
                f"e.g. peer.{pid}.pv.power_w"
            )
    return problems


def _derived_cycles(derived: dict[str, str]) -> list[ConfigProblem]:
    """Derived values that depend on each other in a circle can never be computed."""
    graph: dict[str, set[str]] = {}
    for name, text in derived.items():
        try:
            graph[name] = set(Expression(text).names) & derived.keys()
        except ExpressionError:
            continue  # already listed as a problem of its own
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        circle = exc.args[1]
        return [
            ConfigProblem(
                f"derived.{circle[0]}",
                "derived values depend on each other in a circle: " + " → ".join(circle),
            )
        ]
    return []


def _check_relays_and_rules(config: Config) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    relays = {relay.name for relay in config.relays}
    problems += _unique(
        "relays",
        "name",
        [r.name for r in config.relays],
        lambda v, j: f"{v!r} is already the name of relays[{j}]",
    )
    problems += _unique(
        "relays",
        "pin",
        [r.pin for r in config.relays],
        lambda v, j: f"GPIO{v} is already used by relays[{j}]",
    )
    safe_on: dict[str, int] = {}
    for i, relay in enumerate(config.relays):
        if relay.group is None or relay.safe_state != "on":
            continue
        if relay.group in safe_on:
            problems.append(
                ConfigProblem(
                    f"relays[{i}].safe_state",
                    f"relays[{safe_on[relay.group]}] of group {relay.group!r} is already safe "
                    "'on': a group can have only one relay closed in its safe state",
                )
            )
        else:
            safe_on[relay.group] = i
    sim = config.simulation
    if sim is not None and sim.external_supply_relay and sim.external_supply_relay not in relays:
        problems.append(
            ConfigProblem(
                "simulation.external_supply_relay", f"no relay named {sim.external_supply_relay!r}"
            )
        )
    channels = config.channel_names()
    derived = set(config.derived)
    checked = _input_checker(config, channels | derived | set(TIME_NAMES))

    for name, text in config.derived.items():
        if name in channels:
            problems.append(ConfigProblem(f"derived.{name}", "a sensor already has this channel"))
        elif not CHANNEL_RE.match(name):
            problems.append(
                ConfigProblem(
                    f"derived.{name}", "must be named like a channel, e.g. 'home.surplus_w'"
                )
            )
        problems += [ConfigProblem(f"derived.{name}", p) for p in checked(text, "number")]
    problems += _derived_cycles(config.derived)
    problems += _unique(
        "rules",
        "name",
        [rule.name for rule in config.rules],
        lambda v, j: f"{v!r} is already the name of rules[{j}]",
    )
    for i, rule in enumerate(config.rules):
        for key in ("when", "until"):
            text = getattr(rule, key)
            if text is not None:
                problems += [
                    ConfigProblem(f"rules[{i}].{key}", p) for p in checked(text, "condition")
                ]
        for key in ("then", "otherwise"):
            action = getattr(rule, key)
            if action is not None and action.relay not in relays:
                problems.append(
                    ConfigProblem(f"rules[{i}].{key}.relay", f"no relay named {action.relay!r}")
                )
    return problems


# -- turning pydantic errors into plain words ---------------------------------------------------


_PATTERN_WORDS = {
    NODE_ID_PATTERN: "lower-case letters, digits, '-' and '_', starting with a letter or digit, "
    "at most 64 characters",
    NAME_PATTERN: "lower-case letters, digits and '_', starting with a letter",
}


def _problem(err: Any, data: Any) -> ConfigProblem:
    loc: tuple[Any, ...] = tuple(err["loc"])
    path, parent_model = _walk(loc, data)
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        message = "unknown key"
        if parent_model is not None:
            close = difflib.get_close_matches(key, list(parent_model.model_fields), n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
            else:
                message += f"; expected one of: {', '.join(parent_model.model_fields)}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") in _PATTERN_WORDS:
        message = f"must be {_PATTERN_WORDS[err['ctx']['pattern']]} (got {err['input']!r})"
    elif kind == "union_tag_not_found":
        message = f"missing key 'kind' (one of: {', '.join(SENSOR_KINDS)})"
    elif kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        message = f"unknown kind {tag!r}; expected one of: {', '.join(SENSOR_KINDS)}"
    else:
        msg = str(err["msg"])
        message = msg[:1].lower() + msg[1:]
        # a value is shown as given; a whole table (a check across its keys) is not repeated
        shown = "input" in err and not isinstance(err["input"], dict)
        if shown and kind not in ("model_type", "dict_type"):
            message += f" (got {err['input']!r})"
    return ConfigProblem(path, message)


def _walk(loc: tuple[Any, ...], data: Any) -> tuple[str, type[BaseModel] | None]:
    """The TOML path of a pydantic location, and the model that holds its last key."""
    parts: list[str] = []
    annotation: Any = Config
    node: Any = data
    parent: type[BaseModel] | None = Config
    i = 0
    while i < len(loc):
        key = loc[i]
        model = _as_model(annotation, node)
        if isinstance(key, int):
            if parts:
                parts[-1] += f"[{key}]"
            else:
                parts.append(f"[{key}]")
            annotation = _list_item(annotation)
            node = node[key] if isinstance(node, list) and key < len(node) else None
            # A discriminated union adds the tag (the sensor's kind) to the location: skip it.
            if i + 1 < len(loc) and isinstance(node, dict) and loc[i + 1] == node.get("kind"):
                i += 1
        else:
            parent = model
            parts.append(str(key))
            field = model.model_fields.get(str(key)) if model is not None else None
            annotation = field.annotation if field is not None else None
            node = node.get(key) if isinstance(node, dict) else None
        i += 1
    return ".".join(parts), parent


def _list_item(annotation: Any) -> Any:
    args = typing.get_args(_strip(annotation))
    return args[0] if args else None


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _as_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The model class an annotation stands for, picking a union member by the data's `kind`."""
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [_strip(a) for a in typing.get_args(annotation)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(models) == 1:
            return models[0]
        kind = node.get("kind") if isinstance(node, dict) else None
        for m in models:
            field = m.model_fields.get("kind")
            if field is not None and kind in typing.get_args(field.annotation):
                return m
    return None
