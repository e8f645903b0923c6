"""The service unit: systemd's own checker accepts it, and it keeps the promises we rely on."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "daisee-node.service"
CHAIN_UNIT = ROOT / "systemd" / "daisee-chain.service"


def offline_root(tmp_path: Path) -> Path:
    """A root with the unit installed, the binaries it names, and the system's own units."""
    root = tmp_path / "root"
    venv_bin = root / "opt/daisee-node/venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "daisee-node").write_text("#!/bin/sh\n")
    (venv_bin / "daisee-node").chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/sh", root / "bin/sh")
    system = next(
        p
        for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
        if (p / "sysinit.target").exists()
    )
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (UNIT, CHAIN_UNIT):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: `./run test` installs systemd with apt"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def verify(root: Path, unit: str = "daisee-node.service") -> subprocess.CompletedProcess[str]:
    return analyze(
        "verify", f"--root={root}", "--man=no", "--generators=no", f"/etc/systemd/system/{unit}"
    )


@pytest.mark.parametrize("unit", ["daisee-node.service", "daisee-chain.service"])
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path, unit):
    root = offline_root(tmp_path)
    result = verify(root, unit)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt directive is reported."""
    root = offline_root(tmp_path)
    unit = root / "etc/systemd/system/daisee-node.service"
    unit.write_text(
        unit.read_text().replace(
            "SystemCallFilter=@system-service", "SystemCallFilter=@system-servic"
        )
    )
    result = verify(root)
    assert "@system-servic" in result.stderr


@pytest.mark.parametrize("unit", ["daisee-node.service", "daisee-chain.service"])
def test_exposure_is_low(tmp_path, unit):
    root = offline_root(tmp_path)
    result = analyze(
        "security", "--offline=yes", f"--root={root}", "--no-pager", f"/etc/systemd/system/{unit}"
    )
    match = re.search(rf"Overall exposure level for {unit}: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.5  # systemd calls ≤ 3.9 "OK"; an unhardened unit is 9.6


def test_the_unit_keeps_its_promises():
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=dict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert "safe-state" in service["ExecStopPost"]
    assert service["User"] == "daisee"
    assert set(service["SupplementaryGroups"].split()) == {"gpio", "i2c", "dialout"}
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/daisee-node"
    assert service["NoNewPrivileges"] == "yes"
    # the data dir the unit opens is the one the config defaults to
    from daisee_node.config import NodeSection

    assert str(NodeSection.model_fields["data_dir"].default) == service["ReadWritePaths"]


def test_the_chain_unit_runs_the_chain_client_in_its_own_data_dir():
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=dict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(CHAIN_UNIT.read_text())
    service = parser["Service"]
    assert service["ExecStart"].split()[1:4] == ["chain-node", "run", "-c"]
    assert service["User"] == "daisee" and service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    # the unit's writable dir is the one [chain_node] defaults to, and not the node's
    from daisee_node.ledger.chain_node import ChainNodeSection

    assert str(ChainNodeSection.model_fields["data_dir"].default) == service["ReadWritePaths"]
    assert "daisee-node" not in service["ReadWritePaths"]
    assert "Before" in parser["Unit"] and "daisee-node.service" in parser["Unit"]["Before"]
