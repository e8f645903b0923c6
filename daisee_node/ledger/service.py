"""The ledger inside the daemon: key, chain connection, sealing loop and submitter loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daisee_node.backoff import Backoff
from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.ledger.commitment import Commitment, signer
from daisee_node.ledger.keys import KeyStoreError, keystore_address, load_account, read_password
from daisee_node.ledger.outbox import PENDING, ChainHead, Outbox, Sealer, rules_hash
from daisee_node.ledger.settings import ChainSection
from daisee_node.ledger.worker import ChainThread
from daisee_node.logs import get_logger
from daisee_node.store import Store

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger.submitter import Submitter

# The chain client (web3) is imported by the functions that talk to the chain, which run after
# the node is up: describing or starting a node does not pay for it.

EMBEDDED_FUNDS_WEI = 10**20
#: a node that relies on relays shares again, with each new commitment, this many of its oldest
#: ones the chain does not have yet: a relay that was not listening when they were first shared
#: (starting, or cut off from the broker) gets them, and in-order acceptance is never stuck
RESHARE_MAX = 4
#: a market transaction's receipt is waited for at least this long (s)
RECEIPT_WAIT_S = 120.0

T = TypeVar("T")


class LedgerService:
    """Everything the node does for the ledger; the daemon runs `seal_loop` and `submit_loop`."""

    def __init__(
        self,
        settings: ChainSection,
        store: Store,
        clock: Clock,
        data_dir: Path,
        rules: list[Any],
        derived: dict[str, str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.log = get_logger("ledger")
        self._keystore = settings.keystore_path(data_dir)
        self._password_file = settings.password_path(data_dir)
        # What can be checked without decrypting is checked now, so a missing key or a password
        # file others can read stops the start; decrypting (eth-account's imports, PBKDF2) waits
        # until the node runs: see `unlock`.
        self.address = keystore_address(self._keystore)
        read_password(self._password_file)
        self._account: LocalAccount | None = None
        self._unlocking: asyncio.Task[LocalAccount] | None = None
        #: why the key could not be decrypted, if it could not
        self.key_error: str | None = None
        self.outbox = Outbox(store)
        self.worker = ChainThread()
        #: where market actions run: they wait for receipts, and the chain thread must not
        self._tx_worker: ChainThread | None = None
        self.chain_id: int | None = settings.chain_id
        self.contract: str | None = settings.ledger_address
        self.ledger: chainlib.Ledger | None = None
        self.submitter: Submitter | None = None
        self.sealer = Sealer(
            store,
            self.outbox,
            node=self.address,
            period_s=settings.period_s,
            delay_s=settings.seal_delay_s,
            import_channel=settings.import_channel,
            export_channel=settings.export_channel,
            rules_hash=rules_hash(rules, derived),
            clock=clock,
            capacity_w=settings.capacity_w,
        )
        #: called with each newly sealed own commitment and its signature (MQTT publishes them)
        self.on_sealed: list[Callable[[Commitment, bytes], None]] = []
        self._connected = asyncio.Event()
        # Readings of a period not yet sealed into a commitment are the ledger's to keep.
        self.outbox.keep_unsealed_readings()
        store.on_commit.append(self.sealer.count_late)

    async def unlock(self) -> LocalAccount:
        """The node's key, decrypted once on a worker thread. A key that cannot be decrypted
        (a wrong password) is logged and counted once; the ledger then waits, and the rest of
        the node runs on: readings are kept, to be sealed once the key is fixed."""
        if self._account is not None:
            return self._account
        if self._unlocking is None:
            self._unlocking = asyncio.create_task(
                asyncio.to_thread(load_account, self._keystore, self._password_file)
            )
        try:
            account = await asyncio.shield(self._unlocking)
        except KeyStoreError as exc:
            if self.key_error is None:
                self.key_error = str(exc)
                self.store.add_counter("ledger.key_errors", 1)
                self.store.put_event(self.clock.now_ms(), "ledger", "key", None, None, str(exc))
                self.log.error("the node key cannot be decrypted; nothing is signed", error=exc)
            await asyncio.Event().wait()  # until the node stops: a restart reads the key again
            raise
        if account.address != self.address:
            raise KeyStoreError(f"{self._keystore} holds {account.address}, not {self.address}")
        self._account = self.sealer.account = account
        return account

    @property
    def account(self) -> LocalAccount:
        """The decrypted key (after `unlock`)."""
        assert self._account is not None, "the node key is not unlocked yet"
        return self._account

    @property
    def sealed_until_ms(self) -> int | None:
        """End (ms) of the last sealed period (None before anything is known): a reading
        stamped before it belongs to a period that is closed for good."""
        return self.sealer.sealed_until_ms

    # -- chain connection ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Reach the chain (retrying forever); an embedded chain is created and set up here."""
        backoff = Backoff(1.0, self.settings.retry_max_s)
        while True:
            try:
                await self.worker.call(self._connect)
                await self._sync_head()
                break
            except Exception as exc:  # retried until the chain answers
                delay = backoff.next_delay()
                self.store.add_counter("ledger.submit_errors", 1)
                # loud once, then quiet: sealing goes on meanwhile
                log = self.log.warning if backoff.failures == 1 else self.log.debug
                log("chain not reachable yet; periods are sealed and kept", error=str(exc)[:200])
                await asyncio.sleep(delay)
        assert self.ledger is not None
        await self.unlock()
        from daisee_node.ledger.submitter import Submitter

        self.submitter = Submitter(
            self.store,
            self.outbox,
            self.ledger,
            self.account,
            self.settings,
            self.clock,
            self.worker,
        )
        self.submitter.reseal = self._reseal
        # Whatever else signs with the node key (the market) goes through the submitter too.
        self.worker.signer, self.worker.sends = self.account, self.transact
        self._connected.set()

    def _connect(self) -> None:
        from eth_account import Account

        from daisee_node.ledger import chain as chainlib

        w3 = chainlib.connect(
            self.settings.rpc_url,
            self.settings.rpc_timeout_s,
            fallback_urls=self.settings.rpc_fallback_urls,
        )
        if self.settings.rpc_url == chainlib.EMBEDDED:
            gov = Account.from_key(chainlib.TESTER_KEYS[0])
            address = chainlib.deploy(w3, gov, None, wh_per_credit=1000)
            ledger = chainlib.Ledger(w3, address)
            ledger.set_node(gov, self.address, capacity_w=self.settings.capacity_w)
            chainlib.fund(w3, gov, self.address, EMBEDDED_FUNDS_WEI)
            self.log.info("embedded chain ready", ledger=address, chain_id=ledger.chain_id)
        else:
            if self.contract is None:
                raise DaiseeError("chain.ledger_address is not set")
            ledger = chainlib.Ledger(w3, self.contract)
            ledger.check_deployed()
            if self.chain_id is not None and ledger.chain_id != self.chain_id:
                raise DaiseeError(
                    f"chain id {ledger.chain_id} is not chain.chain_id {self.chain_id}"
                )
        self.ledger = ledger
        self.chain_id = ledger.chain_id
        self.contract = ledger.address

    async def _sync_head(self) -> None:
        """Learn what the chain holds for this node: its head (sealing resumes after it when
        the outbox knows less) and the capacity governance registered (totals stay below)."""
        assert self.ledger is not None
        ledger = self.ledger
        head = await self.worker.call(ledger.head, self.address)
        if head.registered and head.capacity_w < self.sealer.capacity_w:
            self.log.warning(
                "chain.capacity_w is above the capacity registered on chain; using the chain's",
                capacity_w=self.settings.capacity_w,
                registered_w=head.capacity_w,
            )
            self.sealer.capacity_w = head.capacity_w
        last = await self.outbox.last_own()
        if head.seq <= (last.commitment.seq if last else 0):
            return
        found = None
        try:
            found = await self.worker.call(ledger.find, self.address, head.seq)
        except Exception as exc:  # a node may limit log queries; the low bits suffice
            self.log.debug("cannot read the head commitment's log", error=str(exc)[:200])
        commitment_hash = (
            found.commitment_hash
            if found is not None and head.follows(found.commitment_hash)
            else head.hash_low.to_bytes(32, "big")  # the contract checks only these bits
        )
        self.sealer.chain_head = ChainHead(head.seq, head.t1, commitment_hash)

    async def _reseal(self) -> None:
        """The ledger refused one of this node's commitments for good (a period or prevHash it
        cannot accept, totals above the registered capacity): as seqs are accepted only in
        order, every later one would wait forever. Drop the node's commitments after the
        chain's head that are not on chain, learn the head and capacity again, and let the
        sealer sign those periods afresh."""
        assert self.ledger is not None
        async with self.sealer.lock:
            head = await self.worker.call(self.ledger.head, self.address)
            dropped = await self.outbox.drop_own_after(head.seq)
            if dropped is None:
                return  # one is in flight: the next refusal brings us back here
            self.store.add_counter("ledger.resealed", dropped)
            self.log.error(
                "own commitment refused by the ledger; sealing again from the chain's head",
                chain_seq=head.seq,
                dropped=dropped,
            )
            await self._sync_head()

    async def transact(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking action that sends with the node key (a `Market` method) on a thread of
        its own. Its transactions take their nonces from the submitter, the one sender of the
        node key, and are recorded and followed there; waiting for their receipts holds neither
        the chain thread nor the batches."""
        from daisee_node.ledger import chain as chainlib

        submitter = self.submitter
        if submitter is None:
            raise chainlib.ChainError("the chain is not connected yet")
        if self._tx_worker is None:
            self._tx_worker = ChainThread("chain-tx")
        loop = asyncio.get_running_loop()
        wait_s = max(RECEIPT_WAIT_S, 2 * self.settings.stuck_after_s)

        def send(tx: dict[str, Any]) -> Any:
            sent = asyncio.run_coroutine_threadsafe(submitter.send_transaction(tx), loop)
            try:
                receipt = sent.result().result(timeout=wait_s)
            except FutureTimeout:
                raise chainlib.ChainError(f"no receipt after {wait_s:.0f} s") from None
            if receipt["status"] != 1:
                raise chainlib.ChainError(
                    f"transaction 0x{bytes(receipt['transactionHash']).hex()} reverted"
                )
            return receipt

        def run() -> T:
            token = chainlib.NODE_SENDER.set((self.address, send))
            try:
                return fn(*args, **kwargs)
            finally:
                chainlib.NODE_SENDER.reset(token)

        return await self._tx_worker.call(run)

    # -- loops ---------------------------------------------------------------------------------

    async def seal_loop(self) -> None:
        """Seal due periods. Needs the chain id and contract (from config or the chain)."""
        await self.unlock()
        await self.sealer.load()
        if self.chain_id is None or self.contract is None:
            await self._connected.wait()
        elif self.sealer.sealed_until_ms is None:
            # An empty outbox may be a lost one: ask the chain where this node stands before
            # signing seq 1, for up to a period; then seal offline as usual.
            deadline = self.clock.now() + self.settings.period_s
            while not self._connected.is_set() and self.clock.now() < deadline:
                await self.clock.sleep(min(1.0, self.settings.period_s / 30))
        assert self.chain_id is not None and self.contract is not None
        poll_s = max(0.5, min(30.0, self.settings.period_s / 30))
        while True:
            sealed = await self.sealer.seal_due(self.chain_id, self.contract)
            if sealed and not self.settings.submit:
                sealed = await self._unconfirmed_first(sealed)
            for commitment, signature in sealed:
                for callback in self.on_sealed:
                    callback(commitment, signature)
            if sealed and self.submitter is not None:
                self.submitter.wake.set()
            await self.clock.sleep(poll_s)

    async def _unconfirmed_first(
        self, sealed: list[tuple[Commitment, bytes]]
    ) -> list[tuple[Commitment, bytes]]:
        """The oldest own commitments not on the chain yet (at most `RESHARE_MAX`), then the new
        ones: what a relay needs next comes first, and peers drop what they already hold."""
        new = {c.seq for c, _ in sealed}
        waiting = [e for e in await self.outbox.in_state(PENDING, own=True) if e.key[1] not in new]
        waiting.sort(key=lambda e: e.commitment.seq)
        return [(e.commitment, e.signature) for e in waiting[:RESHARE_MAX]] + sealed

    async def submit_loop(self) -> None:
        if self.submitter is None:
            await self.connect()
        assert self.submitter is not None
        from daisee_node.ledger import chain as chainlib

        if self.settings.rpc_url == chainlib.EMBEDDED:
            self.submitter.after_round = self._mine_embedded
        await self.submitter.run()

    async def _mine_embedded(self) -> None:
        # An in-process chain only makes blocks for transactions; one per round lets
        # confirmations accumulate as they would on a chain with a block time.
        assert self.ledger is not None
        provider: Any = self.ledger.w3.provider
        await self.worker.call(provider.ethereum_tester.mine_blocks, 1)

    async def accept_peer(self, commitment: Commitment, signature: bytes) -> bool:
        """Keep a peer's signed commitment for relaying, if its signature is the node's own."""
        if self.chain_id is None or self.contract is None or commitment.node == self.address:
            return False
        if signer(commitment, signature, self.chain_id, self.contract) != commitment.node:
            self.store.add_counter("ledger.peer_bad_signatures", 1)
            return False
        added = await self.outbox.add(
            commitment, signature, own=False, sealed_ms=self.clock.now_ms()
        )
        if added and self.submitter is not None:
            self.submitter.wake.set()
        return added

    async def state(self) -> dict[str, Any]:
        """The ledger topic's payload: sealed and confirmed seq, backlog, last tx."""
        summary = await self.outbox.summary(self.address)
        sub = self.submitter
        return {
            "address": self.address,
            "sealed_seq": summary["sealed_seq"],
            "confirmed_seq": summary["confirmed_seq"],
            "backlog": summary["backlog"],
            "last_tx": sub.last_tx if sub else None,
            "error": sub.last_error if sub else None,
            "credit_balance": sub.credit_balance if sub else None,
        }
