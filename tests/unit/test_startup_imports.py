"""What the command line loads before it does anything, and the rule parser's table cache.

A Pi runs Python 10–20× slower than this machine: every library a command imports without
needing it is seconds at each start. These tests pin down which libraries stay unloaded, not how
long anything takes (timings are in bench/startup.py).
"""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, sim_sensors, write_config

HEAVY = ("rule_engine", "web3", "eth_account", "aiomqtt", "pymodbus", "gpiozero")

#: runs the command line in-process, then prints which top-level packages were imported
RUN_AND_LIST = """
import json, sys
sys.argv = ["daisee-node", *json.loads(sys.argv[1])]
from daisee_node._entry import main
try:
    code = main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""

#: checks a rule's expression, then says whether the parser read its tables or built them
CHECK_RULE = """
import json
from daisee_node.rules.expressions import Expression
rule = Expression("battery.soc_pct < 20 and time.hour >= 18 ? 1 : 0", result="number")
import rule_engine  # after the first expression: that is what imports it, with the tables
from rule_engine._vendor.ply import yacc
values = {"battery.soc_pct": 10.0, "time.hour": 19.5}
print(json.dumps({
    "value": float(rule.evaluate(values)),
    "names": sorted(rule.names),
    "read": isinstance(rule_engine.Rule.parser._parser.productions[0], yacc.MiniProduction),
}))
"""


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


def _loaded(args: list[str], cache: Path) -> tuple[str, dict[str, object]]:
    """Run `daisee-node ARGS` in a fresh interpreter; its output and the packages it loaded."""
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_env(cache),
    )
    assert result.returncode == 0, result.stderr
    *output, last = result.stdout.strip().splitlines()
    return "\n".join(output), json.loads(last)


def _check_rule(cache: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", CHECK_RULE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_env(cache),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_version_loads_no_heavy_library(tmp_path: Path) -> None:
    from daisee_node import __version__

    output, seen = _loaded(["--version"], tmp_path)
    assert output == f"daisee-node {__version__}"
    assert seen["code"] in (0, None)
    assert [m for m in HEAVY if m in seen["modules"]] == []  # type: ignore[operator]
    assert "pydantic" not in seen["modules"]  # type: ignore[operator]


def test_help_loads_no_heavy_library(tmp_path: Path) -> None:
    output, seen = _loaded(["--help"], tmp_path)
    assert seen["code"] in (0, None)
    assert "check-config" in output and "run" in output
    assert [m for m in HEAVY if m in seen["modules"]] == []  # type: ignore[operator]


def test_check_config_without_rules_or_chain_loads_no_heavy_library(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "node.toml",
        {"node": {"id": "lean", "data_dir": str(tmp_path / "data")}, "sensors": sim_sensors()},
    )
    output, seen = _loaded(["check-config", str(config)], tmp_path)
    assert seen["code"] in (0, None), output
    assert "ok" in output
    assert [m for m in HEAVY if m in seen["modules"]] == []  # type: ignore[operator]


def test_check_config_of_the_house_example_loads_no_chain_or_rule_library(
    tmp_path: Path,
) -> None:
    # [chain] and [mqtt] are described by plain settings: checking them needs no client library.
    output, seen = _loaded(["check-config", "examples/house.toml"], tmp_path)
    assert seen["code"] in (0, None), output
    modules = seen["modules"]
    assert isinstance(modules, list)
    assert [m for m in ("rule_engine", "web3", "eth_account", "aiomqtt") if m in modules] == []


def test_safe_state_loads_the_pins_and_no_chain_library(tmp_path: Path) -> None:
    # safe-state runs after every crash (ExecStopPost): each library it loads delays the relays
    # (10 s on emulated arm64 when it loaded the genesis writer's rlp and eth-utils).
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "safe", "data_dir": str(tmp_path / "data")},
            "gpio": {"backend": "mock"},
            "relays": [{"name": "r1", "pin": 17}],
        },
    )
    output, seen = _loaded(["safe-state", "-c", str(config)], tmp_path)
    assert seen["code"] in (0, None), output
    assert "r1: off" in output
    modules = seen["modules"]
    assert isinstance(modules, list)
    assert "gpiozero" in modules
    chain = ("web3", "eth_account", "eth_utils", "rlp", "rule_engine", "aiomqtt", "pymodbus")
    assert [m for m in chain if m in modules] == []


def test_rule_parser_tables_are_cached_and_read_back(tmp_path: Path) -> None:
    first = _check_rule(tmp_path)
    tables = tmp_path / "daisee-node" / "rule-parser-tables.marshal"
    assert tables.is_file()
    assert first["read"] is False  # nothing cached yet: built from the grammar
    second = _check_rule(tmp_path)
    assert second["read"] is True
    # The tables read back parse and evaluate exactly as the built ones.
    assert second["value"] == first["value"] == 1.0
    assert second["names"] == first["names"] == ["battery.soc_pct", "time.hour"]


def test_damaged_or_stale_tables_are_rebuilt(tmp_path: Path) -> None:
    _check_rule(tmp_path)
    tables = tmp_path / "daisee-node" / "rule-parser-tables.marshal"
    good = marshal.loads(tables.read_bytes())

    tables.write_bytes(b"\x00not tables")
    damaged = _check_rule(tmp_path)
    assert damaged["read"] is False
    assert damaged["value"] == 1.0
    assert marshal.loads(tables.read_bytes())["_lr_signature"] == good["_lr_signature"]

    # Tables of another grammar (an upgraded rule-engine): PLY refuses them, they are rebuilt.
    stale = {**good, "_lr_signature": "another grammar", "_lr_action": {}, "_lr_goto": {}}
    tables.write_bytes(marshal.dumps(stale))
    rebuilt = _check_rule(tmp_path)
    assert rebuilt["read"] is False
    assert rebuilt["value"] == 1.0
    assert marshal.loads(tables.read_bytes()) == good
    assert _check_rule(tmp_path)["read"] is True


def test_an_unwritable_cache_only_costs_the_rebuild(tmp_path: Path) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory would go")
    for _ in range(2):
        result = _check_rule(blocked)
        assert result["read"] is False
        assert result["value"] == 1.0
