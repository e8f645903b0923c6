"""Home Assistant for the tests: a pinned release in its own environment, its MQTT discovery
schemas, and a real instance talking to the test broker.

Home Assistant needs a newer Python than the node: the environment (under `~/.cache/daisee-node/`,
kept between runs and clones) is made on first use with the first Python ≥ 3.13 found
(`DAISEE_HASS_PYTHON`, then `python3.13`/`python3.14` on PATH, then pyenv's), and reused while
the pin is the same. The
pinned release declares Python ≥ 3.13.2 but runs on 3.13.0, the newest pyenv has here: it is
installed with `--ignore-requires-python` and started through `hass_launch.py`, which lowers
only its start-up version check. No suitable Python is a test failure, never a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

#: the release whose schemas the discovery payloads must pass (it knows `default_entity_id`)
HASS_VERSION = "2025.10.4"
#: installed beside it: what its MQTT integration would fetch at its first start, and the
#: pycares its pinned aiodns was built for (pip would take a newer, incompatible one)
HASS_EXTRAS = ("paho-mqtt==2.1.0", "pycares==4.11.0")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "daisee-node"
VENV = CACHE / f"hass-{HASS_VERSION}"
HERE = Path(__file__).resolve().parent
MIN_PYTHON = (3, 13)


def _version(python: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return tuple(int(x) for x in out.stdout.split())


def find_python() -> str | None:
    """The first Python new enough for Home Assistant, or None."""
    candidates = [os.environ.get("DAISEE_HASS_PYTHON", "")]
    candidates += [shutil.which(n) or "" for n in ("python3.13", "python3.14")]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[3-9]*/bin/python"), reverse=True)
    for python in filter(None, candidates):
        version = _version(python)
        if version is not None and version[:2] >= MIN_PYTHON:
            return python
    return None


def hass_python() -> Path:
    """The environment's interpreter, made and installed if needed (a few minutes, once)."""
    stamp = VENV / f".installed-{HASS_VERSION}"
    python = VENV / "bin" / "python"
    if stamp.exists() and python.exists():
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"hass-{HASS_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if stamp.exists() and python.exists():
            return python
        base = find_python()
        if base is None:
            pytest.fail(
                f"Home Assistant {HASS_VERSION} needs Python >= 3.13 and none was found: install "
                "one (pyenv install 3.13, or Debian's python3.13) or point DAISEE_HASS_PYTHON "
                "at it",
                pytrace=False,
            )
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        done = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--ignore-requires-python",
                f"homeassistant=={HASS_VERSION}",
                *HASS_EXTRAS,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            # What its start loads (frontend, backup, MQTT …), as its own pins say: with
            # `--skip-pip` it installs nothing itself.
            wanted = subprocess.run(
                [str(python), str(HERE / "hass_requirements.py")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            constraints = next(VENV.glob("lib/python3*/site-packages/homeassistant"))
            done = subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--ignore-requires-python",
                    "-c",
                    str(constraints / "package_constraints.txt"),
                    *wanted,
                ],
                capture_output=True,
                text=True,
            )
        if done.returncode != 0:
            pytest.fail(
                f"installing Home Assistant {HASS_VERSION} failed:\n{done.stderr[-3000:]}",
                pytrace=False,
            )
        stamp.touch()
    return python


def validate(entities: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each (component, discovery payload) through Home Assistant's own discovery schema: for
    each, `errors` (empty when valid), `dropped` (keys the schema would silently remove) and the
    payload as Home Assistant reads it (`config`)."""
    done = subprocess.run(
        [str(hass_python()), str(HERE / "hass_validate.py")],
        input=json.dumps(entities),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(f"the validator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# -- a running Home Assistant ----------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _jwt_hs256(payload: dict[str, Any], key: str) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


class HomeAssistant:
    """Home Assistant in a config dir of its own, its MQTT integration set up on the broker as
    the `ha` user (no UI: the config entry and an admin's long-lived token are pre-written)."""

    def __init__(self, workdir: Path, broker: Any) -> None:
        self.config_dir = workdir / "hass-config"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "hass.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = self._write_config(broker)

    def _write_config(self, broker: Any) -> str:
        storage = self.config_dir / ".storage"
        storage.mkdir(parents=True)
        (self.config_dir / "configuration.yaml").write_text(
            "homeassistant:\n  name: Test\n  latitude: 48.85\n  longitude: 2.35\n"
            "  elevation: 35\n  unit_system: metric\n  time_zone: UTC\n  country: FR\n"
            "  currency: EUR\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "api:\n"
            "logger:\n  default: warning\n"
        )
        user_id, token_id, jwt_key = uuid.uuid4().hex, uuid.uuid4().hex, secrets.token_hex(64)
        auth = {
            "users": [
                {
                    "id": user_id,
                    "group_ids": ["system-admin"],
                    "is_owner": True,
                    "is_active": True,
                    "name": "test",
                    "system_generated": False,
                    "local_only": False,
                }
            ],
            "groups": [
                {"id": "system-admin", "name": "Administrators"},
                {"id": "system-users", "name": "Users"},
                {"id": "system-read-only", "name": "Read Only"},
            ],
            "credentials": [],
            "refresh_tokens": [
                {
                    "id": token_id,
                    "user_id": user_id,
                    "client_id": None,
                    "client_name": "tests",
                    "client_icon": None,
                    "token_type": "long_lived_access_token",
                    "created_at": _now_iso(),
                    "access_token_expiration": 86400.0,
                    "token": secrets.token_hex(64),
                    "jwt_key": jwt_key,
                    "last_used_at": None,
                    "last_used_ip": None,
                    "expire_at": None,
                    "credential_id": None,
                    "version": HASS_VERSION,
                }
            ],
        }
        self._store(storage / "auth", "auth", auth)
        password = broker.password_file("ha").read_text().strip()
        entry = {
            "entry_id": uuid.uuid4().hex,
            "version": 1,
            "minor_version": 2,
            "domain": "mqtt",
            "title": broker.host,
            "data": {
                "broker": broker.host,
                "port": broker.port,
                "username": "ha",
                "password": password,
            },
            "options": {"discovery": True, "discovery_prefix": "homeassistant"},
            "pref_disable_new_entities": False,
            "pref_disable_polling": False,
            "source": "user",
            "unique_id": None,
            "disabled_by": None,
            "created_at": _now_iso(),
            "modified_at": _now_iso(),
            "discovery_keys": {},
            "subentries": [],
        }
        self._store(storage / "core.config_entries", "core.config_entries", {"entries": [entry]})
        now = int(time.time())
        return _jwt_hs256({"iss": token_id, "iat": now, "exp": now + 86400}, jwt_key)

    @staticmethod
    def _store(path: Path, key: str, data: dict[str, Any]) -> None:
        minor = 5 if key == "core.config_entries" else 1
        path.write_text(
            json.dumps({"version": 1, "minor_version": minor, "key": key, "data": data})
        )

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(hass_python()),
                    str(HERE / "hass_launch.py"),
                    "--config",
                    str(self.config_dir),
                    "--skip-pip",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.config_dir,
            )

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST API call as the admin; None while Home Assistant is not answering."""
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code in (502, 503, 504):
                return None
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """An entity's state object, or None while it does not exist."""
        try:
            return self.api("GET", f"states/{entity_id}")
        except AssertionError as exc:
            if " 404" in str(exc):
                return None
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def running(workdir: Path, broker: Any) -> Iterator[HomeAssistant]:
    """Home Assistant started, and stopped at the end whatever happened."""
    hass = HomeAssistant(workdir, broker)
    hass.start()
    try:
        yield hass
    finally:
        hass.stop()
