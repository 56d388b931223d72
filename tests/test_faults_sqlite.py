"""SQLite busy on the embedded default: another process's connection holds
the file's write lock (``BEGIN IMMEDIATE``, as a CLI run or a backup tool
may) for longer than the busy timeout. Writes are refused with UNAVAILABLE /
BACKEND_UNAVAILABLE and a RetryInfo, not INTERNAL, reads go on (WAL), nothing
is written, and once the lock is released everything works again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc.storage.database import SQLITE_BUSY_TIMEOUT
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, users_pb2
from tests.app import PASSWORD, Api, Backend, bearer, start_api, stop_api
from tests.test_faults import refusal, unavailable_with_retry


@pytest.fixture
async def api(tmp_path: Path, log_file: Path) -> AsyncIterator[Api]:
    server = await start_api(Backend("embedded", {}), tmp_path)
    yield server
    await stop_api(server)


@contextmanager
def _write_locked(path: str) -> Iterator[None]:
    """Another connection holds the database's write lock until the block ends."""
    locked, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=0)
            try:
                conn.execute("BEGIN IMMEDIATE")
                locked.set()
                release.wait(120)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except BaseException as error:
            failed.append(error)
            locked.set()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    locked.wait(10)
    assert not failed, failed
    try:
        yield
    finally:
        release.set()
        holder.join(10)


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as rpc_error:
        return from_rpc_error(rpc_error), time.monotonic() - started
    raise AssertionError("a write succeeded while another connection holds the lock")


async def test_writes_refused_while_another_connection_holds_the_sqlite_lock(
    api: Api,
) -> None:
    user = await api.sign_up()
    tokens = user.tokens
    path = api.settings.resolved_database_url().split(":///", 1)[1]
    before = await api.snapshot()

    with _write_locked(path):
        # The writes queue on the server's own write lock: one after another,
        # each waits out the busy timeout (or fails at once when its
        # transaction read first and cannot upgrade to writing).
        started = time.monotonic()
        results = await asyncio.gather(
            _timed(
                api.auth.SignUp(
                    auth_pb2.SignUpRequest(
                        email=f"busy-{uuid.uuid4().hex[:12]}@example.com", password=PASSWORD
                    )
                )
            ),
            _timed(
                api.auth.RefreshToken(
                    auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
                )
            ),
            _timed(
                api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(tokens.access_token))
            ),
        )
        took = time.monotonic() - started
        # Reads go on beside the held lock (WAL).
        api.server.core.cache.clear()
        info = await api.auth.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=tokens.access_token)
        )
        assert info.session.session_id == tokens.session_id
        me = await api.users.GetCurrentUser(
            users_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
        )
        assert me.user.id == user.user.id
        assert await api.snapshot() == before, "a refused write changed stored data"

    for (error, seconds), name in zip(results, ("SignUp", "RefreshToken", "SignOut"), strict=True):
        print(f"\nSQLite locked: {name} -> {error.code.name} {error.reason} in {seconds:.2f}s")
        unavailable_with_retry(error)
    # Every write waited at most the busy timeout (plus its turn on the
    # server's write lock), none hung.
    assert took <= 3 * SQLITE_BUSY_TIMEOUT + 3.0, took
    assert max(s for _, s in results) >= SQLITE_BUSY_TIMEOUT - 0.5

    # Released: every write works, and the refused ones had changed nothing.
    await api.sign_up()
    rotated = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    )
    assert rotated.tokens.session_id == tokens.session_id
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(tokens.access_token))
    error = await refusal(
        api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=tokens.access_token))
    )
    assert error.reason == "SESSION_REVOKED"
