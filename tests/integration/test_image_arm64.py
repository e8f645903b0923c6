"""The node's image on arm64, booted in `qemu-system-aarch64` on Debian's arm64 kernel with
cgroup v2: the checks of the amd64 boot test, the device allow-list, and a real power cut.

Emulated arm64 (TCG) is some 10× slower than this machine, nearer a Raspberry Pi 3: the boot
times measured here are what the unit's start timeout and watchdog are set against. The tests of
this module share one machine and run in file order; the last one cuts its power and boots it
again. Cold (no cached root filesystem) the module takes some 25 minutes, warm some 10.

    .venv/bin/python -m pytest -m arm64_vm tests/integration/test_image_arm64.py
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.vm_arm64 import Image, Machine, booted, build_image

pytestmark = [pytest.mark.slow, pytest.mark.arm64_vm, pytest.mark.timeout(3600)]

SERVICE = "daisee-node.service"
DATA = "/var/lib/daisee-node"
HISTORY = f"{DATA}/mock-gpio/history.log"
RELAY_PIN = "GPIO17"
#: the guest is emulated: deadlines are those of a slow Pi, not of this machine
AGENT_BOOT_S = 600
RUNNING_S = 900
READY_S = 300

#: what the run measured, for docs/performance.md (printed at the end of the module)
FIGURES: dict[str, Any] = {}

#: opens each device node as the service would; prints {path: errno or 0} as JSON
PROBE = """\
import errno, json, os, sys
result = {}
for path in sys.argv[2:]:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY))
        result[path] = "ok"
    except OSError as exc:
        result[path] = errno.errorcode.get(exc.errno, str(exc.errno))
with open(sys.argv[1], "w") as out:
    json.dump(result, out)
"""


def show(vm: Machine, prop: str, unit: str = SERVICE) -> str:
    return vm.out(f"systemctl show -p {prop} --value {unit}")


def wait_guest(vm: Machine, what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    """Poll `check()` until truthy; fail naming `what` (and the unit's journal) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    journal = vm.run(f"journalctl -b -u {SERVICE} -n 40 --no-pager", check=False).out
    raise AssertionError(f"{what}: not within {timeout} s\n{journal}")


def relay_level(vm: Machine) -> str:
    """The relay pin's last level in the mock history ("0"/"1"), as the relay line would show."""
    lines = vm.run(f"grep ' {RELAY_PIN} ' {HISTORY}", check=False).out.split()
    # A line never driven is low, as a GPIO line is at power-on (pull-down).
    return lines[-1] if lines else "0"


def active_pid(vm: Machine) -> int:
    """The node's main PID once it is active (READY), else 0."""
    state = vm.out(f"systemctl show -p ActiveState -p MainPID {SERVICE}")
    values = dict(line.split("=", 1) for line in state.splitlines())
    return int(values["MainPID"]) if values["ActiveState"] == "active" else 0


def mqtt_relay(vm: Machine, state: str) -> None:
    """Command the relay as Home Assistant does: its own login, the `set` topic."""
    node_id = vm.out("sed -n 's/^id = \"\\(.*\\)\".*/\\1/p' /etc/daisee-node/config.toml")
    vm.run(
        "mosquitto_pub -h 127.0.0.1 -u homeassistant "
        '-P "$(cat /etc/daisee-node/homeassistant-mqtt.pass)" '
        f"-t daisee/{node_id}/relay/supply_neighbour/set -m {state} -q 1"
    )


def sql(vm: Machine, query: str) -> Any:
    """One query on the node's database (read-only), its rows as JSON."""
    script = (
        "import json, sqlite3, sys; "
        f"db = sqlite3.connect('file:{DATA}/node.db?mode=ro', uri=True); "
        "print(json.dumps(db.execute(sys.argv[1]).fetchall()))"
    )
    return json.loads(vm.out(f"/usr/bin/python3 -c {shlex.quote(script)} {shlex.quote(query)}"))


def boot_figures(vm: Machine, label: str) -> None:
    """Record the boot's times: systemd-analyze, and the node's READY since the kernel started."""
    ready_us = int(show(vm, "ActiveEnterTimestampMonotonic"))
    FIGURES[f"{label}_ready_s"] = round(ready_us / 1e6, 1)
    # The unit's own start, ExecStart to READY: what TimeoutStartSec bounds.
    start_us = int(show(vm, "ExecMainStartTimestampMonotonic"))
    FIGURES[f"{label}_start_to_ready_s"] = round((ready_us - start_us) / 1e6, 1)
    FIGURES[f"{label}_analyze"] = vm.out("systemd-analyze time --no-pager").splitlines()[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    began = time.monotonic()
    built = build_image(tmp_path_factory.mktemp("arm64"))
    FIGURES["image_build_s"] = round(time.monotonic() - began)
    return built


@pytest.fixture(scope="module")
def vm(image: Image) -> Iterator[Machine]:
    with booted(image, image.disk.parent, "boot1", AGENT_BOOT_S) as machine:
        FIGURES["boot1_agent_s"] = round(time.monotonic() - machine.started, 1)
        yield machine
    print(f"\narm64 figures: {json.dumps(FIGURES)}")
    (image.disk.parent / "figures.json").write_text(json.dumps(FIGURES, indent=1))


def test_first_boot_runs_provisions_and_node_ready(vm: Machine) -> None:
    state = vm.run("systemctl is-system-running --wait", timeout=RUNNING_S, check=False).out
    failed = vm.run("systemctl --failed --no-legend --no-pager", check=False).out
    assert state.strip() == "running", f"system {state.strip()}; failed units:\n{failed}"
    FIGURES["boot1_running_s"] = round(time.monotonic() - vm.started, 1)
    assert show(vm, "Result", "daisee-firstboot.service") == "success"
    journal = vm.out("journalctl -b -u daisee-firstboot.service -o cat --no-pager")
    assert journal.count("provisioned; daisee-node enabled") == 1, journal
    assert vm.out(f"test -s {DATA}/node-key.json && cat {DATA}/node-address.json")
    assert re.search(r'^id = "node-[0-9a-f]{6}"', vm.out("cat /etc/daisee-node/config.toml"), re.M)
    wait_guest(vm, "daisee-node READY", lambda: active_pid(vm), READY_S)
    assert show(vm, "StatusText"), "READY without its status text"
    assert vm.out("stat -fc %T /sys/fs/cgroup") == "cgroup2fs"
    boot_figures(vm, "boot1")


def test_watchdog_pings_advance(vm: Machine) -> None:
    first = int(show(vm, "WatchdogTimestampMonotonic"))
    assert first > 0, "no watchdog ping recorded"
    # WatchdogSec=20: the daemon pings every 10 s.
    wait_guest(
        vm, "a newer watchdog ping", lambda: int(show(vm, "WatchdogTimestampMonotonic")) > first, 30
    )


def test_mqtt_command_from_home_assistant_closes_relay(vm: Machine) -> None:
    assert relay_level(vm) == "0", "the relay did not start in its safe state"
    mqtt_relay(vm, "ON")
    wait_guest(vm, "relay closed by the MQTT command", lambda: relay_level(vm) == "1", 30)


def test_kill_9_puts_relay_safe_and_restarts(vm: Machine) -> None:
    if relay_level(vm) != "1":
        mqtt_relay(vm, "ON")
        wait_guest(vm, "relay closed", lambda: relay_level(vm) == "1", 30)
    pid, restarts = active_pid(vm), int(show(vm, "NRestarts"))
    began = time.monotonic()
    vm.run(f"systemctl kill -s KILL {SERVICE}")
    wait_guest(vm, "safe state after kill -9", lambda: relay_level(vm) == "0", 60, every=0.2)
    FIGURES["kill9_safe_s"] = round(time.monotonic() - began, 2)
    new = wait_guest(vm, "restart after kill -9", lambda: active_pid(vm) not in (0, pid), READY_S)
    assert new != pid and int(show(vm, "NRestarts")) == restarts + 1


def test_sigstop_is_caught_by_the_watchdog(vm: Machine) -> None:
    wait_guest(vm, "node active", lambda: active_pid(vm), READY_S)
    mqtt_relay(vm, "ON")
    wait_guest(vm, "relay closed", lambda: relay_level(vm) == "1", 30)
    pid = active_pid(vm)
    began = time.monotonic()
    vm.run(f"systemctl kill -s STOP {SERVICE}")
    # WatchdogSec=20 plus the abort and ExecStopPost on an emulated CPU.
    wait_guest(vm, "safe state after the watchdog", lambda: relay_level(vm) == "0", 90)
    FIGURES["sigstop_safe_s"] = round(time.monotonic() - began, 1)
    journal = vm.out(f"journalctl -b -u {SERVICE} -o cat --no-pager")
    assert "Watchdog timeout" in journal, journal[-2000:]
    wait_guest(vm, "restart after the watchdog", lambda: active_pid(vm) not in (0, pid), READY_S)


def test_reload_applies_a_changed_config(vm: Machine) -> None:
    pid = wait_guest(vm, "node active", lambda: active_pid(vm), READY_S)
    assert not sql(vm, "SELECT 1 FROM channels WHERE name LIKE 'load.%'")
    vm.run(
        'printf \'\\n[[sensors]]\\nname = "load"\\nkind = "simulated"\\nmodel = "load"\\n'
        "interval_s = 0.5\\n' >> /etc/daisee-node/config.toml"
    )
    vm.run(f"systemctl reload {SERVICE}", timeout=90)
    query = (
        "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
        "WHERE c.name = 'load.power_w'"
    )
    wait_guest(vm, "readings of the sensor the reload added", lambda: sql(vm, query)[0][0] > 0, 60)
    assert active_pid(vm) == pid, "reload restarted the node"


def test_device_allow_list_under_cgroup_v2(vm: Machine) -> None:
    """Inside the service's own sandbox (an ExecStartPre of daisee-node.service, so the same
    cgroup, DevicePolicy and user), the I2C, GPIO and serial nodes open or fail for want of
    hardware, and copies of the disk and of the clock do not (EPERM, the cgroup's device filter);
    the same probe as the same user outside the service opens them: the refusal is the
    allow-list's."""
    # The majors DeviceAllow=char-i2c / char-ttyUSB name must be registered when the unit starts.
    vm.run("modprobe i2c-dev && modprobe usbserial")
    devices = vm.out("cat /proc/devices")
    for name in ("i2c", "gpiochip", "ttyUSB", "ttyAMA", "ttyS"):
        assert re.search(rf"^\s*\d+ {name}$", devices, re.M), f"{name} not in /proc/devices"
    # The virt machine's PL061 GPIO controller is gpiochip0; its RTC serves as a forbidden node.
    gpio = vm.out("ls /dev/gpiochip0")
    copies = []
    for name, source in (("forbidden-disk", "/dev/vda"), ("forbidden-rtc", "/dev/rtc0")):
        kind = "b" if vm.run(f"test -b {source}", check=False).exitcode == 0 else "c"
        major, minor = (int(x, 16) for x in vm.out(f"stat -c '%t %T' {source}").split())
        copies.append(
            f"mknod -m 0660 /dev/{name} {kind} {major} {minor}; chgrp dialout /dev/{name}"
        )
    # As on a Pi: each node group-owned by a group the node's user is in; the copies of the disk
    # and the clock too, so only the cgroup can refuse them.
    vm.run(
        "set -e; "
        "[ -e /dev/i2c-1 ] || mknod -m 0660 /dev/i2c-1 c 89 1; chgrp i2c /dev/i2c-1; "
        "[ -e /dev/ttyUSB0 ] || mknod -m 0660 /dev/ttyUSB0 c 188 0; chgrp dialout /dev/ttyUSB0; "
        f"chgrp gpio {gpio}; chmod 0660 {gpio}; "
        "chgrp dialout /dev/ttyAMA0; chmod 0660 /dev/ttyAMA0; "
        + "; ".join(copies)
        + "; mkdir -p /usr/local/lib/daisee-test /run/systemd/system/daisee-node.service.d"
    )
    vm.run(f"cat > /usr/local/lib/daisee-test/probe.py <<'EOF'\n{PROBE}EOF")
    allowed = ["/dev/i2c-1", gpio, "/dev/ttyUSB0", "/dev/ttyAMA0"]
    forbidden = ["/dev/forbidden-disk", "/dev/forbidden-rtc"]
    paths = allowed + forbidden
    args = " ".join(paths)
    dropin = (
        "[Service]\nExecStartPre=/usr/bin/python3 /usr/local/lib/daisee-test/probe.py "
        f"{DATA}/device-probe.json {args}\n"
    )
    vm.run(
        f"printf %s {shlex.quote(dropin)} > /run/systemd/system/daisee-node.service.d/probe.conf"
    )
    try:
        vm.run(f"rm -f {DATA}/device-probe.json; systemctl daemon-reload")
        vm.run(f"systemctl restart {SERVICE}", timeout=READY_S)
        inside = json.loads(vm.out(f"cat {DATA}/device-probe.json"))
    finally:
        vm.run(
            "rm -f /run/systemd/system/daisee-node.service.d/probe.conf; systemctl daemon-reload"
        )
    vm.run(
        "runuser -u daisee -- /usr/bin/python3 /usr/local/lib/daisee-test/probe.py "
        f"/tmp/device-probe-outside.json {args}"
    )
    outside = json.loads(vm.out("cat /tmp/device-probe-outside.json"))
    FIGURES["device_probe"] = {"service": inside, "same_user_outside": outside}
    for path in allowed:
        # Reachable: opened, or refused by the driver (no adapter behind it), never EPERM.
        assert inside[path] in ("ok", "ENXIO", "ENODEV", "EIO", "EBUSY"), inside
    for path in forbidden:
        assert inside[path] == "EPERM", inside
        assert outside[path] == "ok", outside
    vm.run(f"systemctl restart {SERVICE}", timeout=READY_S)
    wait_guest(vm, "node active after the probe", lambda: active_pid(vm), READY_S)


def test_security_score(vm: Machine) -> None:
    report = vm.out(f"systemd-analyze security --no-pager {SERVICE}", timeout=120)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", report).group(1))
    FIGURES["security"] = score
    assert score <= 2.0, report


def test_stop_within_15_s(vm: Machine) -> None:
    wait_guest(vm, "node active", lambda: active_pid(vm), READY_S)
    # What ExecStopPost costs on its own: a fresh process driving the relays to their safe state.
    FIGURES["safe_state_s"] = float(
        vm.out(
            "a=$(date +%s.%N); runuser -u daisee -- /opt/daisee-node/venv/bin/daisee-node "
            "safe-state -c /etc/daisee-node/config.toml >/dev/null; b=$(date +%s.%N); "
            "echo \"$b - $a\" | awk '{print $1 - $3}'",
            timeout=120,
        )
    )
    try:
        took = float(
            vm.out(
                f"a=$(date +%s.%N); systemctl stop {SERVICE}; b=$(date +%s.%N); "
                "echo \"$b - $a\" | awk '{print $1 - $3}'",
                timeout=60,
            )
        )
        FIGURES["stop_s"] = round(took, 2)
        result = show(vm, "Result")
        assert took <= 15.0 and result == "success", f"stop took {took:.1f} s, result {result}"
        assert relay_level(vm) == "0"
    finally:
        vm.run(f"systemctl reset-failed {SERVICE}; systemctl start {SERVICE}", timeout=READY_S)


def test_power_cut_loses_at_most_one_second_then_second_boot(vm: Machine, image: Image) -> None:
    """Kill the machine while the node writes 10 readings a second, boot again: the database is
    intact, the newest reading kept is within 1 s of the cut, and the first boot does not run."""
    address = vm.out(f"cat {DATA}/node-address.json")
    newest = "SELECT max(t_ms) FROM readings"

    def writing() -> bool:
        guest_now_ms = float(vm.out("date +%s%3N"))
        latest = sql(vm, newest)[0][0]
        return latest is not None and guest_now_ms - latest < 1000

    vm.run(f"systemctl start {SERVICE}", timeout=READY_S)
    wait_guest(vm, "the node writing readings", writing, READY_S)
    offset, uncertainty = vm.guest_clock_offset()
    cut = vm.power_cut()
    cut_guest_ms = (cut + offset) * 1000
    vm2 = Machine(image, image.disk.parent, "boot2")
    vm2.start()
    try:
        vm2.wait_agent(AGENT_BOOT_S)
        state = vm2.run("systemctl is-system-running --wait", timeout=RUNNING_S, check=False).out
        failed = vm2.run("systemctl --failed --no-legend --no-pager", check=False).out
        assert state.strip() == "running", f"second boot {state.strip()}; failed:\n{failed}"
        FIGURES["boot2_running_s"] = round(time.monotonic() - vm2.started, 1)
        assert show(vm2, "ConditionResult", "daisee-firstboot.service") == "no"
        assert vm2.out(f"cat {DATA}/node-address.json") == address, "the node key was remade"
        wait_guest(vm2, "daisee-node READY after the cut", lambda: active_pid(vm2), READY_S)
        boot_figures(vm2, "boot2")
        assert sql(vm2, "PRAGMA integrity_check") == [["ok"]]
        # Readings from before the cut: the machine took far longer than 5 s to boot again.
        kept = sql(vm2, f"SELECT max(t_ms) FROM readings WHERE t_ms <= {cut_guest_ms + 5000:.0f}")
        lost_s = (cut_guest_ms - kept[0][0]) / 1000
        FIGURES["power_cut_lost_s"] = round(lost_s, 3)
        FIGURES["power_cut_clock_uncertainty_s"] = round(uncertainty, 3)
        assert lost_s <= 1.0 + uncertainty, f"{lost_s:.3f} s of readings lost"
        vm2.shutdown()
    finally:
        vm2.kill()
