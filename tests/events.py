"""Helpers for the event log (the outbox behind revocations)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from sqlalchemy import select, update

from authsvc.storage import migrate
from authsvc.storage.tables import event_log_head
from tests.app import Api, Storage


async def logged(api: Api, within: float = 5.0) -> None:
    """Waits until every event committed so far has its log position (the
    relay runs right after a commit, but not inside the call)."""
    deadline = time.monotonic() + within
    while True:
        _, pending = await api.server.core.event_log.head()
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"events still unpositioned after {within}s")
        await asyncio.sleep(0.005)


async def migrated(storage: Storage) -> Storage:
    """The store, with the Alembic chain applied (the embedded default
    migrates itself on start)."""
    url = storage.backend.urls.get("database_url")
    if url is not None:
        await asyncio.to_thread(migrate.upgrade, url)
    return storage


@contextlib.asynccontextmanager
async def young_log(api: Api) -> AsyncIterator[None]:
    """Makes the server's event log look younger than the retention (as after
    an upgrade of a database that had sessions before the log existed): it
    then cannot vouch for positions before its start, and says so (gap)."""
    async with api.server.core.db.transaction() as tx:
        before = (await tx.conn.execute(select(event_log_head.c.started_ms))).scalar_one()
        await tx.conn.execute(
            update(event_log_head).values(started_ms=int((time.time() - 1) * 1000))
        )
    try:
        yield
    finally:
        async with api.server.core.db.transaction() as tx:
            await tx.conn.execute(update(event_log_head).values(started_ms=before))
