"""Home Assistant MQTT discovery: one device per node.

Entities: a sensor per channel; per relay a switch, a mode select (auto / on / off), an override
duration (number) and when the override ends (timestamp); per rule whether it is active
(binary sensor) and why (diagnostic sensor); the ledger's backlog, last sealed and confirmed
periods and, when the ledger reports it, the energy credit balance (diagnostic sensors).

Every relay control writes to `relay/<name>/set`, the one topic a Home Assistant login needs
the right to write. Entity ids are given with `default_entity_id` (`object_id` is ignored by
Home Assistant from 2026.4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daisee_node import __version__
from daisee_node.readings import Channel

# unit → Home Assistant device class (the energy dashboard needs "energy" + total_increasing)
DEVICE_CLASSES = {
    "W": "power",
    "kW": "power",
    "Wh": "energy",
    "kWh": "energy",
    "MWh": "energy",
    "V": "voltage",
    "A": "current",
    "Hz": "frequency",
    "°C": "temperature",
    "VA": "apparent_power",
    "var": "reactive_power",
}

#: digits shown after the decimal point, by unit (the value published stays exact)
DISPLAY_PRECISION = {
    "W": 0,
    "kW": 3,
    "Wh": 0,
    "kWh": 3,
    "MWh": 3,
    "V": 1,
    "A": 2,
    "Hz": 2,
    "°C": 1,
    "%": 0,
    "VA": 0,
    "var": 0,
}

#: the quantity part of a channel name (`battery.soc_pct` → `soc_pct`) as people say it
QUANTITIES = {
    "power_w": "power",
    "power_kw": "power",
    "import_wh": "energy imported",
    "export_wh": "energy exported",
    "import_kwh": "energy imported",
    "export_kwh": "energy exported",
    "energy_wh": "energy",
    "energy_kwh": "energy",
    "charge_wh": "energy charged",
    "discharge_wh": "energy discharged",
    "current_a": "current",
    "voltage_v": "voltage",
    "soc_pct": "state of charge",
    "frequency_hz": "frequency",
    "temperature_c": "temperature",
    "surplus_w": "surplus",
    "power_factor": "power factor",
}

#: unit suffixes of channel names, left out of a name made from the parts
UNIT_SUFFIXES = ("w", "kw", "wh", "kwh", "mwh", "a", "v", "pct", "hz", "c", "va", "var", "s")

#: source names that are initials
ACRONYMS = {"pv": "PV", "ev": "EV", "dhw": "DHW", "hp": "HP", "ac": "AC", "dc": "DC"}

ORIGIN = {"name": "daisee-node", "sw_version": __version__}

RELAY_MODES = ("auto", "on", "off")
#: the longest override duration Home Assistant offers, in minutes (7 days, as commands allow)
MAX_DURATION_MIN = 7 * 24 * 60


@dataclass(frozen=True)
class LedgerField:
    """One number of the retained ledger state shown as its own entity."""

    key: str
    name: str
    icon: str
    unit: str | None = None


LEDGER_FIELDS = (
    LedgerField("backlog", "Ledger backlog", "mdi:tray-full", "periods"),
    LedgerField("sealed_seq", "Last sealed period", "mdi:lock-check"),
    LedgerField("confirmed_seq", "Last confirmed period", "mdi:check-decagram"),
    LedgerField("credit_balance", "Energy credit balance", "mdi:piggy-bank", "credits"),
)


#: the retained `market` state's numbers, each its own entity (nodes with a `[market]`)
MARKET_FIELDS = (
    LedgerField("active_order", "Active energy order", "mdi:transmission-tower-export"),
    LedgerField("delivered_wh", "Energy order delivered", "mdi:counter", "Wh"),
    LedgerField("remaining_wh", "Energy order remaining", "mdi:timer-sand", "Wh"),
)


def object_id(name: str) -> str:
    """A name made safe for a discovery topic and a unique id."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)


def entity_id_part(name: str) -> str:
    """A name made safe for the object part of a Home Assistant entity id (`[a-z0-9_]`)."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", name.lower())).strip("_")


def readable(channel: str) -> str:
    """A channel name as people say it: `battery.soc_pct` → `Battery state of charge`."""
    *sources, quantity = channel.split(".")
    words = [ACRONYMS.get(s, s.replace("_", " ")) for s in sources]
    spoken = QUANTITIES.get(quantity)
    if spoken is None:
        stem, _, suffix = quantity.rpartition("_")
        spoken = (stem if stem and suffix in UNIT_SUFFIXES else quantity).replace("_", " ")
    text = " ".join([*words, spoken])
    return text[:1].upper() + text[1:]


def _title(name: str) -> str:
    """A relay or rule name (`supply_neighbour`, `buy-when-low`) as a title."""
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


def device(node_id: str) -> dict[str, Any]:
    """The one Home Assistant device a node is."""
    return {
        "identifiers": [f"daisee_{node_id}"],
        "name": f"DAISEE node {node_id}",
        "manufacturer": "DAISEE",
        "model": "daisee-node",
        "sw_version": __version__,
    }


def _common(node_id: str, base: str, component: str, key: str) -> dict[str, Any]:
    """What every entity of the node has: ids, availability (the node's status), device."""
    uid = f"daisee_{node_id}_{object_id(key)}"
    return {
        "unique_id": uid,
        "default_entity_id": f"{component}.{entity_id_part(uid)}",
        "availability_topic": f"{base}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device(node_id),
        "origin": ORIGIN,
    }


def expire_after_s(publish_every_s: float) -> int:
    """How long Home Assistant keeps a reading without a newer one before it shows the entity
    unavailable: three missed publications plus a margin, so one late message is no outage."""
    return max(15, math.ceil(3 * publish_every_s + 5))


def sensor_config(
    node_id: str, base: str, channel: Channel, publish_every_s: float | None = None
) -> dict[str, Any]:
    """A channel's sensor. A failed read publishes nothing: after `expire_after` (set when
    `publish_every_s` is known) Home Assistant shows it unavailable, until the next good one."""
    config: dict[str, Any] = {
        "name": readable(channel.name),
        **_common(node_id, base, "sensor", channel.name),
        "state_topic": f"{base}/reading/{channel.name}",
        "state_class": channel.state_class,
    }
    if publish_every_s is not None:
        config["expire_after"] = expire_after_s(publish_every_s)
    if channel.unit:
        config["unit_of_measurement"] = channel.unit
    device_class = DEVICE_CLASSES.get(channel.unit)
    if channel.unit == "%" and channel.name.endswith("soc_pct"):
        device_class = "battery"
    if device_class:
        config["device_class"] = device_class
    precision = DISPLAY_PRECISION.get(channel.unit)
    if precision is not None:
        config["suggested_display_precision"] = precision
    return config


def switch_config(node_id: str, base: str, relay: str) -> dict[str, Any]:
    """The relay itself: ON / OFF for the override duration the relay's number entity sets."""
    return {
        "name": _title(relay),
        **_common(node_id, base, "switch", f"relay_{relay}"),
        "state_topic": f"{base}/relay/{relay}",
        "command_topic": f"{base}/relay/{relay}/set",
        "json_attributes_topic": f"{base}/relay/{relay}/attributes",
        "payload_on": "ON",
        "payload_off": "OFF",
        "icon": "mdi:electric-switch",
    }


def mode_select_config(node_id: str, base: str, relay: str) -> dict[str, Any]:
    """The relay's mode: `auto` gives it back to the rules, `on` / `off` override them."""
    return {
        "name": f"{_title(relay)} mode",
        **_common(node_id, base, "select", f"relay_{relay}_mode"),
        "state_topic": f"{base}/relay/{relay}/attributes",
        "value_template": "{{ value_json.mode }}",
        "command_topic": f"{base}/relay/{relay}/set",
        "command_template": "{{ value | upper }}",
        "options": list(RELAY_MODES),
        "icon": "mdi:auto-mode",
    }


def duration_number_config(node_id: str, base: str, relay: str) -> dict[str, Any]:
    """How long an ON / OFF without an expiry lasts before the rules take over (0: until AUTO)."""
    return {
        "name": f"{_title(relay)} override duration",
        **_common(node_id, base, "number", f"relay_{relay}_override_duration"),
        "state_topic": f"{base}/relay/{relay}/attributes",
        "value_template": "{{ ((value_json.override_duration_s or 0) / 60) | round(0) | int }}",
        "command_topic": f"{base}/relay/{relay}/set",
        "command_template": '{"override_duration_s": {{ (value * 60) | round(0) | int }}}',
        "min": 0,
        "max": MAX_DURATION_MIN,
        "step": 1,
        "mode": "box",
        "unit_of_measurement": "min",
        "device_class": "duration",
        "entity_category": "config",
        "icon": "mdi:timer-cog-outline",
    }


def override_end_config(node_id: str, base: str, relay: str) -> dict[str, Any]:
    """When the relay's override runs out (unknown while there is none, or it has no end)."""
    return {
        "name": f"{_title(relay)} override ends",
        **_common(node_id, base, "sensor", f"relay_{relay}_override_ends"),
        "state_topic": f"{base}/relay/{relay}/attributes",
        "value_template": "{{ value_json.override_ends or 'None' }}",
        "device_class": "timestamp",
        "icon": "mdi:timer-sand",
    }


def rule_active_config(node_id: str, base: str, rule: str) -> dict[str, Any]:
    """Whether a rule's condition holds (its JSON state as attributes)."""
    return {
        "name": f"Rule {rule}",
        **_common(node_id, base, "binary_sensor", f"rule_{rule}"),
        "state_topic": f"{base}/rule/{rule}",
        "value_template": "{{ 'ON' if value_json.active else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "json_attributes_topic": f"{base}/rule/{rule}",
        "icon": "mdi:script-text-outline",
    }


def rule_reason_config(node_id: str, base: str, rule: str) -> dict[str, Any]:
    """Why a rule is active or not, or why it failed (a state is at most 255 characters)."""
    return {
        "name": f"Rule {rule} reason",
        **_common(node_id, base, "sensor", f"rule_{rule}_reason"),
        "state_topic": f"{base}/rule/{rule}",
        "value_template": "{{ ((value_json.error or value_json.reason or '-') | string)[:250] }}",
        "entity_category": "diagnostic",
        "icon": "mdi:comment-question-outline",
    }


def ledger_config(node_id: str, base: str, field: LedgerField) -> dict[str, Any]:
    """One number of the retained ledger state (unknown while the ledger has none yet)."""
    config: dict[str, Any] = {
        "name": field.name,
        **_common(node_id, base, "sensor", f"ledger_{field.key}"),
        "state_topic": f"{base}/ledger",
        "value_template": (
            f"{{{{ value_json.{field.key} if value_json.{field.key} is not none else 'None' }}}}"
        ),
        "state_class": "measurement",
        "entity_category": "diagnostic",
        "icon": field.icon,
    }
    if field.unit:
        config["unit_of_measurement"] = field.unit
    return config


def market_config(node_id: str, base: str, field: LedgerField) -> dict[str, Any]:
    """One number of the retained market state (unknown while no order flows: 'None')."""
    config = ledger_config(node_id, base, field)
    config.update(_common(node_id, base, "sensor", f"market_{field.key}"))
    config["state_topic"] = f"{base}/market"
    del config["entity_category"]  # what the node buys or sells is no diagnostic
    return config


def config_topic(prefix: str, component: str, node_id: str, name: str) -> str:
    return f"{prefix}/{component}/daisee_{node_id}/{object_id(name)}/config"


@dataclass(frozen=True)
class Entity:
    """One discovery message, and the retained state topics that go with it (cleared with it)."""

    topic: str
    config: dict[str, Any]
    state_topics: tuple[str, ...] = ()


def entities(
    prefix: str,
    node_id: str,
    base: str,
    channels: Iterable[tuple[Channel, float | None]],
    relays: Iterable[str],
    rules: Iterable[str],
    ledger_keys: Iterable[str] | None,
    market: bool = False,
) -> list[Entity]:
    """Every entity of a node: channels with how often each is published, relays, rules, the
    ledger's fields present in its state (None: the node has no ledger) and, with `market`,
    the market's active order and its delivered and remaining Wh."""
    out: list[Entity] = []
    for channel, every in channels:
        out.append(
            Entity(
                config_topic(prefix, "sensor", node_id, channel.name),
                sensor_config(node_id, base, channel, every),
                (f"{base}/reading/{channel.name}",),
            )
        )
    for relay in relays:
        own = (f"{base}/relay/{relay}", f"{base}/relay/{relay}/attributes")
        out += [
            Entity(
                config_topic(prefix, "switch", node_id, relay),
                switch_config(node_id, base, relay),
                own,
            ),
            Entity(
                config_topic(prefix, "select", node_id, f"{relay}_mode"),
                mode_select_config(node_id, base, relay),
            ),
            Entity(
                config_topic(prefix, "number", node_id, f"{relay}_override_duration"),
                duration_number_config(node_id, base, relay),
            ),
            Entity(
                config_topic(prefix, "sensor", node_id, f"relay_{relay}_override_ends"),
                override_end_config(node_id, base, relay),
            ),
        ]
    for rule in rules:
        out += [
            Entity(
                config_topic(prefix, "binary_sensor", node_id, f"rule_{rule}"),
                rule_active_config(node_id, base, rule),
                (f"{base}/rule/{rule}",),
            ),
            Entity(
                config_topic(prefix, "sensor", node_id, f"rule_{rule}_reason"),
                rule_reason_config(node_id, base, rule),
            ),
        ]
    if ledger_keys is not None:
        keys = set(ledger_keys)
        for field in LEDGER_FIELDS:
            if field.key in keys:
                # the backlog is always there: the ledger's retained state goes with it
                owns = (f"{base}/ledger",) if field.key == "backlog" else ()
                out.append(
                    Entity(
                        config_topic(prefix, "sensor", node_id, f"ledger_{field.key}"),
                        ledger_config(node_id, base, field),
                        owns,
                    )
                )
    if market:
        for field in MARKET_FIELDS:
            out.append(
                Entity(
                    config_topic(prefix, "sensor", node_id, f"market_{field.key}"),
                    market_config(node_id, base, field),
                    (f"{base}/market",) if field.key == "active_order" else (),
                )
            )
    return out
