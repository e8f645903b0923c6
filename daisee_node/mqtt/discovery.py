"""Home Assistant MQTT discovery: one device per node, a sensor per channel, a switch per relay."""

from __future__ import annotations

import re
from typing import Any

from daisee_node import __version__
from daisee_node.readings import Channel

# unit → Home Assistant device class (the energy dashboard needs "energy" + total_increasing)
DEVICE_CLASSES = {
    "W": "power",
    "kW": "power",
    "Wh": "energy",
    "kWh": "energy",
    "V": "voltage",
    "A": "current",
    "Hz": "frequency",
    "°C": "temperature",
    "VA": "apparent_power",
    "var": "reactive_power",
}


def object_id(name: str) -> str:
    """A name made safe for a discovery topic and a unique id."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)


def device(node_id: str) -> dict[str, Any]:
    return {
        "identifiers": [f"daisee_{node_id}"],
        "name": f"DAISEE node {node_id}",
        "manufacturer": "DAISEE",
        "model": "daisee-node",
        "sw_version": __version__,
    }


def sensor_config(node_id: str, base: str, channel: Channel) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": channel.name,
        "unique_id": f"daisee_{node_id}_{object_id(channel.name)}",
        "object_id": f"daisee_{node_id}_{object_id(channel.name)}",
        "state_topic": f"{base}/reading/{channel.name}",
        "availability_topic": f"{base}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "state_class": channel.state_class,
        "device": device(node_id),
    }
    if channel.unit:
        config["unit_of_measurement"] = channel.unit
    device_class = DEVICE_CLASSES.get(channel.unit)
    if channel.unit == "%" and channel.name.endswith("soc_pct"):
        device_class = "battery"
    if device_class:
        config["device_class"] = device_class
    return config


def switch_config(node_id: str, base: str, relay: str) -> dict[str, Any]:
    return {
        "name": relay,
        "unique_id": f"daisee_{node_id}_relay_{object_id(relay)}",
        "object_id": f"daisee_{node_id}_relay_{object_id(relay)}",
        "state_topic": f"{base}/relay/{relay}",
        "command_topic": f"{base}/relay/{relay}/set",
        "json_attributes_topic": f"{base}/relay/{relay}/attributes",
        "payload_on": "ON",
        "payload_off": "OFF",
        "availability_topic": f"{base}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device(node_id),
    }


def config_topic(prefix: str, component: str, node_id: str, name: str) -> str:
    return f"{prefix}/{component}/daisee_{node_id}/{object_id(name)}/config"
