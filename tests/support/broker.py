"""A real mosquitto broker on a free loopback port, with a password file and an ACL."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port

# user → (password, ACL lines)
USERS = {
    "node": ("node-secret", ["topic readwrite daisee/#", "topic readwrite homeassistant/#"]),
    "ha": (
        "ha-secret",
        ["topic read daisee/#", "topic read homeassistant/#", "topic write daisee/+/relay/+/set"],
    ),
    "viewer": ("viewer-secret", ["topic read daisee/#", "topic read homeassistant/#"]),
}


def _binary(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        raise RuntimeError(f"{name} is missing: `./run test` installs mosquitto with apt")
    return path


def make_tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl); returns ca, cert, key."""
    ca_key, ca, key, csr, cert = (
        workdir / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is missing")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext = workdir / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


#: with `node_logins`: each node login may write only under its own name (`%u` is the login, the
#: node id) and read its own topics (relay commands) and every node's signed peer messages
NODE_PATTERNS = [
    "pattern write daisee/%u/#",
    "pattern read daisee/%u/#",
    "pattern read daisee/+/peer",
    "pattern read daisee/+/market/line/+",
]


class Broker:
    """mosquitto with users `node`, `ha` (may command relays) and `viewer` (read only); with
    `node_logins`, one more login per node id, held to its own topics by `NODE_PATTERNS`."""

    def __init__(self, workdir: Path, tls: bool = False, node_logins: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        passwd = workdir / "passwd"
        passwd.touch(mode=0o600)
        self.passwords = {user: password for user, (password, _) in USERS.items()}
        self.passwords.update({login: f"{login}-secret" for login in node_logins})
        for user, password in self.passwords.items():
            subprocess.run(
                [_binary("mosquitto_passwd"), "-b", str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        acl = workdir / "acl"
        patterns = "".join(f"{line}\n" for line in NODE_PATTERNS) + "\n" if node_logins else ""
        acl.write_text(
            patterns
            + "".join(f"user {u}\n" + "\n".join(lines) + "\n\n" for u, (_, lines) in USERS.items())
        )
        self.ca: Path | None = None
        tls_lines = ""
        if tls:
            self.ca, cert, key = make_tls_files(workdir)
            tls_lines = f"cafile {self.ca}\ncertfile {cert}\nkeyfile {key}\n"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            # run as whoever started it (as root, mosquitto would switch to a user that cannot
            # read these files)
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n" + tls_lines + "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {acl}\n"
            "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    def password_file(self, user: str) -> Path:
        path = self.workdir / f"{user}.pass"
        path.write_text(self.passwords[user] + "\n")
        path.chmod(0o600)  # the node refuses a password others can read
        return path

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_binary("mosquitto"), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited: {log}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
