"""Numbered schema migrations: the store's own, and those of each component that owns tables.

A migration is a module `NNNN_what.py` in a migrations package, numbered from 1 without gaps,
holding its `SQL` (statements separated by `;`) and, when SQL cannot say it, an
`async def upgrade(db)` run after the SQL. Each runs in one transaction with the record of it.

The store's own count is `PRAGMA user_version`. A component that owns tables (the ledger) registers
its package under an owner name; how many of its migrations have run is kept in the `meta` table
under `schema.<owner>`. Files written before an owner kept its count may already hold what its
first migrations create: a migration whose tables and indexes are all there already is recorded
as done without running (their rows are kept), and the owner's later migrations bring the rest
up to date. A file from a newer daisee-node (a count above what this one knows) is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from daisee_node.store.errors import StoreError

#: the store's own migrations
STORE_MIGRATIONS = "daisee_node.store.migrations"
#: meta key prefix of an owner's migration count
OWNER_VERSION_PREFIX = "schema."
_FILE = re.compile(r"^(\d{4})_(\w+)\.py$")

Upgrade = Callable[[aiosqlite.Connection], Awaitable[None]]
#: opens one write transaction on the store's connection
Begin = Callable[[], contextlib.AbstractAsyncContextManager[aiosqlite.Connection]]


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered migration: its SQL and, if it has one, its Python step."""

    number: int
    name: str
    sql: str
    upgrade: Upgrade | None = None

    def statements(self) -> list[str]:
        """The SQL split into statements (none of ours contain `;` inside a literal)."""
        lines = [ln for ln in self.sql.splitlines() if not ln.strip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]

    async def apply(self, db: aiosqlite.Connection) -> None:
        """Run it on `db` (inside the caller's transaction)."""
        for statement in self.statements():
            await db.execute(statement)
        if self.upgrade is not None:
            await self.upgrade(db)


def load_migrations(package: str) -> tuple[Migration, ...]:
    """The numbered migrations of `package`, in order."""
    found: list[Migration] = []
    # A plain listing of the package's folder (importlib.resources costs ~10 ms of imports).
    folder = Path(str(importlib.import_module(package).__file__)).parent
    for name in sorted(os.listdir(folder)):
        match = _FILE.match(name)
        if match is None:
            continue
        module = importlib.import_module(f"{package}.{Path(name).stem}")
        found.append(
            Migration(
                int(match.group(1)),
                match.group(2),
                str(module.SQL),
                getattr(module, "upgrade", None),
            )
        )
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise StoreError(f"{package}: migrations must be numbered 1, 2, 3 …, found {numbers}")
    return tuple(found)


def too_new(path: Path, version: int, known: int, owner: str | None = None) -> str:
    """The message refusing a file whose schema is newer than this daisee-node's."""
    what = "schema version" if owner is None else f"{owner} schema version"
    return (
        f"{path} has {what} {version}, newer than this daisee-node understands ({known}); "
        "upgrade daisee-node"
    )


async def store_version(db: aiosqlite.Connection) -> int:
    """How many of the store's own migrations the file has had."""
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate_store(
    db: aiosqlite.Connection, begin: Begin, migrations: Sequence[Migration], path: Path, log: Any
) -> None:
    """Run the store's migrations the file has not had yet."""
    version = await store_version(db)
    if version > len(migrations):
        raise StoreError(too_new(path, version, len(migrations)))
    for migration in migrations[version:]:
        async with begin() as tx:
            await migration.apply(tx)
            await tx.execute(f"PRAGMA user_version={migration.number}")
        log.info("schema migrated", version=migration.number)


async def owner_version(db: aiosqlite.Connection, owner: str) -> int | None:
    """How many of `owner`'s migrations the file has had; None before the owner kept a count."""
    async with db.execute(
        "SELECT value FROM meta WHERE key = ?", (OWNER_VERSION_PREFIX + owner,)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else None


def check_owner_version(path: Path, owner: str, version: int | None, known: int) -> None:
    """Refuse a file in which `owner`'s schema is newer than this daisee-node's."""
    if version is not None and version > known:
        raise StoreError(too_new(path, version, known, owner))


async def migrate_owner(
    db: aiosqlite.Connection,
    begin: Begin,
    owner: str,
    migrations: Sequence[Migration],
    store_migrations: Sequence[Migration],
    path: Path,
    log: Any,
) -> None:
    """Run `owner`'s migrations the file has not had yet (adopting what is already there)."""
    version = await owner_version(db, owner)
    check_owner_version(path, owner, version, len(migrations))
    key = OWNER_VERSION_PREFIX + owner
    if version is None:
        version = await _already_there(db, owner, migrations, store_migrations, path)
        async with begin() as tx:
            await tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(version))
            )
        if version:
            log.info("schema found in place", owner=owner, version=version)
    for migration in migrations[version:]:
        async with begin() as tx:
            await migration.apply(tx)
            await tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, str(migration.number)),
            )
        log.info("schema migrated", owner=owner, version=migration.number)


async def _already_there(
    db: aiosqlite.Connection,
    owner: str,
    migrations: Sequence[Migration],
    store_migrations: Sequence[Migration],
    path: Path,
) -> int:
    """How many of `owner`'s first migrations the file already holds the objects of.

    Each migration's tables and indexes are found by running the migrations on an empty
    in-memory database. Counting stops at the first migration that creates nothing (a data or
    column step, which must check for itself) or whose objects are missing.
    """
    async with db.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'index', 'view', 'trigger')"
    ) as cur:
        present = {str(row[0]) for row in await cur.fetchall()}
    made = _objects_made(store_migrations, migrations)
    count = 0
    for migration, names in zip(migrations, made, strict=True):
        there = names & present
        if not names or not there:
            break
        if there != names:
            raise StoreError(
                f"{path}: the {owner} tables are incomplete (missing {sorted(names - there)}); "
                "move the file aside to start a new one"
            )
        count = migration.number
    return count


def _objects_made(
    store_migrations: Sequence[Migration], migrations: Sequence[Migration]
) -> list[set[str]]:
    """The names each of `migrations` creates, on top of the store's schema."""
    conn = sqlite3.connect(":memory:")
    try:
        for migration in store_migrations:
            conn.executescript(migration.sql)

        def names() -> set[str]:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            return {str(r[0]) for r in rows}

        made: list[set[str]] = []
        before = names()
        for migration in migrations:
            conn.executescript(migration.sql)
            after = names()
            made.append(after - before)
            before = after
        return made
    finally:
        conn.close()


@dataclass
class Schema:
    """The migrations a store runs: its own, then each registered owner's, in that order."""

    own: tuple[Migration, ...]
    owners: dict[str, tuple[Migration, ...]]
    #: owners registered since the file was last migrated
    pending: list[str]

    @classmethod
    def of_store(cls) -> Schema:
        """The store's own migrations, no owner yet."""
        return cls(MIGRATIONS_OF_STORE, {}, [])

    def register(self, owner: str, package: str) -> bool:
        """Add `owner`'s migrations from `package`; False if it was registered already."""
        if owner in self.owners:
            return False
        self.owners[owner] = load_migrations(package)
        self.pending.append(owner)
        return True

    async def migrate(self, db: aiosqlite.Connection, begin: Begin, path: Path, log: Any) -> None:
        """Bring the file up to date: the store's migrations, then every owner's."""
        await migrate_store(db, begin, self.own, path, log)
        self.pending.clear()
        for owner, migrations in self.owners.items():
            await migrate_owner(db, begin, owner, migrations, self.own, path, log)

    async def migrate_pending(
        self, db: aiosqlite.Connection, begin: Begin, path: Path, log: Any
    ) -> None:
        """Run the migrations of owners registered after the file was opened."""
        while self.pending:
            owner = self.pending[0]
            await migrate_owner(db, begin, owner, self.owners[owner], self.own, path, log)
            self.pending.pop(0)

    async def check_read_only(self, db: aiosqlite.Connection, path: Path) -> int:
        """Refuse a file newer than this code (nothing is migrated); the store's version."""
        version = await store_version(db)
        if version > len(self.own):
            raise StoreError(too_new(path, version, len(self.own)))
        if version >= 1:
            for owner, migrations in self.owners.items():
                check_owner_version(path, owner, await owner_version(db, owner), len(migrations))
        self.pending.clear()
        return version


MIGRATIONS_OF_STORE: tuple[Migration, ...] = load_migrations(STORE_MIGRATIONS)
#: the SQL of each of the store's migrations; `PRAGMA user_version` counts how many have run
MIGRATIONS: tuple[str, ...] = tuple(m.sql for m in MIGRATIONS_OF_STORE)
