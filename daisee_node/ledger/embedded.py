"""The embedded chain: py-evm in the process (web3's EthereumTesterProvider), for demos and tests.

A fresh one lives as long as its process. A *kept* one lives in a folder (the demo's
`<data_dir>/chain/`): every signed transaction sent to it is appended to a journal before it is
executed, and opening the folder again replays the journal into a fresh chain. The chain starts
from the same genesis accounts each time and a transaction's hash and effects depend only on its
bytes and the state before it, so the replayed chain holds the same contracts at the same
addresses, the same balances and the same transactions (under the same hashes): a reading
committed by the demo can be proven and verified after the demo has stopped. Blocks are mined
again, so their numbers, hashes and times differ; nothing the ledger proves depends on them.

Kept chains are light: the journal holds only transactions (one batch per settlement period),
never state, and a line torn by a power cut is skipped.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from web3 import Web3

JOURNAL = "transactions.hex"
#: the folder under a demo's data dir that keeps its chain
CHAIN_DIR = "chain"

_kept: dict[Path, Web3] = {}
_kept_lock = threading.Lock()
#: where `chain.connect("embedded")` keeps its chain when no folder is given (set by the demo)
_default_dir: Path | None = None


def keep_in(directory: Path | None) -> None:
    """Make `chain.connect("embedded")` in this process use the chain kept in `directory`."""
    global _default_dir
    _default_dir = None if directory is None else directory.resolve()


def default_dir() -> Path | None:
    """The folder set by `keep_in`, if any."""
    return _default_dir


def chain_dir(data_dir: Path) -> Path:
    """Where a node with an embedded chain keeps it (the demo does)."""
    return data_dir / CHAIN_DIR


def is_kept(data_dir: Path) -> bool:
    """True when `data_dir` holds a kept embedded chain with at least one transaction."""
    journal = chain_dir(data_dir) / JOURNAL
    return journal.is_file() and journal.stat().st_size > 0


def fresh() -> Web3:
    """A new in-process chain that ends with the process."""
    from web3 import EthereumTesterProvider, Web3

    return Web3(EthereumTesterProvider())


def open_kept(directory: Path) -> Web3:
    """The chain kept in `directory` (created when missing); one per folder and process."""
    directory = directory.resolve()
    with _kept_lock:
        w3 = _kept.get(directory)
        if w3 is None:
            w3 = _kept[directory] = _replay(directory)
        return w3


def kept_dir(w3: Web3) -> Path | None:
    """The folder `w3`'s chain is kept in, or None for any other connection."""
    provider: Any = w3.provider
    journal = getattr(provider, "journal", None)
    return journal.parent if isinstance(journal, Path) else None


def create_address(sender: str, nonce: int) -> str:
    """The address of the contract `sender` creates with its transaction number `nonce`."""
    import rlp
    from eth_utils import keccak, to_checksum_address

    return to_checksum_address(keccak(rlp.encode([bytes.fromhex(sender[2:]), nonce]))[12:])


def first_contract(w3: Web3, deployer: str) -> str | None:
    """The contract `deployer` created with its first transaction, if it holds code."""
    from eth_utils import to_checksum_address

    if w3.eth.get_transaction_count(to_checksum_address(deployer)) == 0:
        return None
    address = create_address(deployer, 0)
    return address if w3.eth.get_code(to_checksum_address(address)) else None


def _replay(directory: Path) -> Web3:
    from web3 import EthereumTesterProvider, Web3

    class JournalingProvider(EthereumTesterProvider):
        """Writes each raw transaction to the journal (flushed to disk) before executing it:
        a transaction the chain took is never missing after a crash; one it refused is
        refused again, harmlessly, on replay."""

        def __init__(self, journal: Path) -> None:
            super().__init__()
            self.journal = journal
            self.replaying = False
            #: transactions of the journal executed again, and refused again, when opened
            self.replayed = self.skipped = 0

        def make_request(self, method: Any, params: Any) -> Any:
            if method == "eth_sendRawTransaction" and not self.replaying:
                raw = params[0]
                line = (raw.hex() if isinstance(raw, bytes) else str(raw)).removeprefix("0x")
                with self.journal.open("a") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            return super().make_request(method, params)

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    journal = directory / JOURNAL
    provider = JournalingProvider(journal)
    w3 = Web3(provider)
    replayed = skipped = 0
    if journal.exists():
        provider.replaying = True
        try:
            for line in journal.read_text().splitlines():
                try:
                    w3.eth.send_raw_transaction(bytes.fromhex(line.strip()))
                    replayed += 1
                except Exception:  # a torn last line, or a transaction the chain refused then
                    skipped += 1
        finally:
            provider.replaying = False
    provider.replayed, provider.skipped = replayed, skipped
    return w3
