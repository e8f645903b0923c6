"""The chain client the image build puts on a Pi: geth 1.13.15 cross-built for arm64 by
`firmware/build-geth.sh` (pure Go), run under qemu's user-mode emulation: it starts, seals Clique
blocks as a signer from a genesis `chain-spec` wrote, and answers JSON-RPC."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from daisee_node.ledger import chainspec
from daisee_node.ledger.keys import new_keystore
from tests.conftest import ROOT, free_port, wait_for
from tests.support.geth import RPCError, rpc

pytestmark = [pytest.mark.slow, pytest.mark.arm64_vm]  # a cross-build of minutes, then emulation

CACHE = Path.home() / ".cache/daisee-node/geth-1.13.15-linux-arm64/geth"


def arm64_geth() -> Path:
    """The pi-gen stage's geth, built once into the same cache the stage uses."""
    if not CACHE.exists():
        done = subprocess.run(
            ["bash", str(ROOT / "firmware/build-geth.sh"), "arm64", str(CACHE)],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    return CACHE


def test_the_images_geth_runs_on_arm64_and_seals(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-aarch64-static")
    assert qemu, "qemu-user-static is missing: `./run test-arm64` installs it"
    geth = arm64_geth()
    version = subprocess.run([qemu, str(geth), "version"], capture_output=True, text=True)
    assert "Version: 1.13.15" in version.stdout and "Architecture: arm64" in version.stdout
    keystore = tmp_path / "keystore"
    signer = new_keystore(keystore / "sealer.json", tmp_path / "sealer.pass")
    (tmp_path / "genesis.json").write_text(json.dumps(chainspec.clique([signer], 4242, 1, {})))
    data = tmp_path / "chain"
    init = subprocess.run(
        [qemu, str(geth), "--datadir", str(data), "init", str(tmp_path / "genesis.json")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr[-1000:]
    http = free_port()
    log = (tmp_path / "geth.log").open("w")
    proc = subprocess.Popen(
        [qemu, str(geth), "--datadir", str(data), "--networkid", "4242", "--port", "0",
         "--nodiscover", "--http", "--http.api", "eth,clique", "--http.port", str(http),
         "--authrpc.port", str(free_port()),
         "--mine", "--miner.etherbase", signer, "--unlock", signer, "--password",
         str(tmp_path / "sealer.pass"), "--keystore", str(keystore), "--allow-insecure-unlock"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http}"

    def height() -> int:
        try:
            return int(rpc(url, "eth_blockNumber"), 16)
        except (OSError, RPCError):
            return -1

    try:
        wait_for(lambda: height() >= 2, timeout=300, every=1.0)
        assert [s.lower() for s in rpc(url, "clique_getSigners", ["latest"])] == [signer.lower()]
    finally:
        proc.terminate()
        proc.wait(60)
