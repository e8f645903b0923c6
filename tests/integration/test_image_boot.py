"""The node's image booted on a real systemd (amd64, `systemd-nspawn -b`): first boot, the
service, its watchdog, MQTT logins, faults, reload and stop, then a second boot.

The tests of this module share one image and run in order on it, as an operator's day would:
each check has its own deadline, and a failing one names the console's last lines.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daisee_node.ledger import chainspec
from tests.support.geth import geth_binary
from tests.support.image import Machine, installed_root

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.beside]

UNIT = "daisee-node.service"
HISTORY = "/var/lib/daisee-node/mock-gpio/history.log"
PIN = "GPIO17"
#: the image's config with what a machine without the hardware has: a simulated PV sensor
#: sampling fast (so the store is busy) and a mock relay, as `[gpio] backend = "mock"` gives
TEST_SENSOR = '[[sensors]]\nname = "pv"\nkind = "simulated"\nmodel = "pv"\ninterval_s = 0.1\n'
TEST_RELAY = '[[relays]]\nname = "supply_neighbour"\npin = 17\nsafe_state = "off"\n'


def configure(root: Path) -> None:
    """Swap the image config's RS485 meter for a simulated sensor and add a mock relay."""
    path = root / "etc/daisee-node/config.toml"
    text = path.read_text()
    meter = re.search(r"\[\[sensors\]\]\nname = \"grid\".*?interval_s = 1\.0\n", text, re.S)
    assert meter, "the image's config no longer has the grid meter this test replaces"
    text = text.replace(meter.group(0), TEST_SENSOR)
    text = text.replace('backend = "native"', f'backend = "mock"\n\n{TEST_RELAY}')
    path.write_text(text)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = installed_root(tmp_path_factory.mktemp("image") / "root")
    configure(root)
    # The chain client, as the image build installs it (there arm64, cross-built), and a chain
    # role on the boot partition: the first boot sets the node up as a signer.
    shutil.copy(geth_binary(), root / "usr/local/bin/geth")
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (root / "boot/firmware/daisee-chain.txt").write_text("\ufeffrole = signer   # a comment\r\n")
    return root


@pytest.fixture(scope="module")
def consoles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("consoles")


@pytest.fixture(scope="module")
def node(root: Path, consoles: Path) -> Iterator[Machine]:
    machine = Machine(root, "daisee-boot", consoles / "first-boot.log")
    machine.boot()
    try:
        yield machine
    finally:
        machine.kill()


def system_state(m: Machine) -> str:
    return m.run("systemctl is-system-running || true", timeout=30).strip()


def wait_running(m: Machine, timeout: float) -> None:
    state = m.wait(
        lambda: (s := system_state(m)) not in ("initializing", "starting") and s,
        timeout,
        "the system to finish booting",
    )
    failed = m.run("systemctl --failed --no-legend --plain || true")
    jobs = m.run("systemctl list-jobs --no-legend || true")
    assert state == "running", f"system is {state}; failed units:\n{failed}\njobs:\n{jobs}"


def pin_levels(m: Machine) -> list[tuple[float, int]]:
    """Every recorded change of the relay's pin: (wall time, level)."""
    out = m.run(f"cat {HISTORY} 2>/dev/null || true")
    return [
        (float(t), int(level))
        for t, name, level in (line.split() for line in out.splitlines() if line.strip())
        if name == PIN
    ]


def level(m: Machine) -> int | None:
    levels = pin_levels(m)
    return levels[-1][1] if levels else None


def node_id(m: Machine) -> str:
    match = re.search(r'^id = "([^"]+)"', m.run("cat /etc/daisee-node/config.toml"), re.M)
    assert match
    return match.group(1)


def main_pid(m: Machine) -> int:
    return int(m.show(UNIT, "MainPID")["MainPID"])


def active(m: Machine) -> bool:
    props = m.show(UNIT, "ActiveState", "SubState")
    return props == {"ActiveState": "active", "SubState": "running"}


def command_relay(m: Machine, mode: str) -> None:
    """What Home Assistant does: a command on the relay's `set` topic, with its own login."""
    topic = f"daisee/{node_id(m)}/relay/supply_neighbour/set"
    m.run(
        "mosquitto_pub -h 127.0.0.1 -u homeassistant"
        ' -P "$(cat /etc/daisee-node/homeassistant-mqtt.pass)"'
        f" -q 1 -t {shlex.quote(topic)} -m {shlex.quote(mode)}"
    )


def closed_by_command(m: Machine) -> None:
    m.wait(lambda: active(m), 60, "the node to run")
    m.wait(lambda: (command_relay(m, "on"), level(m) == 1)[1], 30, "the relay to close")


def test_first_boot_reaches_running_and_provisions_the_node(node: Machine) -> None:
    wait_running(node, 120)
    journal = node.run("journalctl -b -u daisee-firstboot.service --no-pager")
    assert "provisioned; daisee-node enabled" in journal, journal
    assert node.run("test -e /var/lib/daisee-node/.provisioned && echo yes").strip() == "yes"
    assert node_id(node).startswith("node-")
    owner = node.run("stat -c %U /var/lib/daisee-node/node-key.json").strip()
    assert owner == "daisee"
    first = node.show("daisee-firstboot.service", "Result", "ExecMainStatus")
    assert first == {"Result": "success", "ExecMainStatus": "0"}
    span = node.show(
        "daisee-firstboot.service",
        "ExecMainStartTimestampMonotonic",
        "ExecMainExitTimestampMonotonic",
    )
    took = int(span["ExecMainExitTimestampMonotonic"]) - int(
        span["ExecMainStartTimestampMonotonic"]
    )
    print(f"first-boot provisioning: {took / 1e6:.1f} s")


def test_the_node_is_ready_and_pings_the_watchdog(node: Machine) -> None:
    node.wait(lambda: active(node), 60, "the node to be active (READY sent)")
    props = node.show(UNIT, "StatusText", "WatchdogUSec", "Type")
    assert props["Type"] == "notify"
    assert props["StatusText"], "the node sends a status text with READY"
    assert props["WatchdogUSec"] == "20s"

    def ping() -> int:
        return int(node.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])

    first = node.wait(ping, 30, "a first watchdog ping")
    # The daemon pings every WatchdogSec/2 = 10 s.
    node.wait(lambda: ping() > first, 25, "the watchdog timestamp to advance")
    ready = int(node.show(UNIT, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"])
    print(f"boot to READY (first boot): {ready / 1e6 - node.started_at:.1f} s")


def test_a_home_assistant_command_closes_the_relay(node: Machine) -> None:
    closed_by_command(node)
    command_relay(node, "off")
    node.wait(lambda: level(node) == 0, 30, "the relay to open again")


def test_kill9_leaves_the_relay_safe_and_the_node_restarts(node: Machine) -> None:
    closed_by_command(node)
    before = main_pid(node)
    changes = len(pin_levels(node))
    killed_at = time.time()
    node.run(f"systemctl kill -s KILL {UNIT}")
    node.wait(
        lambda: any(lv == 0 for _, lv in pin_levels(node)[changes:]),
        20,
        "ExecStopPost to open the relay",
    )
    opened = next(t for t, lv in pin_levels(node)[changes:] if lv == 0)
    print(f"kill -9 to relay safe: {opened - killed_at:.2f} s")
    node.wait(lambda: active(node) and main_pid(node) != before, 60, "the node to restart")
    command_relay(node, "off")


def test_a_hung_node_is_caught_by_the_watchdog(node: Machine) -> None:
    closed_by_command(node)
    before = main_pid(node)
    changes = len(pin_levels(node))
    node.run(f"systemctl kill -s STOP {UNIT}")
    # WatchdogSec=20, then the abort and ExecStopPost.
    node.wait(
        lambda: any(lv == 0 for _, lv in pin_levels(node)[changes:]),
        60,
        "the watchdog to stop the hung node and open the relay",
    )
    journal = node.run(f"journalctl -b -u {UNIT} --no-pager | tail -n 200")
    assert "Watchdog timeout" in journal, journal[-3000:]
    node.wait(lambda: active(node) and main_pid(node) != before, 60, "the node to restart")
    command_relay(node, "off")


def test_reload_applies_a_changed_config(node: Machine) -> None:
    node.wait(lambda: active(node), 60, "the node to run")
    before = main_pid(node)
    added = '\n[[sensors]]\nname = "load"\nkind = "simulated"\nmodel = "load"\ninterval_s = 0.5\n'
    node.run(f"printf %s {shlex.quote(added)} >> /etc/daisee-node/config.toml")
    node.run(f"systemctl reload {UNIT}")
    node.wait(
        lambda: "config reloaded" in node.run(f"journalctl -b -u {UNIT} --no-pager | tail -n 50"),
        30,
        "the node to log the reload",
    )
    node.wait(
        lambda: "load" in node.run("daisee-node status -c /etc/daisee-node/config.toml"),
        30,
        "the new sensor to show in status",
    )
    assert main_pid(node) == before, "a reload must not restart the node"
    assert active(node)


def test_the_security_score_stays_low(node: Machine) -> None:
    out = node.run(f"systemd-analyze security {UNIT} --no-pager")
    match = re.search(r"Overall exposure level for daisee-node.service: ([0-9.]+)", out)
    assert match, out[-2000:]
    assert float(match.group(1)) <= 2.0


def chain_height(m: Machine) -> int:
    out = m.run("geth attach --exec eth.blockNumber http://127.0.0.1:8545", check=False).strip()
    return int(out) if out.isdigit() else -1


def test_the_chain_client_seals_as_a_signer_once_the_genesis_is_there(
    node: Machine, root: Path
) -> None:
    # The first boot made the node's chain identity and wrote it on the boot partition.
    written = node.run("cat /boot/firmware/daisee-chain-id.txt")
    ids = dict(line.split(None, 1) for line in written.splitlines())
    assert ids["enode"].startswith("enode://") and ids["signer"].startswith("0x")
    assert node.run("stat -c %U:%a /var/lib/daisee-chain/keystore/sealer.json").strip() == (
        "daisee:600"
    )
    # Without the community's genesis the client does not start.
    assert node.show("daisee-chain.service", "ActiveState")["ActiveState"] == "inactive"
    genesis = chainspec.clique([ids["signer"]], 4242, 1, {})
    (root / "etc/daisee-node/genesis.json").write_text(json.dumps(genesis))
    node.run("chmod 0644 /etc/daisee-node/genesis.json")
    node.run("systemctl enable --now daisee-chain.service", timeout=180)
    node.wait(lambda: chain_height(node) >= 2, 120, "the chain client to seal blocks")
    props = node.show("daisee-chain.service", "ActiveState", "User", "ExecMainPID")
    assert props["ActiveState"] == "active" and props["User"] == "daisee"
    comm = node.run(f"cat /proc/{props['ExecMainPID']}/comm").strip()
    assert comm == "geth"  # `chain-node run` became geth: systemd watches geth itself
    out = node.run("systemd-analyze security daisee-chain.service --no-pager", timeout=60)
    score = re.search(r"Overall exposure level for daisee-chain.service: ([0-9.]+)", out)
    assert score and float(score.group(1)) <= 2.0, out[-600:]
    # A stop is clean, and a start goes on from the chain it had.
    height = chain_height(node)
    started = time.monotonic()
    node.run("systemctl stop daisee-chain.service", timeout=150)
    print(f"chain client stop: {time.monotonic() - started:.1f} s")
    assert node.show("daisee-chain.service", "Result")["Result"] == "success"
    node.run("systemctl start daisee-chain.service", timeout=180)
    node.wait(lambda: chain_height(node) > height, 120, "the chain to go on after a restart")


def test_stop_takes_under_15_s_and_leaves_the_relay_safe(node: Machine) -> None:
    closed_by_command(node)
    started = time.monotonic()
    node.run(f"systemctl stop {UNIT}", timeout=60)
    took = time.monotonic() - started
    print(f"systemctl stop: {took:.2f} s")
    assert took < 15
    assert level(node) == 0
    assert node.show(UNIT, "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }


def test_a_second_boot_does_not_provision_again(node: Machine, root: Path, consoles: Path) -> None:
    address = node.run("cat /var/lib/daisee-node/node-address.json")
    ha_password = node.run("cat /etc/daisee-node/homeassistant-mqtt.pass")
    node.poweroff()
    again = Machine(root, "daisee-boot", consoles / "second-boot.log")
    again.boot()
    try:
        wait_running(again, 120)
        skipped = again.show("daisee-firstboot.service", "ConditionResult", "ActiveState")
        assert skipped == {"ConditionResult": "no", "ActiveState": "inactive"}
        assert again.run("cat /var/lib/daisee-node/node-address.json") == address
        assert again.run("cat /etc/daisee-node/homeassistant-mqtt.pass") == ha_password
        again.wait(lambda: active(again), 60, "the node to start on the second boot")
        ready = again.show(UNIT, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"]
        print(f"boot to READY (second boot): {int(ready) / 1e6 - again.started_at:.1f} s")
        closed_by_command(again)
    finally:
        again.kill()
