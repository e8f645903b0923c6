"""Drop `commitments.batch`, which the first outbox had and nothing has used since.

Batches are identified by their transaction (`tx_hash`). A file made since has no such column:
this does nothing there.
"""

from __future__ import annotations

import aiosqlite

SQL = ""


async def upgrade(db: aiosqlite.Connection) -> None:
    """Drop the column where it is still there."""
    async with db.execute("PRAGMA table_info(commitments)") as cur:
        columns = {row[1] for row in await cur.fetchall()}
    if "batch" in columns:
        await db.execute("ALTER TABLE commitments DROP COLUMN batch")
