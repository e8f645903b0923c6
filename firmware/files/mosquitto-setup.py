#!/usr/bin/python3
"""The node's mosquitto: its login-only listener, its ACL, and its bridge to the community broker.

Installed as /usr/local/sbin/daisee-mosquitto-setup; `install-node.sh` and the first boot run it,
and an operator runs it again after changing the community settings (then restart mosquitto:
a reload does not start a new bridge).

    sudo daisee-mosquitto-setup                  # from the settings below
    sudo daisee-mosquitto-setup --standalone     # forget the community broker: no bridge

It writes, under ROOT (default /; the image build and the tests install into a folder):
- /etc/mosquitto/conf.d/daisee.conf: the listener, logins only;
- /etc/mosquitto/daisee.acl: the node login `daisee-node` writes only under `<base>/<node id>/`
  (so this needs the node id: before the first boot names the node, the ACL is left unwritten);
- /etc/mosquitto/conf.d/daisee-bridge.conf: the bridge, when community settings are given
  (mode 0640, group mosquitto: it holds the node's community password), removed when not.

Community settings, the first source found wins:
1. the environment: COMMUNITY_HOST, COMMUNITY_PORT (8883), COMMUNITY_CA (a PEM file; none: the
   system's CAs), COMMUNITY_LOGIN (default: the node id), COMMUNITY_PASSWORD_FILE;
2. the boot partition: /boot/firmware/daisee-community.txt (`host = …`, `port = …`, `login = …`)
   with daisee-community-ca.crt and daisee-community.pass beside it; once kept (3.), the three
   are deleted from the boot partition (anyone holding the card can read it). Settings that
   fail move the password off the partition too, to /etc/daisee-node/community-boot.pass (root
   only), where the next run finds it once the other files are fixed;
3. what an earlier run kept: /etc/daisee-node/community.txt, /etc/daisee-node/community.pass and
   /etc/mosquitto/certs/daisee-community-ca.crt (edit them and run again to change the bridge).
None of them: the node is standalone. Bad settings are reported (exit 2) and leave the bridge
as it was; the listener and the ACL are written first regardless.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

BRIDGE_CONF = "etc/mosquitto/conf.d/daisee-bridge.conf"
LISTENER_CONF = "etc/mosquitto/conf.d/daisee.conf"
ACL = "etc/mosquitto/daisee.acl"
KEPT_SETTINGS = "etc/daisee-node/community.txt"
KEPT_PASSWORD = "etc/daisee-node/community.pass"
KEPT_CA = "etc/mosquitto/certs/daisee-community-ca.crt"
#: the boot partition's password after a failed run: off the card, waiting for the fixed settings
PENDING_PASSWORD = "etc/daisee-node/community-boot.pass"
BOOT = "boot/firmware"
BOOT_SETTINGS = "daisee-community.txt"
BOOT_CA = "daisee-community-ca.crt"
BOOT_PASSWORD = "daisee-community.pass"
#: where the CAs of the system live (a community broker with a public certificate)
SYSTEM_CAPATH = "/etc/ssl/certs"
UNNAMED = "CHANGE-ME"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
PLACEHOLDER_RE = re.compile(r"@([A-Z_]+)@")
KEYS = {"host", "port", "login", "reconnect_max_s"}


class SetupError(Exception):
    """Settings that cannot make a working bridge."""


@dataclass(frozen=True)
class Community:
    """Where the community broker is and how this node logs in to it."""

    host: str
    port: int
    login: str
    password: str
    ca_pem: str | None  # None: the system's CAs
    reconnect_max_s: int = 30


#: how the operator runs this again (install-node.sh installs it under this name)
COMMAND = "sudo daisee-mosquitto-setup"


def say(text: str) -> None:
    print(f"daisee-mosquitto-setup: {text}")


def parse_settings(text: str, origin: str) -> dict[str, str]:
    """`key = value` lines; `#` starts a comment; a BOM and CRLF line ends (a FAT partition
    edited on any computer) are fine."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or key not in KEYS:
            raise SetupError(f"{origin} line {number}: expected one of {sorted(KEYS)} = value")
        if key in values:
            # Another reader (the first boot) may take the first line and this one the last:
            # the two would disagree on the node's login.
            raise SetupError(f"{origin} line {number}: {key} is given twice")
        values[key] = value.strip("\"'")
    return values


def node_names(root: Path) -> tuple[str | None, str]:
    """The node id (None before the first boot names it) and the MQTT base topic."""
    path = root / "etc/daisee-node/config.toml"
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SetupError(f"cannot read {path}: {exc}") from exc
    node_id = config.get("node", {}).get("id")
    base = config.get("mqtt", {}).get("base_topic", "daisee")
    if not isinstance(node_id, str) or node_id == UNNAMED:
        return None, base
    if not NAME_RE.match(node_id):
        raise SetupError(f"node id {node_id!r} is not lower-case letters, digits, - and _")
    return node_id, base


def read_pem(path: Path) -> str:
    try:
        pem = path.read_bytes().decode()
    except OSError as exc:
        raise SetupError(f"cannot read the community CA {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SetupError(
            f"{path.name} is not a PEM text file (DER? convert it with "
            f"`openssl x509 -inform der -in {path.name} -out {path.name}.pem`)"
        ) from exc
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise SetupError(f"{path} holds no PEM certificate")
    return pem


def read_password(path: Path) -> str:
    try:
        lines = path.read_bytes().decode().lstrip("\ufeff").splitlines()
    except OSError as exc:
        raise SetupError(f"cannot read the community password {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        # UTF-16 or Latin-1 (a Windows editor): the bytes sent would not be the password typed.
        raise SetupError(f"{path.name} is not UTF-8 text (save it as UTF-8)") from exc
    password = lines[0].strip() if lines else ""
    if not password:
        raise SetupError(f"{path} is empty")
    return password


def community(root: Path, node_id: str | None) -> tuple[Community | None, str]:
    """The community settings and where they came from (None: standalone)."""
    env = os.environ
    boot = root / BOOT
    if env.get("COMMUNITY_HOST"):
        origin = "the environment"
        values = {"host": env["COMMUNITY_HOST"], "port": env.get("COMMUNITY_PORT", "")}
        values["login"] = env.get("COMMUNITY_LOGIN", "")
        values["reconnect_max_s"] = env.get("COMMUNITY_RECONNECT_MAX_S", "")
        ca = Path(env["COMMUNITY_CA"]) if env.get("COMMUNITY_CA") else None
        password_file = env.get("COMMUNITY_PASSWORD_FILE")
        password_path = Path(password_file) if password_file else root / KEPT_PASSWORD
    elif (boot / BOOT_SETTINGS).is_file():
        origin = f"/{BOOT}/{BOOT_SETTINGS}"
        values = parse_settings((boot / BOOT_SETTINGS).read_text(errors="replace"), origin)
        ca = boot / BOOT_CA if (boot / BOOT_CA).is_file() else None
        password_path = boot / BOOT_PASSWORD
        if not password_path.is_file():
            # Moved off the card by an earlier failed run, or imported by an earlier good one.
            pending = root / PENDING_PASSWORD
            password_path = pending if pending.is_file() else root / KEPT_PASSWORD
    elif (root / KEPT_SETTINGS).is_file():
        origin = f"/{KEPT_SETTINGS}"
        values = parse_settings((root / KEPT_SETTINGS).read_text(errors="replace"), origin)
        ca = root / KEPT_CA if (root / KEPT_CA).is_file() else None
        password_path = root / KEPT_PASSWORD
    else:
        return None, "no community settings"

    host = values.get("host", "")
    if not valid_host(host):
        raise SetupError(f"{origin}: host {host!r} is not a host name or address")
    try:
        port = int(values.get("port") or 8883)
        reconnect_max_s = int(values.get("reconnect_max_s") or 30)
    except ValueError as exc:
        raise SetupError(f"{origin}: port and reconnect_max_s are whole numbers") from exc
    if not 1 <= port <= 65_535 or not 2 <= reconnect_max_s <= 3_600:
        raise SetupError(f"{origin}: port is 1-65535 and reconnect_max_s 2-3600")
    login = values.get("login") or node_id or ""
    if login and not NAME_RE.match(login):
        # The login names the node at its first boot: the same rule as a node id.
        raise SetupError(
            f"{origin}: login {login!r} is not lower-case letters, digits, - and _ (no spaces)"
        )
    if node_id is not None and login != node_id:
        # The community broker's ACL lets a login publish only under `<base>/<login>/`: a
        # login other than the node id would have every message of the node refused.
        raise SetupError(f"{origin}: login {login!r} must be the node id {node_id!r}")
    settings = Community(
        host=host.strip("[]"),
        port=port,
        login=login,
        password=read_password(password_path),
        ca_pem=read_pem(ca) if ca is not None else None,
        reconnect_max_s=reconnect_max_s,
    )
    if any(c.isspace() for c in settings.password):
        raise SetupError(f"{password_path}: the password has white space in it")
    return settings, origin


def valid_host(host: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 address (bare or in balanced brackets)."""
    bracketed = host.startswith("[") or host.endswith("]")
    if bracketed and not (host.startswith("[") and host.endswith("]")):
        return False
    inner = host[1:-1] if bracketed else host
    if bracketed or ":" in inner:
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return False
        return True
    return bool(HOST_RE.match(inner))


def mosquitto_ids(root: Path) -> tuple[int, int] | None:
    """uid and gid of the `mosquitto` user in ROOT, if the package made it."""
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "mosquitto" and len(fields) > 3:
                return int(fields[2]), int(fields[3])
    except (OSError, ValueError):
        pass
    return None


def write(path: Path, text: str, mode: int = 0o644, group: int | None = None) -> None:
    """Write `text` whole or not at all (a reload never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, mode)
    if group is not None and os.geteuid() == 0:
        os.chown(tmp, 0, group)
    os.replace(tmp, path)


def render(template: str, values: dict[str, str]) -> str:
    """`@KEY@` of the template replaced in one pass: a value (a password) holding `@…@` is
    written as it is, never taken for a placeholder."""
    left = sorted(set(PLACEHOLDER_RE.findall(template)) - values.keys())
    if left:
        raise SetupError(f"template placeholders without a value: {left}")
    return PLACEHOLDER_RE.sub(lambda found: values[found.group(1)], template)


def keep(root: Path, settings: Community) -> None:
    """Keep the settings under /etc so later runs (and reinstalls) find them."""
    write(
        root / KEPT_SETTINGS,
        "# The community broker this node bridges to (see daisee-mosquitto-setup).\n"
        f"host = {settings.host}\nport = {settings.port}\n"
        + (f"login = {settings.login}\n" if settings.login else "")
        + f"reconnect_max_s = {settings.reconnect_max_s}\n",
    )
    write(root / KEPT_PASSWORD, settings.password + "\n", mode=0o600)
    if settings.ca_pem is not None:
        write(root / KEPT_CA, settings.ca_pem)
    else:
        (root / KEPT_CA).unlink(missing_ok=True)


def take_off_boot(root: Path) -> None:
    """The boot partition's settings are kept under /etc now: off the partition (the password
    above all: anyone holding the card reads it), so that editing the kept ones takes effect."""
    for name in (BOOT_SETTINGS, BOOT_CA, BOOT_PASSWORD):
        (root / BOOT / name).unlink(missing_ok=True)
    (root / PENDING_PASSWORD).unlink(missing_ok=True)


def park_boot_password(root: Path) -> str:
    """After a failure: the boot partition's password moved to a root-only file for the next
    run (anyone holding the card could read it there). Returns what to tell the operator."""
    source = root / BOOT / BOOT_PASSWORD
    if not source.is_file():
        return f"fix the settings, then run `{COMMAND}`"
    pending = root / PENDING_PASSWORD
    pending.parent.mkdir(parents=True, exist_ok=True)
    tmp = pending.with_name(pending.name + ".new")
    tmp.unlink(missing_ok=True)
    # Bytes as they are: the password may be the very file that failed to decode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(source.read_bytes())
    os.replace(tmp, pending)
    source.unlink()
    return (
        f"{BOOT_PASSWORD} moved off the boot partition to /{PENDING_PASSWORD}; fix the "
        f"settings (a new {BOOT_PASSWORD} on the boot partition replaces it), then run "
        f"`{COMMAND}`"
    )


def bridge_conf(templates: Path, settings: Community, node_id: str, base: str) -> str:
    if settings.ca_pem is not None:
        ca_line = f"bridge_cafile /{KEPT_CA}"
    else:
        ca_line = f"bridge_capath {SYSTEM_CAPATH}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return render(
        (templates / "mosquitto-bridge.conf").read_text(),
        {
            "ADDRESS": f"{host}:{settings.port}",
            "LOGIN": settings.login,
            "PASSWORD": settings.password,
            "CA_LINE": ca_line,
            "RECONNECT_MAX_S": str(settings.reconnect_max_s),
            "BASE": base,
            "NODE_ID": node_id,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--templates",
        type=Path,
        help="folder of the mosquitto-*.conf/.acl templates "
        "(default: beside this script, else ROOT/usr/local/share/daisee-node/mosquitto)",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="forget the community settings; no bridge"
    )
    args = parser.parse_args(argv)
    root = Path(os.environ.get("ROOT") or "/")
    templates = args.templates
    if templates is None:
        here = Path(__file__).resolve().parent
        shared = root / "usr/local/share/daisee-node/mosquitto"
        templates = here if (here / "mosquitto-daisee.acl").is_file() else shared
    try:
        node_id, base = node_names(root)
        write(root / LISTENER_CONF, (templates / "mosquitto-daisee.conf").read_text())
        if node_id is not None:
            acl = (templates / "mosquitto-daisee.acl").read_text()
            write(root / ACL, render(acl, {"BASE": base, "NODE_ID": node_id}))
        if args.standalone:
            for name in (BRIDGE_CONF, KEPT_SETTINGS, KEPT_PASSWORD, KEPT_CA, PENDING_PASSWORD):
                (root / name).unlink(missing_ok=True)
            say("standalone: no community bridge")
            return 0
        settings, origin = community(root, node_id)
        if settings is None:
            (root / BRIDGE_CONF).unlink(missing_ok=True)
            say("no community settings: standalone")
            return 0
        if node_id is None:
            # An install before the first boot: the settings wait for the node's id.
            keep(root, settings)
            if origin.endswith(BOOT_SETTINGS):
                take_off_boot(root)
            say(f"community settings from {origin} kept; the first boot names the node")
            return 0
        ids = mosquitto_ids(root)
        text = bridge_conf(templates, settings, node_id, base)
        keep(root, settings)
        write(root / BRIDGE_CONF, text, mode=0o640, group=ids[1] if ids else None)
        if origin.endswith(BOOT_SETTINGS):
            take_off_boot(root)
        say(
            f"bridge to {settings.host}:{settings.port} as {settings.login} "
            f"({'CA /' + KEPT_CA if settings.ca_pem else 'system CAs'}), from {origin}"
        )
        return 0
    except (SetupError, OSError, UnicodeDecodeError) as exc:
        try:
            retry = park_boot_password(root)
        except OSError as park_exc:
            retry = f"cannot move {BOOT_PASSWORD} off the boot partition: {park_exc}"
        print(f"daisee-mosquitto-setup: {exc}; {retry}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
