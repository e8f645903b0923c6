"""The node's image, booted: a Debian root filesystem with the packages the Pi image installs,
the node installed by `firmware/install-node.sh` inside it, booted on a real systemd.

The root filesystem is made by `debootstrap` (minbase, the pi-gen stage's package list plus the
init system a Raspberry Pi OS Lite has) and cached under `~/.cache/daisee-node/rootfs/`, keyed by
that list; each test copies it, installs the node from this source tree inside the copy, and boots
the copy with `systemd-nspawn -b`. The host's PID 1 need not be systemd: the container is started
with `--register=no --keep-unit` and entered with `nsenter`. Its network is private (loopback
only), so its mosquitto never meets the host's test brokers.

What the tests need from the host comes from Debian's packages: `./run test` installs
debootstrap and systemd-container. A missing tool is a test failure, never a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGE_LIST = ROOT / "firmware/pi-gen/stage-daisee/00-install/00-packages"
#: what Raspberry Pi OS Lite has under the stage's packages: an init system and D-Bus. Not
#: procps: the unit must work without /bin/kill, as a minimal Debian has none.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "ca-certificates")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "daisee-node" / "rootfs"
#: the source tree, as a clean clone has it (no venvs, caches or chain tools)
EXCLUDE = (".git", ".venv", ".venv-hass", "node_modules", "build", "daisee-demo")
EXCLUDE_GLOBS = ("__pycache__", "*.egg-info", ".*_cache")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    assert path, f"{name} is missing: `./run test` installs it (debootstrap, systemd-container)"
    return path


def stage_packages() -> list[str]:
    """The Debian packages the pi-gen stage installs, as its list file names them."""
    words = PACKAGE_LIST.read_text().split()
    return [w for w in words if not w.startswith("#")]


def rootfs_key(arch: str) -> str:
    packages = sorted({*stage_packages(), *BASE_PACKAGES})
    digest = hashlib.sha256(json.dumps([SUITE, arch, packages]).encode()).hexdigest()[:12]
    return f"{SUITE}-{arch}-{digest}"


def base_rootfs(arch: str = "amd64") -> Path:
    """The cached root filesystem for `arch`, made first if needed (about a minute on amd64)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done = CACHE / rootfs_key(arch)
    if (done / "etc/os-release").exists():
        return done
    with open(CACHE / f"{done.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time, others wait for its result
        if (done / "etc/os-release").exists():
            return done
        work = CACHE / f"{done.name}.partial"
        shutil.rmtree(work, ignore_errors=True)
        include = ",".join(sorted({*stage_packages(), *BASE_PACKAGES}))
        result = subprocess.run(
            [
                tool("debootstrap"),
                "--variant=minbase",
                f"--arch={arch}",
                f"--include={include}",
                SUITE,
                str(work),
                MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}"
        # Each copy boots as a new machine: an empty machine-id is filled at first boot.
        (work / "etc/machine-id").write_text("")
        work.rename(done)
    return done


def copy_tree(dest: Path) -> None:
    """This source tree, as a clean clone has it, into `dest`."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if Path(folder) == ROOT and n in EXCLUDE}
        for pattern in EXCLUDE_GLOBS:
            skip |= {n for n in names if Path(n).match(pattern)}
        return skip

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def nspawn_run(
    root: Path,
    *command: str,
    env: dict[str, str] | None = None,
    binds: dict[Path, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `root` (not booted), as the image build's chroot would."""
    args = [
        tool("systemd-nspawn"),
        "--quiet",
        f"--directory={root}",
        "--register=no",
        "--keep-unit",
        "--resolv-conf=copy-host",
    ]
    args += [f"--setenv={k}={v}" for k, v in (env or {}).items()]
    args += [f"--bind={host}:{inside}" for host, inside in (binds or {}).items()]
    return subprocess.run(
        [*args, *command], capture_output=True, text=True, timeout=timeout, check=False
    )


def installed_root(dest: Path, arch: str = "amd64") -> Path:
    """A copy of the base root filesystem with the node installed by `install-node.sh`."""
    base = base_rootfs(arch)
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(dest)], check=True, timeout=600)
    copy_tree(dest / "root/daisee-node")
    env = {"ROOT": "/", "PACKAGE": "/root/daisee-node", "PIP_DEFAULT_TIMEOUT": "180"}
    # The host may reach PyPI through a proxy with its own certificate authority.
    host_ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(host_ca).exists():
        shutil.copy(host_ca, dest / "root/host-ca.crt")
        env["PIP_CERT"] = "/root/host-ca.crt"
    # pip's downloads are kept between runs: the package changes, its dependencies seldom do.
    pip_cache = CACHE.parent / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    result = nspawn_run(
        dest,
        "bash",
        "/root/daisee-node/firmware/install-node.sh",
        env=env,
        binds={pip_cache: "/root/.cache/pip"},
    )
    assert result.returncode == 0, f"install-node.sh failed:\n{result.stdout}\n{result.stderr}"
    shutil.rmtree(dest / "root/daisee-node")
    return dest


class Machine:
    """A root filesystem booted with `systemd-nspawn -b`, entered with `nsenter`."""

    def __init__(self, root: Path, name: str, console: Path) -> None:
        self.root = root
        self.name = name
        self.console_path = console
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # CLOCK_MONOTONIC, which the container shares with the host

    def boot(self) -> None:
        """Start the container's init; returns once it runs (the boot goes on)."""
        self.started_at = time.monotonic()
        with open(self.console_path, "ab") as console:
            self.process = subprocess.Popen(
                [
                    tool("systemd-nspawn"),
                    "--quiet",
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--console=passive",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait(lambda: self.init_pid() is not None, 30, "the container's init to start")

    def init_pid(self) -> int | None:
        """The container's PID 1, as the host sees it (a child of systemd-nspawn)."""
        if self.process is None or self.process.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids = children.read_text().split()
        except OSError:
            return None
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def run(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """A shell command inside the booted container, as root; its standard output."""
        pid = self.init_pid()
        assert pid is not None, f"the container is not running:\n{self.console()}"
        result = subprocess.run(
            [tool("nsenter"), f"--target={pid}", "--all", "/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        if check:
            assert result.returncode == 0, (
                f"`{command}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of a unit."""
        out = self.run(f"systemctl show {shlex.quote(unit)} -p {','.join(props)}", timeout=30)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll until `predicate()` is truthy; fail with the console's tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                value = predicate()
                if value:
                    return value
            time.sleep(0.2)
        raise AssertionError(f"gave up after {timeout} s waiting for {what}\n{self.console()}")

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return self.console_path.read_text(errors="replace")[-4000:]
        return ""

    def poweroff(self, timeout: float = 60) -> None:
        """A clean shutdown: `systemctl poweroff`, then wait for the container to end."""
        assert self.process is not None
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.run("systemctl poweroff --no-block", timeout=20)
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """End the container at once: SIGKILL to its init takes every process in it along."""
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@contextlib.contextmanager
def booted(root: Path, name: str, console: Path) -> Iterator[Machine]:
    """A booted container that is always torn down, whatever the test did."""
    machine = Machine(root, name, console)
    machine.boot()
    try:
        yield machine
    finally:
        machine.kill()
