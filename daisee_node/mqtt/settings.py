"""`[mqtt]`: the local broker the node reports to and takes commands from."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from daisee_node.models import StrictModel


class MqttSection(StrictModel):
    """`[mqtt]`: broker address, credentials, TLS, topics and publishing rates."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65_535)
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password")
    tls: bool = Field(False, description="connect with TLS (port 8883 usually)")
    ca_file: Path | None = Field(None, description="CA bundle for TLS (default: the system's)")
    client_id: str | None = Field(None, description="default: daisee-<node id>")
    base_topic: str = Field("daisee", pattern=r"^[A-Za-z0-9_/-]+$")
    keepalive_s: int = Field(
        5,
        ge=5,
        le=3_600,
        description="the broker declares the node gone (Home Assistant: unavailable) 1.5 × "
        "this after its last packet; 5 s shows a frozen node within 15 s",
    )
    reading_interval_s: float = Field(
        5.0, ge=0, le=3_600, description="each channel's reading is published at most this often"
    )
    discovery: bool = Field(True, description="announce sensors and switches to Home Assistant")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_/-]+$")
    share_commitments: bool = Field(
        True, description="publish signed commitments for peers to relay (needs [chain])"
    )
    reconnect_max_s: float = Field(60.0, gt=0, le=3_600)
    commands_per_s: float = Field(
        2.0, gt=0, le=100, description="relay commands taken per second and relay; excess dropped"
    )
    command_burst: int = Field(
        5, ge=1, le=1_000, description="relay commands taken at once before the rate applies"
    )
