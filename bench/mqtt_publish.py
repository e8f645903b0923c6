"""MQTT publishing: throughput of the node's publisher, and the node's CPU share at 8 ch × 1 Hz.

    .venv/bin/python bench/mqtt_publish.py [--messages 50000] [--seconds 30]

1. Readings published per second to a local mosquitto through the node's own publisher
   (`MqttLink`: queue, QoS 0, retained), counted when a subscriber has received the last one.
   Reference, in the same run against the same broker: paho-mqtt (the library aiomqtt wraps)
   publishing the same messages from a plain loop.
2. CPU share of a real `daisee-node run` process sampling 8 channels at 1 Hz and publishing every
   reading over MQTT, from /proc over `--seconds`. Reference, in the same run: the same node
   without `[mqtt]`.
One JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daisee_node.mqtt.link import MqttLink  # noqa: E402
from daisee_node.mqtt.settings import MqttSection  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


async def wait_for_last(broker: Broker, topic_prefix: str, count: int, publish) -> float:
    """Subscribe, run `publish`, return seconds until message `count - 1` arrived."""
    done = asyncio.Event()
    last = f"{topic_prefix}/{count - 1}"

    async def listen(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username="viewer",
            password=broker.password_file("viewer").read_text().strip(),
            max_queued_incoming_messages=0,
        ) as client:
            await client.subscribe(f"{topic_prefix}/#")
            ready.set()
            async for msg in client.messages:
                if msg.topic.value == last:
                    done.set()
                    return

    ready = asyncio.Event()
    listener = asyncio.create_task(listen(ready))
    await ready.wait()
    t0 = time.perf_counter()
    await publish()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    listener.cancel()
    return elapsed


async def ours(broker: Broker, count: int) -> float:
    settings = MqttSection(host=broker.host, port=broker.port, username="node", discovery=False)
    link = MqttLink(settings, "bench", broker.password_file("node").read_text().strip())
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.connected.wait(), 10)

    async def publish() -> None:
        for i in range(count):
            link.publish(f"daisee/bench/reading/{i}", f"{i * 1.5:.6g}", retain=True)
        await link.drain(120)

    elapsed = await wait_for_last(broker, "daisee/bench/reading", count, publish)
    task.cancel()
    return elapsed


async def reference(broker: Broker, count: int) -> float:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.username_pw_set("node", broker.password_file("node").read_text().strip())
    client.connect(broker.host, broker.port)
    client.loop_start()

    async def publish() -> None:
        def run() -> None:
            for i in range(count):
                client.publish(f"daisee/paho/reading/{i}", f"{i * 1.5:.6g}", retain=True)

        await asyncio.to_thread(run)

    try:
        return await wait_for_last(broker, "daisee/paho/reading", count, publish)
    finally:
        client.loop_stop()
        client.disconnect()


def cpu_share(tmp: Path, broker: Broker | None, seconds: float) -> float:
    """CPU seconds per wall second of a node process, after a settling period."""
    name = "with-mqtt" if broker else "without-mqtt"
    sections: dict = {
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "daisee_node", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        time.sleep(5)  # imports, database, first connection

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        return (cpu() - c0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            ours_s = asyncio.run(ours(broker, args.messages))
            ref_s = asyncio.run(reference(broker, args.messages))
            shares: dict[str, float] = {}

            def measure(key: str, b: Broker | None) -> None:
                shares[key] = cpu_share(Path(tmp), b, args.seconds)

            # both nodes at once: same machine load for each
            threads = [
                threading.Thread(target=measure, args=("mqtt", broker)),
                threading.Thread(target=measure, args=("none", None)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            broker.stop()
    print(
        json.dumps(
            {
                "bench": "mqtt_publish",
                "messages": args.messages,
                "ours_readings_per_s": round(args.messages / ours_s),
                "reference_paho_loop_per_s": round(args.messages / ref_s),
                "node_8ch_1hz_cpu_pct_with_mqtt": round(100 * shares["mqtt"], 2),
                "node_8ch_1hz_cpu_pct_without_mqtt": round(100 * shares["none"], 2),
                "mqtt_cpu_pct": round(100 * (shares["mqtt"] - shares["none"]), 2),
                "seconds": args.seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
