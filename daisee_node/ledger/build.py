"""Compile the ledger contracts with solc-js and write `artifacts/` (ABI + bytecode).

    python -m daisee_node.ledger.build            # rewrite the artifacts
    python -m daisee_node.ledger.build --check    # exit 1 when they differ from the sources

Needs Node.js and the project's npm packages (`npm install` at the project root, or
`./run test`): solc and @openzeppelin/contracts at the versions pinned in package.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTRACTS = HERE / "contracts"
ARTIFACTS = HERE / "artifacts"
PROJECT = HERE.parents[1]
NAMES = ("DaiseeLedger", "EnergyCredit", "EnergyMarket", "CommunityRegistry")
SOLC_VERSION = "0.8.28"
EVM_VERSION = "paris"

# solc-js resolves imports through a callback; this one reads them from node_modules.
_COMPILE_JS = """
const fs = require('fs'), path = require('path');
const solc = require('solc');
const root = process.argv[1];
function findImports(p) {
  try { return {contents: fs.readFileSync(path.join(root, 'node_modules', p), 'utf8')}; }
  catch (e) { return {error: 'not found: ' + p}; }
}
const input = fs.readFileSync(0, 'utf8');
process.stdout.write(JSON.stringify({
  version: solc.version(),
  output: JSON.parse(solc.compile(input, {import: findImports})),
}));
"""


def standard_input(sources: dict[str, str] | None = None) -> dict[str, Any]:
    if sources is None:
        sources = {name: (CONTRACTS / f"{name}.sol").read_text() for name in NAMES}
    return {
        "language": "Solidity",
        "sources": {f"{name}.sol": {"content": text} for name, text in sources.items()},
        "settings": {
            "evmVersion": EVM_VERSION,
            "optimizer": {"enabled": True, "runs": 200},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }


def compile_contracts(sources: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Compile {contract name: source} (default: the ledger's sources) into artifacts."""
    proc = subprocess.run(
        ["node", "-e", _COMPILE_JS, str(PROJECT)],
        input=json.dumps(standard_input(sources)),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"solc-js failed (run `npm install` at {PROJECT}?):\n{proc.stderr}")
    result = json.loads(proc.stdout)
    if not result["version"].startswith(SOLC_VERSION + "+"):
        raise SystemExit(f"solc {result['version']} found, {SOLC_VERSION} pinned")
    errors = [e for e in result["output"].get("errors", []) if e["severity"] == "error"]
    if errors:
        raise SystemExit("\n".join(e["formattedMessage"] for e in errors))
    out = {}
    for name in sources or NAMES:
        contract = result["output"]["contracts"][f"{name}.sol"][name]
        out[name] = {
            "contractName": name,
            "compiler": f"solc {result['version']}",
            "evmVersion": EVM_VERSION,
            "abi": contract["abi"],
            "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        }
    return out


def render(artifact: dict[str, Any]) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, artifact in compile_contracts().items():
        path = ARTIFACTS / f"{name}.json"
        text = render(artifact)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            ARTIFACTS.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m daisee_node.ledger.build")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
