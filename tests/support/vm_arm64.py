"""The node's image on arm64, booted in a virtual machine: `qemu-system-aarch64 -M virt`.

A Debian bookworm arm64 root filesystem is made with `debootstrap --foreign` and finished under
`qemu-user-static` (about ten minutes here, so it is cached under
`~/.cache/daisee-node/rootfs/`, keyed by its package list). It carries Debian's arm64 kernel and
initramfs (virtio drivers included), and the QEMU guest agent, through which the tests run
commands in the guest: one virtio-serial channel, no login, no network, no console parsing.

Each image is a copy of that root with the node installed by `firmware/install-node.sh`, run
inside the copy (`systemd-nspawn`, arm64 binaries through binfmt). pip installs from wheels
fetched on the host for aarch64 (every compiled dependency has one on PyPI), so nothing is
compiled under emulation. The copy becomes an ext4 disk image (`mkfs.ext4 -d`, no loop mount),
booted with cgroup v2. The disk is opened `cache=writethrough`: whatever the guest has written
is on the host's disk, and killing QEMU loses exactly what a power cut loses, the guest's page
cache and anything not yet written out.

A missing tool (qemu-system-arm, qemu-user-static, debootstrap, systemd-container, e2fsprogs)
is a test failure, never a skip.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ARCH = "arm64"
PACKAGE_LIST = ROOT / "firmware/pi-gen/stage-daisee/00-install/00-packages"
#: under the pi-gen stage's packages: an init system, D-Bus and udev (as Raspberry Pi OS Lite
#: has), the kernel with its initramfs, and the guest agent the tests talk to.
VM_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "linux-image-arm64",
    "qemu-guest-agent",
)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "daisee-node"
#: pip's platform tags for Debian bookworm on aarch64 (glibc 2.36)
AARCH64_PLATFORMS = (
    "manylinux2014_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_34_aarch64",
    "manylinux_2_36_aarch64",
)
GUEST_PYTHON = "3.11"
#: not part of the package: left out of the copy the node's wheel is built from
SOURCE_EXCLUDE = (
    ".git",
    ".venv*",
    "node_modules",
    "build",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
)
DISK_SIZE = "3G"
KERNEL_ARGS = (
    "root=/dev/vda rw rootfstype=ext4 console=ttyAMA0 systemd.unified_cgroup_hierarchy=1 "
    "systemd.show_status=1 net.ifnames=0"
)


def tool(name: str) -> str:
    """The path of a host tool; a clear failure naming its Debian package otherwise."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    assert path, (
        f"{name} is missing: apt-get install qemu-system-arm qemu-user-static debootstrap "
        "systemd-container e2fsprogs"
    )
    return path


def packages() -> list[str]:
    """The root filesystem's package list: the pi-gen stage's and what the machine needs."""
    words = [w for w in PACKAGE_LIST.read_text().split() if not w.startswith("#")]
    return sorted({*words, *VM_PACKAGES})


def rootfs_key() -> str:
    """The cache key of the base root filesystem: suite, architecture and package list."""
    recipe = [SUITE, ARCH, MIRROR, packages(), INITRAMFS_FILES]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
    return f"{SUITE}-{ARCH}-vm-{digest[:12]}"


#: The initramfs holds only what the virt machine's root disk needs. Debian's default
#: (MODULES=most) copies hundreds of modules, one emulated process each: some ten minutes per
#: generation under qemu-user, and the second stage generates it twice.
INITRAMFS_FILES = {
    "etc/initramfs-tools/conf.d/daisee-vm.conf": ("MODULES=list\n", 0o644),
    "etc/initramfs-tools/hooks/daisee-vm": (
        "#!/bin/sh\n"
        'case "$1" in prereqs) exit 0 ;; esac\n'
        ". /usr/share/initramfs-tools/hook-functions\n"
        "for module in virtio_pci virtio_mmio virtio_blk ext4 crc32c_generic; do\n"
        '    manual_add_modules "$module"\n'
        "done\n"
        "force_load virtio_blk\n",
        0o755,
    ),
}


def _write_initramfs_files(root: Path) -> None:
    for name, (text, mode) in INITRAMFS_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)


def _enable_binfmt() -> None:
    """Let the host run arm64 binaries (qemu-user-static's binfmt entry, fixed interpreter)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=True)
    if not (misc / "qemu-aarch64").exists():
        conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
        assert conf.exists(), "qemu-user-static is missing (its binfmt entry for aarch64)"
        (misc / "register").write_text(conf.read_text().strip())
    assert (misc / "qemu-aarch64").read_text().startswith("enabled"), "binfmt aarch64 disabled"


def base_rootfs() -> Path:
    """The cached arm64 root filesystem, made first if needed (10–15 minutes here)."""
    cache = CACHE / "rootfs"
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / rootfs_key()
    if (done / "etc/os-release").exists():
        return done
    _enable_binfmt()
    with open(cache / f"{done.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others use its result
        if (done / "etc/os-release").exists():
            return done
        work = cache / f"{done.name}.partial"
        shutil.rmtree(work, ignore_errors=True)
        first = subprocess.run(
            [
                tool("debootstrap"),
                "--foreign",
                f"--arch={ARCH}",
                "--variant=minbase",
                f"--include={','.join(packages())}",
                SUITE,
                str(work),
                MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert first.returncode == 0, f"debootstrap failed:\n{first.stdout[-3000:]}"
        _write_initramfs_files(work)  # in place before the kernel's package is configured
        # The second stage runs the packages' scripts as arm64 code under qemu-user: the slow part.
        second = subprocess.run(
            ["chroot", str(work), "/debootstrap/debootstrap", "--second-stage"],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert second.returncode == 0, f"second stage failed:\n{second.stdout[-3000:]}"
        work.rename(done)
    return done


def _aarch64_wheels() -> Path:
    """Wheels for aarch64 of every dependency of the node, fetched on the host (cached)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    digest = hashlib.sha256(json.dumps([GUEST_PYTHON, requirements]).encode()).hexdigest()[:12]
    wheels = CACHE / f"wheels-aarch64-{digest}"
    if (wheels / ".complete").exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    platform = [a for p in AARCH64_PLATFORMS for a in ("--platform", p)]
    for _ in range(10):
        download = [*pip, "download", "--quiet", "--only-binary=:all:", *platform]
        download += ["--python-version", GUEST_PYTHON, "--implementation", "cp"]
        download += ["--find-links", str(wheels), "--dest", str(wheels), *requirements]
        result = subprocess.run(
            download,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode == 0:
            (wheels / ".complete").touch()
            return wheels
        # A dependency published only as source: pure Python ones are built here (any arch).
        missing = re.search(
            r"No matching distribution found for ([A-Za-z0-9_.\-\[\]]+)", result.stderr
        )
        assert missing, f"pip download failed:\n{result.stderr[-3000:]}"
        name = missing.group(1)
        subprocess.run(
            [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), name],
            check=True,
            timeout=900,
        )
        built = [w.name for w in wheels.glob("*.whl") if "-none-any" not in w.name]
        assert not any(name.replace("-", "_").lower() in w.lower() for w in built), (
            f"{name} has no aarch64 wheel and is not pure Python: it would compile in the guest"
        )
    raise AssertionError("pip download kept failing")


def node_config(template: str) -> str:
    """The image's config.toml made testable in a machine with no hardware: the grid meter
    replaced by a simulated PV sensor at 10 Hz, GPIO mocked, one relay (GPIO17)."""
    grid = re.compile(r'\[\[sensors\]\]\nname = "grid"\n.*?interval_s = [0-9.]+\n', re.S)
    simulated = '[[sensors]]\nname = "pv"\nkind = "simulated"\nmodel = "pv"\ninterval_s = 0.1\n'
    text, count = grid.subn(simulated, template)
    assert count == 1, "firmware/files/config.toml no longer has the grid meter block"
    text, count = re.subn(r'(?m)^backend = "native"$', 'backend = "mock"', text)
    assert count == 1, "firmware/files/config.toml no longer has [gpio] backend"
    relay = '[[relays]]\nname = "supply_neighbour"\npin = 17\nsafe_state = "off"\n'
    text, count = re.subn(r"(?m)^# \[\[relays\]\]\n(#.*\n)+", relay, text)
    assert count == 1, "firmware/files/config.toml no longer has the commented relay example"
    return text


@dataclass(frozen=True)
class Image:
    """A bootable arm64 image: its disk (raw ext4), kernel and initramfs."""

    disk: Path
    kernel: Path
    initrd: Path


def _nspawn(root: Path, *command: str, env: dict[str, str], timeout: float) -> str:
    args = [tool("systemd-nspawn"), "--quiet", f"--directory={root}", "--register=no"]
    args += ["--keep-unit", "--resolv-conf=off", "--timezone=off", "--link-journal=no"]
    args += [f"--setenv={k}={v}" for k, v in env.items()]
    result = subprocess.run(
        [*args, *command], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{command} failed in the root:\n{result.stdout}{result.stderr}"
    return result.stdout


def build_image(workdir: Path) -> Image:
    """A fresh image of this source tree: base root + `install-node.sh` + a testable config."""
    base = base_rootfs()
    _enable_binfmt()
    wheels = _aarch64_wheels()
    root = workdir / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=900)
    # The node as a wheel (pure Python, built here) and the installer with its files.
    dist = root / "root/wheels"
    shutil.copytree(wheels, dist)
    # Built from a clean copy of the source tree: no build files land in the tree itself.
    source = workdir / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SOURCE_EXCLUDE))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    pip_wheel += ["--no-index", "--find-links", str(wheels), "--wheel-dir", str(dist), str(source)]
    subprocess.run(pip_wheel, check=True, timeout=600, cwd=workdir)
    shutil.rmtree(source)
    tree = root / "root/daisee-node"
    for part in ("firmware", "systemd"):
        shutil.copytree(ROOT / part, tree / part)
    (root / "etc/daisee-node").mkdir(mode=0o750)
    (root / "etc/daisee-node/config.toml").write_text(
        node_config((ROOT / "firmware/files/config.toml").read_text())
    )
    wheel = next(dist.glob("daisee_node-*.whl"))
    env = {
        "ROOT": "/",
        "PACKAGE": f"/root/wheels/{wheel.name}",
        "PIP_ARGS": "--no-index --find-links /root/wheels",
    }
    _nspawn(root, "bash", "/root/daisee-node/firmware/install-node.sh", env=env, timeout=1800)
    shutil.rmtree(dist)
    shutil.rmtree(tree)
    # Each image boots as a new machine (like a flashed card): systemd fills machine-id.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("daisee-arm64\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    assert kernels and initrds, "linux-image-arm64 left no kernel or initramfs in /boot"
    kernel, initrd = workdir / "vmlinuz", workdir / "initrd.img"
    shutil.copy(kernels[-1], kernel)
    shutil.copy(initrds[-1], initrd)
    disk = workdir / "disk.raw"
    subprocess.run(["truncate", "-s", DISK_SIZE, str(disk)], check=True)
    subprocess.run(
        [tool("mkfs.ext4"), "-q", "-F", "-L", "daisee-root", "-d", str(root), str(disk)],
        check=True,
        timeout=900,
    )
    shutil.rmtree(root)
    return Image(disk=disk, kernel=kernel, initrd=initrd)


class AgentError(RuntimeError):
    """The guest agent did not answer in time, or answered with an error."""


@dataclass(frozen=True)
class Completed:
    """A command's result in the guest."""

    exitcode: int
    out: str
    err: str


class Agent:
    """The QEMU guest agent's protocol (JSON lines) over the machine's virtio-serial socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.path))
            self.sock, self.buffer = sock, b""
        return self.sock

    def _read_json(self, deadline: float) -> dict[str, Any]:
        sock = self._connect()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError("no answer from the guest agent")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise AgentError("no answer from the guest agent") from exc
            if not chunk:
                self.close()
                raise AgentError("the machine closed the agent channel")
            # 0xff starts the answer to guest-sync-delimited: what came before is stale.
            if b"\xff" in chunk:
                chunk = chunk[chunk.rindex(b"\xff") + 1 :]
                self.buffer = b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line) if line.strip() else self._read_json(deadline)

    def _send(self, message: dict[str, Any]) -> None:
        self._connect().sendall(json.dumps(message).encode() + b"\n")

    def sync(self, timeout: float) -> None:
        """Wait until the agent answers (it starts late in a boot), dropping stale answers."""
        deadline = time.monotonic() + timeout
        while True:
            token = uuid.uuid4().int & 0x7FFFFFFF
            try:
                self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
                answer_by = min(deadline, time.monotonic() + 5)
                while True:
                    if self._read_json(answer_by).get("return") == token:
                        return
            except (AgentError, OSError) as exc:
                self.close()
                if time.monotonic() >= deadline:
                    raise AgentError(f"guest agent not answering after {timeout:.0f} s") from exc
                time.sleep(0.5)

    def call(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """One agent command; its `return` value."""
        self.sync(timeout)
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        answer = self._read_json(time.monotonic() + timeout)
        if "error" in answer:
            raise AgentError(f"{command}: {answer['error']}")
        return answer.get("return")


class Machine:
    """An arm64 virtual machine booted from an `Image`; commands run through the guest agent."""

    def __init__(self, image: Image, workdir: Path, name: str) -> None:
        self.image = image
        self.console = workdir / f"{name}-console.log"
        self.agent = Agent(workdir / f"{name}-qga.sock")
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        """Boot (returns at once; `wait_agent` waits for the guest to answer)."""
        self.agent.path.unlink(missing_ok=True)
        args = [tool("qemu-system-aarch64"), "-M", "virt", "-cpu", "cortex-a72", "-smp", "2"]
        args += ["-m", "1024", "-accel", "tcg,thread=multi", "-nographic", "-nic", "none"]
        args += ["-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)]
        args += ["-append", KERNEL_ARGS, "-serial", f"file:{self.console}", "-monitor", "none"]
        args += ["-drive", f"file={self.image.disk},if=virtio,format=raw,cache=writethrough"]
        args += ["-device", "virtio-serial-pci", "-device", "virtio-rng-pci"]
        args += ["-chardev", f"socket,path={self.agent.path},server=on,wait=off,id=qga0"]
        args += ["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while not self.agent.path.exists():
            assert self.process.poll() is None, f"qemu failed: {self.process.stderr}"
            assert time.monotonic() < deadline, "qemu made no agent socket in 30 s"
            time.sleep(0.05)

    def wait_agent(self, timeout: float) -> float:
        """Wait for the guest agent; the seconds since `start`."""
        try:
            self.agent.sync(timeout)
        except AgentError as exc:
            raise AgentError(f"{exc}; console:\n{self.console_tail()}") from exc
        return time.monotonic() - self.started

    def console_tail(self, chars: int = 4000) -> str:
        return self.console.read_text(errors="replace")[-chars:] if self.console.exists() else ""

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> Completed:
        """Run `command` with /bin/sh in the guest, as root; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        started = self.agent.call(
            "guest-exec",
            timeout=timeout,
            path="/bin/sh",
            arg=["-c", command],
            **{"capture-output": True},
        )
        pid = started["pid"]
        while True:
            status = self.agent.call("guest-exec-status", timeout=timeout, pid=pid)
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                self.run(f"kill -9 {pid}", timeout=30, check=False)
                raise AgentError(f"`{command}` still running after {timeout} s")
            time.sleep(0.1)
        done = Completed(
            exitcode=status.get("exitcode", -1),
            out=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
            err=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
        )
        if check and done.exitcode != 0:
            raise AgentError(f"`{command}` exited {done.exitcode}:\n{done.out}{done.err}")
        return done

    def out(self, command: str, timeout: float = 60.0) -> str:
        """A command's standard output, stripped (it must succeed)."""
        return self.run(command, timeout).out.strip()

    def guest_clock_offset(self) -> tuple[float, float]:
        """(guest wall clock − host wall clock, ± uncertainty) in seconds, from guest-get-time."""
        before = time.time()
        guest_ns = self.agent.call("guest-get-time", timeout=10)
        after = time.time()
        return guest_ns / 1e9 - (before + after) / 2, (after - before) / 2

    def power_cut(self) -> float:
        """Kill QEMU at once, as pulling the plug would; the host wall-clock time of the cut."""
        assert self.process is not None
        cut = time.time()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.agent.close()
        return cut

    def shutdown(self, timeout: float = 180.0) -> None:
        """A clean poweroff; the machine killed if it is not off within `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(AgentError, OSError):
            self.agent._send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise AssertionError(f"no poweroff in {timeout} s:\n{self.console_tail()}") from None
        finally:
            self.agent.close()

    def kill(self) -> None:
        """Stop QEMU whatever state it is in (cleanup)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.agent.close()


@contextlib.contextmanager
def booted(image: Image, workdir: Path, name: str, timeout: float) -> Iterator[Machine]:
    """A machine booted from `image`, its agent answering; never left running."""
    machine = Machine(image, workdir, name)
    machine.start()
    try:
        machine.wait_agent(timeout)
        yield machine
    finally:
        machine.kill()
