"""Sources of readings, one module per kind. See `base.Sensor` for the contract."""

from __future__ import annotations

from daisee_node.sensors.ads1115 import Ads1115Sensor
from daisee_node.sensors.base import Sensor, SensorConfig, SensorContext
from daisee_node.sensors.http_json import HttpJsonSensor
from daisee_node.sensors.modbus_meter import ModbusMeter
from daisee_node.sensors.simulated import SimulatedSensor

#: kind → driver class. A driver's config model is `cls.config_model`.
SENSOR_KINDS: dict[str, type[Sensor]] = {
    SimulatedSensor.kind: SimulatedSensor,
    Ads1115Sensor.kind: Ads1115Sensor,
    ModbusMeter.kind: ModbusMeter,
    HttpJsonSensor.kind: HttpJsonSensor,
}


def build_sensor(config: SensorConfig, ctx: SensorContext) -> Sensor:
    """The driver for one `[[sensors]]` entry (with the Wh counters its `energy` asks for)."""
    sensor = SENSOR_KINDS[config.kind](config, ctx)
    if config.energy:
        from daisee_node.sensors.energy import EnergySensor

        return EnergySensor(sensor)
    return sensor


__all__ = ["SENSOR_KINDS", "Sensor", "SensorConfig", "SensorContext", "build_sensor"]
