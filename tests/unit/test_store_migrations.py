"""Every schema version that shipped upgrades to the newest, keeping every row.

tests/data/schema/ holds one SQL file per shipped schema: that version's migrations verbatim and a
few rows of each table. Version 3 shipped twice: its first outbox had a `batch` column, dropped
later without a new number. A file is upgraded by the store with the ledger's migrations
registered, as a node with a `[chain]` section opens it; its schema must then be a fresh file's.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daisee_node.ledger.outbox import MIGRATIONS_PACKAGE, Outbox
from daisee_node.readings import Reading
from daisee_node.store import MIGRATIONS, Store, StoreError
from daisee_node.store.schema import load_migrations

SCHEMAS = Path(__file__).parents[1] / "data" / "schema"
SHIPPED = sorted(p.name for p in SCHEMAS.glob("v*.sql"))
LEDGER_VERSION = len(load_migrations(MIGRATIONS_PACKAGE))
#: columns a later version dropped, by table: not kept, by design
DROPPED = {"commitments": {"batch"}}


def make_db(path: Path, fixture: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript((SCHEMAS / fixture).read_text())
    conn.close()


def normalised_schema(path: Path) -> list[tuple[str, str, str]]:
    """(type, name, SQL with whitespace and comments evened out) of every object, sorted."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
    finally:
        conn.close()

    def even(sql: str | None) -> str:
        text = re.sub(r"--[^\n]*", "", sql or "")
        text = re.sub(r"\s+", " ", text)
        return re.sub(r"\s*([(),])\s*", r"\1", text).strip()

    return sorted((t, n, even(s)) for t, n, s in rows)


def all_rows(path: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Every row of every table, as (column, value) pairs, less the columns dropped since."""
    conn = sqlite3.connect(path)
    try:
        tables = [
            n
            for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        out: dict[str, set[tuple[Any, ...]]] = {}
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cur.description]
            keep = [i for i, n in enumerate(names) if n not in DROPPED.get(table, set())]
            out[table] = {tuple((names[i], row[i]) for i in keep) for row in cur.fetchall()}
        return out
    finally:
        conn.close()


async def fresh(path: Path) -> None:
    """A new file, as the newest daisee-node makes it for a node with a ledger."""
    store = Store(path)
    Outbox(store)
    await store.open()
    await store.close()


def test_every_shipped_version_has_a_fixture() -> None:
    """Every store version up to the newest has a file (and both of version 3)."""
    versions = set()
    for name in SHIPPED:
        conn = sqlite3.connect(":memory:")
        conn.executescript((SCHEMAS / name).read_text())
        versions.add(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.close()
    assert versions == set(range(1, len(MIGRATIONS) + 1))
    assert "v3-outbox-batch.sql" in SHIPPED


@pytest.mark.parametrize("fixture", SHIPPED)
async def test_an_old_file_upgrades_keeping_every_row(tmp_path: Path, fixture: str) -> None:
    old = tmp_path / "node.db"
    make_db(old, fixture)
    before = all_rows(old)
    store = Store(old)
    Outbox(store)  # the ledger registers its migrations, as a node with [chain] does
    await store.open()
    await store.close()

    after = all_rows(old)
    for table, rows in before.items():
        assert rows <= after[table], table
    assert normalised_schema(old) == normalised_schema(await _fresh_file(tmp_path))
    conn = sqlite3.connect(old)
    assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema.ledger'").fetchone() == (
        str(LEDGER_VERSION),
    )
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()

    # Opening again changes nothing.
    again = Store(old)
    Outbox(again)
    await again.open()
    await again.close()
    assert all_rows(old) == after


async def _fresh_file(tmp_path: Path) -> Path:
    path = tmp_path / "fresh" / "node.db"
    await fresh(path)
    return path


@pytest.mark.parametrize("fixture", ["v2.sql", "v3.sql"])
async def test_the_ledger_registering_after_open_upgrades_before_its_first_use(
    tmp_path: Path, fixture: str
) -> None:
    """A store already open (and writing) gets the ledger's tables before the ledger reads."""
    old = tmp_path / "node.db"
    make_db(old, fixture)
    before = all_rows(old)
    store = Store(old)
    await store.open()
    store.put(Reading("grid.power_w", 1_781_100_000_000, 7.0))
    store.stop()
    await store.run()
    outbox = Outbox(store)
    summary = await outbox.summary("0x" + "ab" * 20)
    await store.close()
    assert summary["by_state"] == ({"confirmed": 1} if fixture == "v3.sql" else {})
    after = all_rows(old)
    for table, rows in before.items():
        if table not in ("latest", "counters"):  # the new reading updated these
            assert rows <= after[table], table
    assert normalised_schema(old) == normalised_schema(await _fresh_file(tmp_path))


async def test_a_node_without_a_ledger_has_no_ledger_tables(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    async with Store(path):
        pass
    conn = sqlite3.connect(path)
    tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"readings", "events", "meta"} <= tables
    assert not tables & {"commitments", "ledger_txs"}
    # `prove` beside it reads read-only: no period was ever sealed there.
    async with Store(path, read_only=True) as reader:
        assert await Outbox(reader).covering("0x" + "ab" * 20, 1_781_000_000_000) is None


async def test_a_file_from_a_newer_store_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    make_db(path, "v3.sql")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    before = all_rows(path)
    store = Store(path)
    Outbox(store)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    with pytest.raises(StoreError, match="newer"):
        await Store(path, read_only=True).open()
    assert all_rows(path) == before
    assert not list(tmp_path.glob("*corrupt*"))


async def test_a_file_with_a_newer_ledger_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await fresh(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema.ledger'", (LEDGER_VERSION + 1,))
    conn.commit()
    conn.close()
    store = Store(path)
    Outbox(store)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    reader = Store(path, read_only=True)
    Outbox(reader)
    with pytest.raises(StoreError, match="ledger schema version"):
        await reader.open()
    async with Store(path):  # a node without the ledger still opens it
        pass


async def test_half_of_the_ledger_tables_is_an_error_not_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    make_db(path, "v3.sql")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE ledger_txs")
    conn.close()
    store = Store(path)
    Outbox(store)
    with pytest.raises(StoreError, match=r"incomplete \(missing \['ledger_txs'\]\)"):
        await store.open()
