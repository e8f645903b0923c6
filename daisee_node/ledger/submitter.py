"""Sends pending commitments to the chain in batches, and follows them until they are final.

One batch transaction is in flight at a time. Its nonce is written to the node's nonce ledger
(`ledger_txs`) before it is broadcast, so a restart picks up the transaction it had sent instead
of sending another. A transaction left unmined for `stuck_after_s` is replaced, same nonce, with
higher fees. A commitment counts as confirmed once its block is `confirmations` deep and still
on the chain; if its block is reorganised away it goes back to pending and is sent again.
Only the chain node's answer (the block is gone, or has another hash) counts as a reorg: an RPC
error while looking is retried later and counted as such.

The ledger accepts each node's commitments strictly in order, so a batch carries, per node, only
the run of seqs that follows the chain's head; a relay that holds seq N+2 but not N+1 keeps N+2
until N+1 arrives (or is committed by someone else).

A transaction costs 21,000 gas and a new storage slot for its batch root (about 45,000 gas)
whatever it carries, so the node lets its own commitments gather: a batch goes out once they
cover `submit_interval_s` of periods (by default an hour: four 15-minute periods), or once the
oldest period ended `submit_interval_s` ago, or when it is full (`batch_max`). Commitments that
were sent before (a reorg, a dropped or refused transaction), and the first batch after a start
or a reseal, go at once. Peers' commitments (with `relay_peers`) ride along, or go by the same
age rule.

The node key signs the market's transactions too, and one account has one run of nonces: every
transaction of the node key goes through `send_transaction` or the batch sender here, which take
the next nonce under one lock (the chain's pending count, or one after the highest nonce still in
flight in `ledger_txs`), record it, broadcast and let go. A market transaction's receipt is waited
for outside the lock, so it never holds up a batch longer than its own send. Market transactions
are followed like batches: replaced with a higher fee when stuck, broadcast again when the chain
node forgot them, and kept in flight until their block is `confirmations` deep, so one a reorg
took off the chain is sent again with its nonce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3.exceptions import BlockNotFound, TransactionNotFound, Web3RPCError

from daisee_node.backoff import Backoff
from daisee_node.clock import Clock
from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.chain import ChainError, Head, Ledger
from daisee_node.ledger.outbox import (
    CONFIRMED,
    INCLUDED,
    PENDING,
    REJECTED,
    SENT,
    Entry,
    Outbox,
)
from daisee_node.ledger.settings import ChainSection
from daisee_node.ledger.worker import ChainThread
from daisee_node.logs import get_logger
from daisee_node.store import Store

T = TypeVar("T")
# Upper bounds for a batch when the client cannot estimate (measured: ~65k for the transaction
# and its first commitment, ~17k for each further one of the same node, ~31k of another node).
BATCH_GAS_BASE = 100_000
BATCH_GAS_EACH = 60_000
#: with nothing in flight, the outbox and the chain are looked at least this often (s)
IDLE_POLL_S = 30.0
#: the node's credit balance is read again after a batch is mined, or at least this often (s)
BALANCE_EVERY_S = 300.0
#: how often confirmed commitments are looked for on the chain again (s of node time)
REWIND_CHECK_S = 60.0


class Submitter:
    """Batches, sends and follows the outbox's commitments."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        ledger: Ledger,
        account: LocalAccount,
        settings: ChainSection,
        clock: Clock,
        worker: ChainThread,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.ledger = ledger
        self.w3 = ledger.w3
        self.account = account
        self.settings = settings
        self.clock = clock
        self.call = worker.call
        self.log = get_logger("ledger")
        self.wake = asyncio.Event()
        #: awaited after every round (the embedded chain mines a block there)
        self.after_round: Callable[[], Awaitable[None]] | None = None
        #: awaited when the ledger refuses one of the node's own commitments for good
        self.reseal: Callable[[], Awaitable[None]] | None = None
        self.last_tx: str | None = None
        self.last_error: str | None = None
        #: the node's energy credits (whole credits, fractions kept), None until first read
        self.credit_balance: float | None = None
        self._balance_at: float | None = None
        self._waiting = 0
        self._waiting_logged = False
        # Send without waiting for a fuller batch until one of the node's own commitments is
        # mined: after a start or a reseal, what is pending is late already (and an unusable
        # setup, such as an unregistered node, shows at once).
        self._prompt = True
        #: held from choosing a nonce until its transaction is broadcast (or refused)
        self.send_lock = asyncio.Lock()
        #: a market transaction's nonce → its first receipt, for the thread that sent it
        self._waiters: dict[int, Future[Any]] = {}
        self._market_in_flight = False
        self._rewind_checked_at: float | None = None
        #: what the last look at confirmed commitments found gone: (node, seq, block hash now)
        self._rewind_suspects: set[tuple[str, int, bytes]] = set()
        #: set once the chain is known to have lost blocks the node had confirmed
        self._rewound = False

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(1.0, self.settings.retry_max_s)
        while True:
            try:
                busy = await self.round()
                if self.after_round is not None:
                    await self.after_round()
                await self._read_balance()
                if backoff.failures:
                    self.log.info("chain reachable again", after_failures=backoff.failures)
                backoff.reset()
                self.last_error = None
                delay = min(self.settings.submit_interval_s, 1.0 if busy else IDLE_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next_delay()
                self.last_error = str(exc)[:300]
                self.store.add_counter("ledger.submit_errors", 1)
                if backoff.failures == 1:
                    self.log.warning(
                        "chain unavailable; commitments wait in the outbox",
                        error=self.last_error,
                        retry_in_s=round(delay, 1),
                    )
                else:
                    self.log.debug("chain still unavailable", error=self.last_error)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    async def _read_balance(self) -> None:
        """Refresh `credit_balance` when a batch was mined since the last read, or when it is
        `BALANCE_EVERY_S` old: credits also arrive in batches other nodes send."""
        now = self.clock.monotonic()
        if self._balance_at is not None and now - self._balance_at < BALANCE_EVERY_S:
            return
        ledger, address = self.ledger, self.account.address

        def read() -> float:
            token = ledger.credit()
            units = token.functions.balanceOf(address).call()
            return units / 10 ** token.functions.decimals().call()

        self.credit_balance = await self.call(read)
        self._balance_at = now

    async def round(self) -> bool:
        """One pass. Returns True while something is in flight or not yet final."""
        # first: a transaction in flight behind nonces the chain lost is given up only once the
        # loss is known, and it holds every later step of the round
        await self._find_rewound()
        if await self._follow_in_flight():
            return True
        unsettled = await self._follow_included()
        heads = await self._reconcile()
        sent = await self._send_batch(heads)
        return unsettled or sent or self._market_in_flight

    # -- in-flight transaction -----------------------------------------------------------------

    async def _in_flight(self) -> list[tuple[Any, ...]]:
        return await self.store.query(
            "SELECT id, nonce, tx_hash, raw, items, fee, sent_ms FROM ledger_txs "
            "WHERE state = 'sent' ORDER BY id"
        )

    async def _follow_in_flight(self) -> bool:
        """Follow every transaction in flight, nonce by nonce. True while a batch is."""
        txs = await self._in_flight()
        groups: dict[int, list[tuple[Any, ...]]] = {}
        for tx in txs:
            groups.setdefault(int(tx[1]), []).append(tx)
        batch_busy = market_busy = False
        mined_nonce: int | None = None
        for nonce in sorted(groups):
            group = groups[nonce]
            market = _is_market(group[-1][4])
            if await self._any_mined(group):
                market_busy |= market and await self._market_unconfirmed(nonce)
                continue
            if mined_nonce is None:
                mined_nonce = await self.call(
                    self.w3.eth.get_transaction_count, self.account.address
                )
            if await self._follow_unmined(group, mined_nonce):
                market_busy |= market
                batch_busy |= not market
        self._market_in_flight = market_busy
        return batch_busy

    async def _follow_unmined(self, txs: list[tuple[Any, ...]], mined_nonce: int) -> bool:
        """One nonce's transactions, none with a receipt: True while they are still in flight."""
        _, nonce, tx_hash, raw, items, fee, sent_ms = txs[-1]
        if mined_nonce > nonce:
            # Ours may have been mined between the receipt lookups and the nonce read: look again.
            if await self._any_mined(txs):
                return _is_market(items) and await self._market_unconfirmed(nonce)
            # Another transaction took this nonce (one we lost track of): send the batch again.
            await self._drop(txs)
            return False
        if self._rewound and await self._behind_a_hole(nonce):
            # The chain lost the transactions before it (its nodes went back to an older
            # state), so this one can never be mined.
            self.log.warning(
                "transaction waits behind nonces the chain no longer has; sending it again",
                nonce=nonce,
            )
            await self._drop(txs)
            return False
        if self.clock.now_ms() - sent_ms > self.settings.stuck_after_s * 1000:
            if _is_market(items):
                await self._replace_market(nonce, json.loads(items), fee)
            else:
                await self._replace(nonce, json.loads(items), fee)
        elif await self.call(self._tx_known, bytes(tx_hash)) is False:
            # The chain node forgot it (restarted without its pool, or a reorg dropped it):
            # broadcast it again.
            await self.call(self.w3.eth.send_raw_transaction, bytes(raw))
        return True

    async def _behind_a_hole(self, nonce: int) -> bool:
        """Whether `nonce` is above the chain's next nonce with none of the node's own
        transactions in flight between: a hole nothing will fill. (A chain node that does not
        count the node's own transactions in flight shows such a gap too: those fill it.)"""
        pending = int(
            await self.call(self.w3.eth.get_transaction_count, self.account.address, "pending")
        )
        if nonce <= pending:
            return False
        rows = await self.store.query(
            "SELECT count(*) FROM ledger_txs WHERE state = 'sent' AND nonce >= ? AND nonce < ?",
            (pending, nonce),
        )
        return not (rows and rows[0][0])

    async def _drop(self, txs: list[tuple[Any, ...]]) -> None:
        """Give up one nonce's transactions: a batch's commitments go back to pending, a
        market transaction's caller learns it failed."""
        _, nonce, _, _, items, _, _ = txs[-1]
        await self._set_tx_state([t[0] for t in txs], "dropped")
        if _is_market(items):
            self._resolve(nonce, ChainError(f"market transaction with nonce {nonce} dropped"))
        else:
            await self.outbox.update([tuple(k) for k in json.loads(items)], PENDING)

    async def _any_mined(self, txs: list[tuple[Any, ...]]) -> bool:
        """Records the first of the nonce's transactions that has a receipt, if one has."""
        for tx_id, nonce, tx_hash, _raw, items, _fee, _sent in txs:
            receipt = await self.call(self._receipt, bytes(tx_hash))
            if receipt is not None:
                if _is_market(items):
                    await self._market_mined(tx_id, nonce, receipt)
                else:
                    await self._mined(tx_id, nonce, receipt, json.loads(items))
                return True
        return False

    def _receipt(self, tx_hash: bytes) -> Any:
        try:
            return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def _tx_known(self, tx_hash: bytes) -> bool:
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return False
        return True

    async def _mined(self, tx_id: int, nonce: int, receipt: Any, items: list[list[Any]]) -> None:
        included, rejected = self.ledger.outcome(receipt)
        self._rewound = False  # the node's nonces are flowing again
        if any(inc.node == self.account.address for inc in included):
            self._prompt = False
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE ledger_txs SET state = CASE WHEN id = ? THEN 'mined' ELSE 'replaced' END "
                "WHERE state = 'sent' AND nonce = ?",
                (tx_id, nonce),
            )
        for inc in included:
            await self.outbox.update(
                [(inc.node, inc.seq)],
                INCLUDED,
                tx_hash=inc.tx_hash,
                block_number=inc.block_number,
                block_hash=inc.block_hash,
            )
        done = {(i.node, i.seq) for i in included}
        own_refused = False
        for node, seq, reason in rejected:
            done.add((node, seq))
            if reason in (chainlib.STALE_SEQ, chainlib.NOT_NEXT, chainlib.NOT_REGISTERED):
                # Someone else committed it first (a relay), one before it is not in yet, or
                # the node is not registered yet: refused without any change. Reconcile and
                # the next batches sort it out.
                await self.outbox.update([(node, seq)], PENDING)
                continue
            own = node == self.account.address
            (self.log.error if own else self.log.warning)(
                "commitment rejected by the ledger", node=node, seq=seq, reason=reason
            )
            await self.outbox.update([(node, seq)], REJECTED, note=reason)
            if own and reason in chainlib.RESEALABLE:
                own_refused = True
        leftover = [(str(n), int(q)) for n, q in items if (n, q) not in done]
        await self.outbox.update(leftover, PENDING)
        self.store.add_counter("ledger.txs_mined", 1)
        self._balance_at = None
        self.log.info(
            "batch mined",
            tx=bytes(receipt["transactionHash"]).hex(),
            block=receipt["blockNumber"],
            gas=receipt["gasUsed"],
            committed=len(included),
            rejected=len(rejected),
        )
        if own_refused and self.reseal is not None:
            # Nothing after a refused seq can ever be accepted: seal again from the chain,
            # and send the new commitments as soon as they are signed.
            self._prompt = True
            await self.reseal()

    async def _set_tx_state(self, ids: list[int], state: str) -> None:
        async with self.store.transaction() as db:
            await db.executemany(
                "UPDATE ledger_txs SET state = ? WHERE id = ?", [(state, i) for i in ids]
            )

    # -- confirmations and reorgs ----------------------------------------------------------------

    async def _follow_included(self) -> bool:
        entries = await self.outbox.in_state(INCLUDED)
        if not entries:
            return False
        latest = await self.call(self.w3.eth.get_block_number)
        blocks: dict[int, bytes | None] = {}
        reorged, final = [], []
        for e in entries:
            assert e.block_number is not None
            if e.block_number not in blocks:
                try:
                    blocks[e.block_number] = await self.call(self._block_hash, e.block_number)
                except Exception as exc:
                    # No answer is not an answer: the block may well be there. Look again
                    # next round; nothing is marked dropped or sent again meanwhile.
                    self.store.add_counter("ledger.rpc_errors", 1)
                    self.log.warning(
                        "cannot read a commitment's block; looking again later",
                        block=e.block_number,
                        error=str(exc)[:200] or exc.__class__.__name__,
                    )
                    return True
            if blocks[e.block_number] != e.block_hash:
                reorged.append(e)
            elif latest - e.block_number >= self.settings.confirmations:
                final.append(e)
        if reorged:
            self.log.warning(
                "commitments reorganised off the chain; sending them again",
                seqs=[e.commitment.seq for e in reorged],
            )
            self.store.add_counter("ledger.reorged", len(reorged))
            await self.outbox.update([e.key for e in reorged], PENDING)
            hashes = {e.tx_hash for e in reorged}
            async with self.store.transaction() as db:
                await db.executemany(
                    "UPDATE ledger_txs SET state = 'dropped' WHERE tx_hash = ?",
                    [(h,) for h in hashes],
                )
        if final:
            await self.outbox.update([e.key for e in final], CONFIRMED)
            own = [e.commitment.seq for e in final if e.own]
            if own:
                self.store.set_counter("ledger.confirmed_seq", max(own))
        return len(final) < len(entries)

    async def _find_rewound(self) -> None:
        """Confirmed commitments the chain lost: back to pending, to be sent again in order.

        Clique has no finality, and a chain whose every node stopped at once (a power cut of the
        whole community) restarts from what each had on disk: the blocks after it are gone from
        every copy, however deep they were. The node's own commitments after the lost ones
        would then wait forever for a seq the chain no longer has. A commitment counts as lost
        only when the chain is as high again as its block, that block has another hash, and two
        looks a minute apart agree: a chain node that is behind (it shows an older head), or an
        answer pieced together from two endpoints, loses nothing.
        """
        now = self.clock.monotonic()
        if self._rewind_checked_at is not None and now - self._rewind_checked_at < REWIND_CHECK_S:
            return
        self._rewind_checked_at = now
        newest = await self.outbox.newest_confirmed()
        if not newest:
            return
        latest = int(await self.call(self.w3.eth.get_block_number))
        suspects: set[tuple[str, int, bytes]] = set()
        lost: list[Entry] = []
        for node, seq in newest.items():
            head = await self.call(self.ledger.head, node, latest)
            if head.seq >= seq:
                continue
            # Only the first one after the chain's head need be looked at: the ledger takes
            # each node's seqs in order, so when it is gone, every later one is gone with it.
            entries = await self.outbox.confirmed_after(node, head.seq)
            first = entries[0] if entries else None
            if first is None or first.block_number is None or first.block_number > latest:
                continue  # the chain is not as high again yet: decided on a later look
            there = await self.call(self._block_hash, first.block_number)
            if there is None or there == first.block_hash:
                continue  # no answer for a height it has, or the same block: nothing lost
            suspects.add((node, first.commitment.seq, there))
            if (node, first.commitment.seq, there) in self._rewind_suspects:
                lost += entries
        self._rewind_suspects = suspects
        if not lost:
            return
        by_node: dict[str, list[int]] = {}
        for e in lost:
            by_node.setdefault(e.key[0], []).append(e.commitment.seq)
        self.log.error(
            "confirmed commitments are gone from the chain (its nodes went back to an older "
            "state together); sending them again",
            seqs=by_node,
        )
        self.store.add_counter("ledger.rewound", len(lost))
        await self.outbox.update([e.key for e in lost], PENDING)
        self._rewound = True
        self._prompt = True

    def _block_hash(self, number: int) -> bytes | None:
        """The hash of block `number`, or None when the chain node says it has no such block.
        Any other failure (timeout, connection refused, server error) raises."""
        try:
            block = self.w3.eth.get_block(number)
        except BlockNotFound:
            return None
        return bytes(block["hash"]) if block else None

    # -- batching ---------------------------------------------------------------------------------

    async def _reconcile(self) -> dict[str, Head]:
        """Pending commitments the chain already has (sent by a relay, or before a restart).
        Returns the chain's head of each node with pending commitments."""
        pending = await self.outbox.in_state(PENDING)
        heads: dict[str, Head] = {}
        for e in pending:
            node, seq = e.key
            if node not in heads:
                heads[node] = await self.call(self.ledger.head, node)
            if seq > heads[node].seq:
                continue
            found = await self.call(self.ledger.find, node, seq)
            if found is None or found.commitment_hash != e.commitment.struct_hash():
                await self.outbox.update([e.key], REJECTED, note="seq taken on chain")
                continue
            await self.outbox.update(
                [e.key],
                INCLUDED,
                tx_hash=found.tx_hash,
                block_number=found.block_number,
                block_hash=found.block_hash,
            )
        return heads

    async def _batch(self, heads: dict[str, Head]) -> list[Entry]:
        """Per node, the pending commitments that follow the chain's head without a hole, in
        seq order: anything after a missing seq would only be refused (`NOT_NEXT`). Nodes not
        (or no longer) registered wait too."""
        pending = await self.outbox.in_state(PENDING)  # by own first, then node, then seq
        if not self.settings.relay_peers:
            pending = [e for e in pending if e.own]
        batch: list[Entry] = []
        expected: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for e in pending:
            node, seq = e.key
            if node not in heads or not heads[node].registered:
                continue  # it appeared since reconcile (next round), or is not registered
            nxt = expected.get(node, heads[node].seq + 1)
            if seq == nxt:
                batch.append(e)
                expected[node] = seq + 1
            elif seq > nxt:
                waiting[node] = waiting.get(node, 0) + 1
        total = sum(waiting.values())
        if total != self._waiting:
            self._waiting = total
            self.store.set_counter("ledger.waiting_for_earlier", total)
            if total and not self._waiting_logged:
                self.log.info("commitments wait for earlier seqs", by_node=waiting)
            self._waiting_logged = bool(total)
        return batch[: self.settings.batch_max]

    async def _send_batch(self, heads: dict[str, Head]) -> bool:
        if not self.settings.submit:
            return False
        batch = await self._batch(heads)
        if not batch or not self._due(batch):
            return False
        async with self.send_lock:
            nonce = await self._next_nonce()
            await self._sign_and_send(batch, nonce, bump=1.0)
        return True

    async def _next_nonce(self) -> int:
        """The node key's next nonce (call with `send_lock` held): the chain's pending count,
        or one after the highest nonce in flight, when the chain node does not count it yet."""
        pending = await self.call(
            self.w3.eth.get_transaction_count, self.account.address, "pending"
        )
        rows = await self.store.query("SELECT max(nonce) FROM ledger_txs WHERE state = 'sent'")
        recorded = rows[0][0] if rows else None
        return int(pending) if recorded is None else max(int(pending), int(recorded) + 1)

    def _due(self, batch: list[Entry]) -> bool:
        """Whether the batch is worth its transaction now (see the module's docstring)."""
        if self._prompt or len(batch) >= self.settings.batch_max:
            return True
        if any(e.tx_hash is not None for e in batch):
            return True  # sent before: it waited its turn already
        interval_ms = self.settings.submit_interval_s * 1000
        own_span = sum(e.commitment.t1 - e.commitment.t0 for e in batch if e.own)
        oldest_end = min(e.commitment.t1 for e in batch)
        return own_span >= interval_ms or self.clock.now_ms() - oldest_end >= interval_ms

    async def _replace(self, nonce: int, items: list[list[Any]], old_fee: int) -> None:
        entries = [await self.outbox.get(node, seq) for node, seq in items]
        batch = [e for e in entries if e is not None]
        self.store.add_counter("ledger.fee_bumps", 1)
        self.log.warning("batch transaction stuck; replacing it with a higher fee", nonce=nonce)
        async with self.send_lock:
            await self._sign_and_send(batch, nonce, bump=self.settings.fee_bump, floor=old_fee)

    async def _sign_and_send(
        self, batch: list[Entry], nonce: int, *, bump: float, floor: int = 0
    ) -> None:
        data = self.ledger.batch_data([(e.commitment, e.signature) for e in batch])
        tx: dict[str, Any] = {
            "from": self.account.address,
            "to": self.ledger.address,
            "data": data,
            "nonce": nonce,
            "chainId": self.ledger.chain_id,
        }
        tx["gas"] = await self.call(
            chainlib.estimate_gas, self.w3, tx, BATCH_GAS_BASE + BATCH_GAS_EACH * len(batch)
        )
        fees, key = await self._fees(bump, floor)
        tx.update(fees)
        signed = self.account.sign_transaction(tx)
        tx_hash = bytes(signed.hash)
        keys = [list(e.key) for e in batch]
        async with self.store.transaction() as db:
            await db.execute(
                "INSERT INTO ledger_txs (nonce, tx_hash, raw, items, fee, sent_ms, state) "
                "VALUES (?,?,?,?,?,?,'sent')",
                (
                    nonce,
                    tx_hash,
                    bytes(signed.raw_transaction),
                    json.dumps(keys),
                    fees[key],
                    self.clock.now_ms(),
                ),
            )
        await self.outbox.update([e.key for e in batch], SENT, tx_hash=tx_hash)
        try:
            await self.call(self.w3.eth.send_raw_transaction, signed.raw_transaction)
        except Web3RPCError as exc:
            # The chain refused it outright (funds, nonce, size): nothing is in flight.
            await self._set_tx_state_by_hash(tx_hash, "failed")
            await self.outbox.update([e.key for e in batch], PENDING)
            raise ChainError(f"batch refused by the chain: {exc}") from exc
        self.last_tx = "0x" + tx_hash.hex()
        self.store.add_counter("ledger.txs_sent", 1)
        self.log.info(
            "batch sent", tx=self.last_tx, nonce=nonce, commitments=len(batch), gas_limit=tx["gas"]
        )

    async def _fees(self, bump: float, floor: int) -> tuple[dict[str, int], str]:
        """The chain's fees, above `floor` by `bump` for a replacement; and the fee's key."""
        fees = await self.call(chainlib.fee_fields, self.w3)
        key = "maxFeePerGas" if "maxFeePerGas" in fees else "gasPrice"
        if floor:
            # A replacement must outbid the transaction it replaces, tip included; rounded up,
            # since a fee a fraction of a wei under the bump is refused as underpriced.
            outbid = math.ceil(floor * bump)
            fees[key] = max(fees[key], outbid)
            if "maxPriorityFeePerGas" in fees:
                fees["maxPriorityFeePerGas"] = max(
                    math.ceil(fees["maxPriorityFeePerGas"] * bump), outbid // 2
                )
        return fees, key

    # -- market transactions ----------------------------------------------------------------

    async def send_transaction(self, tx: dict[str, Any]) -> Future[Any]:
        """Sign and broadcast one of the node key's other transactions (`to`, `data`, and
        optionally `value`, `gas`) with the next nonce, recorded in `ledger_txs` first. Returns
        a future of its first receipt (a replacement's, if it was replaced), which the caller
        waits for without holding anything here. Raises ChainError when the chain refuses it."""
        body = {k: tx[k] for k in ("to", "data", "value", "gas") if tx.get(k) is not None}
        if isinstance(body.get("data"), bytes | bytearray):
            body["data"] = "0x" + bytes(body["data"]).hex()
        async with self.send_lock:
            nonce = await self._next_nonce()
            done: Future[Any] = Future()
            self._waiters[nonce] = done
            try:
                await self._sign_market(body, nonce, bump=1.0, floor=0)
            except BaseException:
                self._waiters.pop(nonce, None)
                raise
        self._market_in_flight = True
        self.wake.set()  # follow it every second from now on
        return done

    async def _sign_market(
        self, body: dict[str, Any], nonce: int, *, bump: float, floor: int
    ) -> None:
        tx: dict[str, Any] = {
            "from": self.account.address,
            "nonce": nonce,
            "chainId": self.ledger.chain_id,
            **body,
        }
        if "gas" not in tx:
            tx["gas"] = body["gas"] = await self.call(chainlib.estimate_gas, self.w3, tx, 6_000_000)
        fees, key = await self._fees(bump, floor)
        tx.update(fees)
        signed = self.account.sign_transaction(tx)
        tx_hash = bytes(signed.hash)
        async with self.store.transaction() as db:
            await db.execute(
                "INSERT INTO ledger_txs (nonce, tx_hash, raw, items, fee, sent_ms, state) "
                "VALUES (?,?,?,?,?,?,'sent')",
                (
                    nonce,
                    tx_hash,
                    bytes(signed.raw_transaction),
                    json.dumps(body, sort_keys=True),
                    fees[key],
                    self.clock.now_ms(),
                ),
            )
        try:
            await self.call(self.w3.eth.send_raw_transaction, signed.raw_transaction)
        except Web3RPCError as exc:
            await self._set_tx_state_by_hash(tx_hash, "failed")
            raise ChainError(f"transaction refused by the chain: {exc}") from exc
        self.store.add_counter("market.txs_sent", 1)
        self.log.info("market transaction sent", tx="0x" + tx_hash.hex(), nonce=nonce)

    async def _replace_market(self, nonce: int, body: dict[str, Any], old_fee: int) -> None:
        self.store.add_counter("ledger.fee_bumps", 1)
        self.log.warning("market transaction stuck; replacing it with a higher fee", nonce=nonce)
        async with self.send_lock:
            await self._sign_market(body, nonce, bump=self.settings.fee_bump, floor=old_fee)

    async def _market_mined(self, tx_id: int, nonce: int, receipt: Any) -> None:
        """Hand the first receipt to the sender; the nonce is settled (`mined`, the others
        `replaced`) once its block is `confirmations` deep: until then a reorg that takes it
        off the chain finds it still in flight, and it is broadcast again."""
        self._resolve(nonce, receipt)
        latest = await self.call(self.w3.eth.get_block_number)
        if latest - int(receipt["blockNumber"]) < self.settings.confirmations:
            return
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE ledger_txs SET state = CASE WHEN id = ? THEN 'mined' ELSE 'replaced' END "
                "WHERE state = 'sent' AND nonce = ?",
                (tx_id, nonce),
            )
        self.store.add_counter("market.txs_mined", 1)

    async def _market_unconfirmed(self, nonce: int) -> bool:
        rows = await self.store.query(
            "SELECT 1 FROM ledger_txs WHERE state = 'sent' AND nonce = ? LIMIT 1", (nonce,)
        )
        return bool(rows)

    def _resolve(self, nonce: int, outcome: Any) -> None:
        done = self._waiters.pop(nonce, None)
        if done is None or done.done():
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    async def _set_tx_state_by_hash(self, tx_hash: bytes, state: str) -> None:
        async with self.store.transaction() as db:
            await db.execute("UPDATE ledger_txs SET state = ? WHERE tx_hash = ?", (state, tx_hash))


def _is_market(items: str) -> bool:
    """A market transaction's row keeps its body (a JSON object); a batch's, its commitments."""
    return items.lstrip().startswith("{")
