"""Helpers for the event log (the outbox behind revocations)."""

from __future__ import annotations

import asyncio
import time

from authsvc.storage import migrate
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
