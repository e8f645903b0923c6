"""Config validation: every problem at once, each with its TOML path; examples stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from daisee_node.config import load_config, parse_config
from daisee_node.errors import ConfigError
from tests.conftest import ROOT, run_cli

EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return {p.path: p.message for p in info.value.problems}


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ must hold at least one config"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.node.id
    assert config.sensors
    # Relative data dirs are anchored at the file, not at whatever directory we run from.
    assert config.node.data_dir.is_absolute()


def test_minimal_config_gets_defaults() -> None:
    config = parse_config('[node]\nid = "house-3"\n')
    assert config.node.data_dir == Path("/var/lib/daisee-node")
    assert config.store.flush_interval_s <= 1.0
    assert config.sensors == []


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems_of(
        """
[node]
id = "House 3"
data_dirr = "/tmp/x"

[store]
raw_days = -1

[[sensors]]
name = "pv"
kind = "simulated"
model = "sun"
intervl_s = 2

[[sensors]]
name = "meter"
kind = "teleporter"

[[sensors]]
name = "grid"

[bogus]
x = 1
"""
    )
    assert set(found) == {
        "node.id",
        "node.data_dirr",
        "store.raw_days",
        "sensors[0].model",
        "sensors[0].intervl_s",
        "sensors[1]",
        "sensors[2]",
        "bogus",
    }
    assert "did you mean 'data_dir'" in found["node.data_dirr"]
    assert "did you mean 'interval_s'" in found["sensors[0].intervl_s"]
    assert "teleporter" in found["sensors[1]"] and "simulated" in found["sensors[1]"]
    assert "kind" in found["sensors[2]"]
    assert "unknown key" in found["bogus"]
    assert "'House 3'" in found["node.id"]


def test_missing_node_id_is_reported() -> None:
    assert "node" in problems_of("[store]\nraw_days = 3\n")
    assert "node.id" in problems_of("[node]\ndata_dir = '/tmp'\n")


def test_duplicate_sensor_names_collide() -> None:
    found = problems_of(
        """
[node]
id = "a"
[[sensors]]
name = "pv"
kind = "simulated"
model = "pv"
[[sensors]]
name = "pv"
kind = "simulated"
model = "load"
"""
    )
    assert list(found) == ["sensors[1].name"]
    assert "sensors[0]" in found["sensors[1].name"]


def test_flush_interval_cannot_promise_more_than_a_second_of_loss() -> None:
    assert "store.flush_interval_s" in problems_of("[node]\nid='a'\n[store]\nflush_interval_s=5\n")


def test_toml_syntax_error_shows_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[node]\nid = "a"\nbroken = = 1\n')
    text = str(info.value.problems[0])
    assert "line 3" in text and "column" in text


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "cannot read" in str(info.value)


def test_binary_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert "UTF-8" in str(info.value)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = run_cli("check-config", str(EXAMPLES[0]))
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "BAD ID"\n[[sensors]]\nname = "x"\nkind = "nope"\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert "node.id" in result.stderr and "sensors[0]" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout

    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[node\n")
    result = run_cli("check-config", str(syntax))
    assert result.returncode == 2
    assert "line 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "x"\n[store]\nraw_days = "many"\n')
    result = run_cli("run", "-c", str(bad))
    assert result.returncode == 2
    assert "store.raw_days" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    from daisee_node import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_rule_and_relay_mistakes_are_config_errors() -> None:
    found = problems_of(
        """
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
[[relays]]
name = "supply"
pin = 17
[[relays]]
name = "pump"
pin = 17
[derived]
"home.double_w" = "battery.power_w * 2"
[[rules]]
name = "low"
when = "battery.soc_pct < 20 and peer.solar.surplus_w > 50"
then = { relay = "supply", state = "on" }
otherwise = { relay = "boiler", state = "off" }
[[rules]]
name = "broken"
when = "battery.soc_pct <"
then = { relay = "supply", state = "on" }
[[rules]]
name = "fine"
when = "home.double_w > 100 and time.hour >= 18"
until = "battery.soc_pct > 90"
then = { relay = "pump", state = "on" }
"""
    )
    assert set(found) == {
        "relays[1].pin",
        "rules[0].when",
        "rules[0].otherwise.relay",
        "rules[1].when",
    }
    assert "peer.solar.surplus_w" in found["rules[0].when"]
    assert "boiler" in found["rules[0].otherwise.relay"]
    assert "syntax" in found["rules[1].when"]


CHAIN_AND_MQTT_MISTAKES = """
[node]
id = "n1"

[[sensors]]
name = "grid"
kind = "simulated"
model = "grid"

[mqtt]
port = 70000
tls = "yes please"

[chain]
rpc_url = "ws://chain:8546"
perod_s = 900
period_s = 5
export_channel = "grid.exprt_wh"
"""


def test_chain_and_mqtt_mistakes_are_listed_with_their_paths() -> None:
    problems = problems_of(CHAIN_AND_MQTT_MISTAKES)
    assert "mqtt.port" in problems and "mqtt.tls" in problems
    assert "chain.perod_s" in problems and "period_s" in problems["chain.perod_s"]
    assert "chain.period_s" in problems


def test_chain_settings_across_sections_are_checked() -> None:
    text = CHAIN_AND_MQTT_MISTAKES.replace('port = 70000\ntls = "yes please"\n', "")
    text = text.replace("perod_s = 900\nperiod_s = 5\n", "")
    problems = problems_of(text)
    assert "http(s)" in problems["chain.rpc_url"]
    assert "required" in problems["chain.ledger_address"]
    assert "grid.export_wh" in problems["chain.export_channel"]  # did you mean


def test_check_config_lists_chain_mistakes_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(CHAIN_AND_MQTT_MISTAKES)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "chain.perod_s" in result.stderr and "mqtt.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_key_and_password_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "node.toml"
    path.parent.mkdir()
    path.write_text(
        '[node]\nid = "n1"\n'
        '[mqtt]\npassword_file = "mqtt.pass"\nca_file = "/etc/ssl/ca.pem"\n'
        '[chain]\nrpc_url = "embedded"\nkeystore = "keys/node.json"\n'
    )
    config = load_config(path)
    assert config.mqtt is not None and config.chain is not None
    assert config.mqtt.password_file == tmp_path / "etc" / "mqtt.pass"
    assert config.mqtt.ca_file == Path("/etc/ssl/ca.pem")
    assert config.chain.keystore == tmp_path / "etc" / "keys" / "node.json"
    # unset: next to the data, which is where `keys new` puts them
    assert config.chain.password_path(config.data_dir) == config.data_dir / "node-key.pass"


def test_a_group_has_at_most_one_relay_closed_in_its_safe_state() -> None:
    found = problems_of(
        """
[node]
id = "a"
[[relays]]
name = "supply_own"
pin = 17
group = "supply"
safe_state = "on"
[[relays]]
name = "supply_grid"
pin = 27
group = "supply"
safe_state = "on"
[[relays]]
name = "boiler"
pin = 22
safe_state = "on"
"""
    )
    assert list(found) == ["relays[1].safe_state"]
    assert (
        "relays[0]" in found["relays[1].safe_state"] and "'supply'" in found["relays[1].safe_state"]
    )


def test_derived_values_in_a_circle_and_wrong_kinds_are_listed() -> None:
    found = problems_of(
        """
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
[[relays]]
name = "supply"
pin = 17
[derived]
"home.a_w" = "home.b_w + 1"
"home.b_w" = "home.a_w * 2"
"home.flag_w" = "battery.soc_pct > 20"
[[rules]]
name = "low"
when = "battery.soc_pct + 1"
then = { relay = "supply", state = "on" }
"""
    )
    circle = [path for path, message in found.items() if "circle" in message]
    assert circle and circle[0] in ("derived.home.a_w", "derived.home.b_w")
    assert "derived.home.flag_w" in found
    assert "rules[0].when" in found


def test_store_retention_settings_reach_the_store() -> None:
    config = parse_config('[node]\nid = "a"\n[store]\nevents_days = 30\nintegrity_interval_h = 6\n')
    retention = config.store.retention()
    assert retention.events_days == 30 and retention.integrity_interval_s == 6 * 3600


# -- energy counters integrated from power channels ---------------------------------------------


def test_energy_counters_become_channels_rules_and_the_ledger_can_name() -> None:
    config = parse_config(
        """
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
energy = [{ power = "power_w", positive = "charge_wh", negative = "discharge_wh" }]
[[sensors]]
name = "load"
kind = "simulated"
model = "load"
energy = ["power_w"]
[[relays]]
name = "heater"
pin = 5
[[rules]]
name = "r"
when = "load.energy_in_wh > 100 and battery.discharge_wh < 50"
then = { relay = "heater", state = "on" }
"""
    )
    assert {
        "battery.charge_wh",
        "battery.discharge_wh",
        "load.energy_in_wh",
        "load.energy_out_wh",
    } <= config.channel_names()


def test_energy_mistakes_are_explained_with_their_paths() -> None:
    found = problems_of(
        """
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
energy = [
  "pwer_w",
  "soc_pct",
  { power = "power_w", positive = "voltage_v" },
  "power_w",
  { power = "power_w", negative = "discharge_wh" },
]
"""
    )
    assert found == {
        "sensors[0].energy[0].power": "'battery' has no channel battery.pwer_w; "
        "did you mean 'power_w'?",
        "sensors[0].energy[1].power": "battery.soc_pct is in %, not W: only power is "
        "integrated into energy",
        "sensors[0].energy[2].positive": "battery.voltage_v is already a channel of the sensor",
        "sensors[0].energy[3].power": "power_w is already integrated by sensors[0].energy[2]; "
        "name both counters in one entry",
        "sensors[0].energy[4].power": "power_w is already integrated by sensors[0].energy[2]; "
        "name both counters in one entry",
    }
    empty = problems_of(
        '[node]\nid = "a"\n[[sensors]]\nname = "b"\nkind = "simulated"\nmodel = "battery"\n'
        'energy = [{ power = "power_w" }]\n'
    )
    assert "name the counter(s) to keep" in empty["sensors[0].energy[0]"]
