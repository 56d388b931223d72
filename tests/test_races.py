"""Races with a deletion answer with the domain's reasons, never INTERNAL.

On PostgreSQL (where transactions really run side by side): a user deleted
while someone adds them to an org, or while they sign in, or while they
refresh. Each round starts both calls together; whatever order the database
puts them in, each answer is one the API documents for that call, and the
stored state is consistent afterwards (no membership or session of a deleted
user).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from authsvc.domain.models import OrgRole, Session
from authsvc.errors import UserNotFound
from authsvc.storage.tables import memberships, sessions
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, orgs_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    Backend,
    org_with_owner,
    service,
    start_api,
    stop_api,
)

ROUNDS = 25


@pytest.fixture
async def pg(
    migrated_postgres: str, redis_url: str, tmp_path: Path, log_file: Path
) -> AsyncIterator[Api]:
    """A server on the session's PostgreSQL, where transactions really run
    side by side (SQLite serializes every writer)."""
    backend = Backend("postgres", {"database_url": migrated_postgres, "redis_url": redis_url})
    api = await start_api(backend, tmp_path)
    yield api
    await stop_api(api)


async def _outcome(call: Any) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as rpc_error:
        error = from_rpc_error(rpc_error)
        return f"{error.code.name}/{error.reason}"
    return "OK"


async def _rows(api: Api, table: Any, user_id: str) -> int:
    async with api.server.core.db.reader() as tx:
        stmt = select(func.count()).select_from(table).where(table.c.user_id == user_id)
        return int((await tx.conn.execute(stmt)).scalar_one())


async def _delete(api: Api, user_id: str) -> str:
    return await _outcome(
        api.users.DeleteUser(users_pb2.DeleteUserRequest(user_id=user_id), metadata=service())
    )


@pytest.mark.postgres
async def test_add_member_racing_the_users_deletion(pg: Api) -> None:
    org, _ = await org_with_owner(pg)
    tally: Counter[str] = Counter()
    for _ in range(ROUNDS):
        user = (await pg.sign_up()).user
        add = pg.orgs.AddMember(
            orgs_pb2.AddMemberRequest(org_id=org.id, user_id=user.id), metadata=service()
        )
        added, deleted = await asyncio.gather(_outcome(add), _delete(pg, user.id))
        tally[f"add {added}"] += 1
        assert deleted == "OK"
        assert added in {"OK", "NOT_FOUND/USER_NOT_FOUND"}, added
        assert await _rows(pg, memberships, user.id) == 0
    print(f"\nAddMember vs DeleteUser over {ROUNDS} rounds: {dict(tally)}")


@pytest.mark.postgres
async def test_sign_in_racing_the_users_deletion(pg: Api) -> None:
    tally: Counter[str] = Counter()
    for _ in range(ROUNDS):
        created = await pg.sign_up()
        sign_in = pg.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
        signed, deleted = await asyncio.gather(_outcome(sign_in), _delete(pg, created.user.id))
        tally[f"sign-in {signed}"] += 1
        assert deleted == "OK"
        # A deleted account signs in as an unknown one: nothing tells them apart.
        assert signed in {"OK", "UNAUTHENTICATED/INVALID_CREDENTIALS"}, signed
        assert await _rows(pg, sessions, created.user.id) == 0
    print(f"\nSignIn vs DeleteUser over {ROUNDS} rounds: {dict(tally)}")


@pytest.mark.postgres
async def test_refresh_racing_the_users_deletion(pg: Api) -> None:
    tally: Counter[str] = Counter()
    for _ in range(ROUNDS):
        created = await pg.sign_up()
        refresh = pg.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token)
        )
        refreshed, deleted = await asyncio.gather(_outcome(refresh), _delete(pg, created.user.id))
        tally[f"refresh {refreshed}"] += 1
        assert deleted == "OK"
        assert refreshed in {
            "OK",
            "UNAUTHENTICATED/TOKEN_INVALID",
            "UNAUTHENTICATED/SESSION_REVOKED",
        }, refreshed
        assert await _rows(pg, sessions, created.user.id) == 0
    print(f"\nRefreshToken vs DeleteUser over {ROUNDS} rounds: {dict(tally)}")


async def test_a_vanished_user_is_user_not_found_in_the_repositories(api: Api) -> None:
    """What the races above rely on, without the luck of timing: inserting a
    membership or a session of a user that no longer exists is
    UserNotFound (the foreign key), on both databases."""
    org, _ = await org_with_owner(api)
    gone = uuid.uuid4()
    now = datetime.now(UTC)
    with pytest.raises(UserNotFound):
        async with api.server.core.db.transaction() as tx:
            await tx.memberships.add(uuid.UUID(org.id), gone, OrgRole.MEMBER, now)
    session = Session(
        id=uuid.uuid4(),
        user_id=gone,
        created_at=now,
        last_used_at=now,
        expires_at=now + timedelta(hours=1),
        revoked_at=None,
        ip_address="127.0.0.1",
        user_agent="test",
    )
    with pytest.raises(UserNotFound):
        async with api.server.core.db.transaction() as tx:
            await tx.sessions.add(session)
