"""MQTT publishing: the node's publisher against a plain aiomqtt client, and the node's CPU share.

    .venv/bin/python bench/mqtt_publish.py [--messages 20000] [--rounds 3] [--seconds 30]

1. Throughput. `--messages` readings (distinct topics `daisee/bench/reading/<i>`, QoS 0, retained,
   as the node publishes readings) go through the node's own publisher, `MqttLink.publish` (its
   retained-state map, its sender task, aiomqtt underneath), to a local mosquitto. Reference, in the
   same run, doing the same work: a plain `aiomqtt.Client` awaiting `publish` for the same messages
   at the same QoS and retain flag. After the readings, each sends an end marker (QoS 1).
   A subscriber in its own process (paho) counts the readings it actually receives and stops at the
   last one or at the end marker, whichever comes first; the time is from the first publish to the
   last reading received (one monotonic clock for both processes). The publisher's CPU time is its
   process's, from the first publish until everything is sent. Every measurement gets a fresh
   broker (nothing retained from the one before); ours and the reference alternate for `--rounds`
   and the medians are reported.
2. CPU share of a real `daisee-node run` process sampling 8 channels at 1 Hz and publishing every
   reading over MQTT, from /proc over `--seconds` once it is READY (sd_notify) and, with MQTT, once
   its `online` status is on the broker. Reference, in the same run and at the same time: the same
   node without `[mqtt]`.

One JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daisee_node import logs  # noqa: E402
from daisee_node.mqtt.link import MqttLink  # noqa: E402
from daisee_node.mqtt.settings import MqttSection  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
QOS = 0  # the node's readings: QoS 0, retained
END_QOS = 1

#: counts readings under `prefix`; stops at `count` of them or at the end marker
SUBSCRIBER = r"""
import json, sys, time
import paho.mqtt.client as mqtt
host, port, user, password, prefix, count, end = sys.argv[1:8]
count = int(count)
state = {"received": 0, "first": None, "last": None, "end": False}
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-counter")
c.username_pw_set(user, password)
def on_connect(client, userdata, flags, rc, props):
    client.subscribe([(prefix + "/#", 1), (end, 1)])
def on_subscribe(client, userdata, mid, rcs, props):
    print("ready", flush=True)
def on_message(client, userdata, msg):
    if msg.topic == end:
        state["end"] = True
        client.disconnect()
        return
    now = time.monotonic()
    state["received"] += 1
    state["first"] = state["first"] or now
    state["last"] = now
    if state["received"] >= count:
        client.disconnect()
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, int(port))
c.loop_forever()
print(json.dumps(state), flush=True)
"""


def password(broker: Broker, user: str) -> str:
    return broker.password_file(user).read_text().strip()


def cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(
    broker: Broker, count: int, send: Callable[[str, int], Awaitable[None]], tag: str
) -> dict[str, float]:
    """Start a counting subscriber, run `send(prefix, count)` (which also sends the end marker and
    returns once all is sent), and wait for the subscriber to finish."""
    prefix = f"daisee/{tag}/reading"
    end = f"daisee/{tag}/end"
    sub = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", SUBSCRIBER, broker.host, str(broker.port), "viewer"],
        *[password(broker, "viewer"), prefix, str(count), end],
        stdout=asyncio.subprocess.PIPE,
    )
    assert sub.stdout is not None
    try:
        line = await asyncio.wait_for(sub.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise SystemExit(f"subscriber did not start: {line!r}")
        c0, t0 = cpu_s(), time.monotonic()
        await send(prefix, count)
        cpu = cpu_s() - c0
        out = await asyncio.wait_for(sub.stdout.read(), 300)
        await asyncio.wait_for(sub.wait(), 10)
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    state = json.loads(out)
    received = int(state["received"])
    elapsed = (state["last"] - t0) if state["last"] else float("nan")
    return {
        "received": received,
        "seconds": elapsed,
        "per_s": received / elapsed if received else 0.0,
        "cpu_us_per_message": 1e6 * cpu / count,
    }


async def ours(broker: Broker, count: int) -> dict[str, float]:
    settings = MqttSection(host=broker.host, port=broker.port, username="node", discovery=False)
    link = MqttLink(settings, "bench", password(broker, "node"))
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.connected.wait(), 10)

    async def send(prefix: str, n: int) -> None:
        for i in range(n):
            link.publish(f"{prefix}/{i}", f"{i * 1.5:.6g}", qos=QOS, retain=True)
        # not retained: the link sends it after every retained message
        link.publish(prefix.rsplit("/", 1)[0] + "/end", "end", qos=END_QOS)
        await link.drain(300)

    try:
        return await measure(broker, count, send, "bench")
    finally:
        await link.stop()
        task.cancel()


async def reference(broker: Broker, count: int) -> dict[str, float]:
    async with aiomqtt.Client(
        broker.host, broker.port, username="node", password=password(broker, "node")
    ) as client:

        async def send(prefix: str, n: int) -> None:
            for i in range(n):
                await client.publish(f"{prefix}/{i}", f"{i * 1.5:.6g}", qos=QOS, retain=True)
            await client.publish(prefix.rsplit("/", 1)[0] + "/end", "end", qos=END_QOS)

        return await measure(broker, count, send, "plain")


def with_fresh_broker(
    workdir: Path, run: Callable[[Broker], Coroutine[Any, Any, dict[str, float]]]
) -> dict[str, float]:
    workdir.mkdir()
    broker = Broker(workdir)
    broker.start()
    try:
        return asyncio.run(run(broker))
    finally:
        broker.stop()


# -- part 2: a node's CPU share -------------------------------------------------------------------


def wait_ready(sock: socket.socket, timeout_s: float) -> None:
    """Wait for READY=1 on the node's sd_notify socket."""
    sock.settimeout(timeout_s)
    while b"READY=1" not in sock.recv(4096):
        pass


def wait_online(broker: Broker, node_id: str, timeout_s: float) -> None:
    """Wait until the node's retained status on the broker says `online`."""
    online = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.username_pw_set("viewer", password(broker, "viewer"))

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.payload == b"online":
            online.set()

    client.on_connect = lambda c, *_: c.subscribe(f"daisee/{node_id}/status")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not online.wait(timeout_s):
            raise SystemExit(f"node {node_id} never came online")
    finally:
        client.loop_stop()
        client.disconnect()


def cpu_share(tmp: Path, broker: Broker | None, seconds: float) -> float:
    """CPU seconds per wall second of a node process, from READY (and `online`) on."""
    name = "with-mqtt" if broker else "without-mqtt"
    sections: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(tmp / name)},
        "log": {"level": "warning"},
        "sensors": [
            {"name": m, "kind": "simulated", "model": m, "interval_s": 1.0}
            for m in ("battery", "grid", "load")  # 4 + 3 + 1 = 8 channels
        ],
    }
    if broker:
        sections["mqtt"] = {
            "host": broker.host,
            "port": broker.port,
            "username": "node",
            "password_file": str(broker.password_file("node")),
            "reading_interval_s": 0,
        }
    config = write_config(tmp / f"{name}.toml", sections)
    notify = tmp / f"{name}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        proc = subprocess.Popen(
            [sys.executable, "-m", "daisee_node", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        )
        try:
            wait_ready(sock, 60)
            if broker:
                wait_online(broker, name, 30)

            def cpu() -> float:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / TICKS

            c0, t0 = cpu(), time.monotonic()
            time.sleep(seconds)  # the measuring window itself
            return (cpu() - c0) / (time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU-share window")
    args = parser.parse_args()
    # a stop of the bench still stops what it started (brokers, nodes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs.configure("warning", "json", stream=sys.stderr)  # stdout: the one JSON line
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            runs["ours"].append(
                with_fresh_broker(tmp / f"ours-{r}", lambda b: ours(b, args.messages))
            )
            runs["reference"].append(
                with_fresh_broker(tmp / f"ref-{r}", lambda b: reference(b, args.messages))
            )
        shares: dict[str, float] = {}
        broker = Broker(tmp)
        broker.start()
        try:

            def run_share(key: str, b: Broker | None) -> None:
                shares[key] = cpu_share(tmp, b, args.seconds)

            # both nodes at once: the same machine load for each
            threads = [
                threading.Thread(target=run_share, args=("mqtt", broker)),
                threading.Thread(target=run_share, args=("none", None)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            broker.stop()

    def median(kind: str, key: str) -> float:
        return statistics.median(m[key] for m in runs[kind])

    ours_rate, ref_rate = median("ours", "per_s"), median("reference", "per_s")
    ours_cpu = median("ours", "cpu_us_per_message")
    ref_cpu = median("reference", "cpu_us_per_message")
    print(
        json.dumps(
            {
                "bench": "mqtt_publish",
                "messages": args.messages,
                "qos": QOS,
                "retain": True,
                "rounds": args.rounds,
                "ours": {
                    "path": "MqttLink.publish (the node's publisher)",
                    "received": [int(m["received"]) for m in runs["ours"]],
                    "received_per_s": round(ours_rate),
                    "cpu_us_per_message": round(ours_cpu, 1),
                },
                "reference": {
                    "path": "plain aiomqtt.Client awaiting publish",
                    "received": [int(m["received"]) for m in runs["reference"]],
                    "received_per_s": round(ref_rate),
                    "cpu_us_per_message": round(ref_cpu, 1),
                },
                "throughput_ratio": round(ours_rate / ref_rate, 2),
                "cpu_ratio": round(ours_cpu / ref_cpu, 2),
                "node_8ch_1hz_cpu_pct_with_mqtt": round(100 * shares["mqtt"], 2),
                "node_8ch_1hz_cpu_pct_without_mqtt": round(100 * shares["none"], 2),
                "mqtt_cpu_pct": round(100 * (shares["mqtt"] - shares["none"]), 2),
                "seconds": args.seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
