"""Races answer with the domain's reasons, never INTERNAL, and etags hold.

On PostgreSQL (where transactions really run side by side): a user deleted
while someone adds them to an org, or while they sign in, or while they
refresh. Each round starts both calls together; whatever order the database
puts them in, each answer is one the API documents for that call, and the
stored state is consistent afterwards (no membership or session of a deleted
user).

On both backends: two changes of one user, org or membership made with one
etag and started together: exactly one wins.
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
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import func, select

from authsvc.domain.models import OrgRole, Session
from authsvc.errors import UserNotFound
from authsvc.storage.tables import memberships, sessions
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, users_pb2
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


# -- one etag, two writers -------------------------------------------------------
#
# Two changes made with the same etag, started together: the etag is checked
# in the write transaction on the row read under its lock, so whichever the
# database lets in first wins and the other sees the new etag (or no row).
# Exactly one is OK, whatever the order; on SQLite (one writer at a time) as
# on PostgreSQL, where both transactions really run side by side.

ETAG_ROUNDS = 10
LOST = {"ABORTED/ETAG_MISMATCH"}


async def _duel(first: Any, second: Any) -> list[str]:
    return list(await asyncio.gather(_outcome(first), _outcome(second)))


def _one_wins(outcomes: list[str], losing: set[str], tally: Counter[str]) -> int:
    """The index of the call that won; the other lost with one of ``losing``."""
    tally[" / ".join(sorted(outcomes))] += 1
    assert outcomes.count("OK") == 1, outcomes
    winner = outcomes.index("OK")
    assert outcomes[1 - winner] in losing, outcomes
    return winner


def _rename(user_id: str, name: str, etag: str) -> users_pb2.UpdateUserRequest:
    return users_pb2.UpdateUserRequest(
        user=resources_pb2.User(id=user_id, display_name=name, etag=etag),
        update_mask=FieldMask(paths=["display_name"]),
    )


def _rename_org(api: Api, org_id: str, name: str, etag: str) -> Any:
    return api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org_id,
            values=resources_pb2.Org(name=name, etag=etag),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=service(),
    )


def _set_member_role(api: Api, org_id: str, user_id: str, role: Any, etag: str) -> Any:
    return api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org_id, user_id=user_id, role=role, etag=etag),
        metadata=service(),
    )


async def _user(api: Api, user_id: str) -> Any:
    return (
        await api.users.GetUser(users_pb2.GetUserRequest(user_id=user_id), metadata=service())
    ).user


async def test_two_user_changes_with_one_etag_one_wins(api: Api) -> None:
    tally: Counter[str] = Counter()
    for _ in range(ETAG_ROUNDS):
        user = (await api.sign_up()).user
        outcomes = await _duel(
            api.users.UpdateUser(_rename(user.id, "First", user.etag), metadata=service()),
            api.users.UpdateUser(_rename(user.id, "Second", user.etag), metadata=service()),
        )
        winner = _one_wins(outcomes, LOST, tally)
        assert (await _user(api, user.id)).display_name == ["First", "Second"][winner]

        # Different RPCs, one etag: the role and the email.
        user = await _user(api, user.id)
        outcomes = await _duel(
            api.users.SetUserRole(
                users_pb2.SetUserRoleRequest(
                    user_id=user.id, role=resources_pb2.ROLE_ADMIN, etag=user.etag
                ),
                metadata=service(),
            ),
            api.users.SetUserEmail(
                users_pb2.SetUserEmailRequest(
                    user_id=user.id,
                    email=f"moved-{uuid.uuid4().hex[:8]}@example.com",
                    etag=user.etag,
                ),
                metadata=service(),
            ),
        )
        winner = _one_wins(outcomes, LOST, tally)
        now = await _user(api, user.id)
        assert (now.role == resources_pb2.ROLE_ADMIN, now.email != user.email) == (
            winner == 0,
            winner == 1,
        )

        # A delete and a change, one etag: the loser is stale, or finds no user.
        outcomes = await _duel(
            api.users.DeleteUser(
                users_pb2.DeleteUserRequest(user_id=now.id, etag=now.etag), metadata=service()
            ),
            api.users.UpdateUser(_rename(now.id, "Third", now.etag), metadata=service()),
        )
        winner = _one_wins(outcomes, LOST | {"NOT_FOUND/USER_NOT_FOUND"}, tally)
        if winner == 1:
            assert (await _user(api, now.id)).display_name == "Third"
    print(f"\nuser changes with one etag over {ETAG_ROUNDS} rounds: {dict(tally)}")


async def test_two_org_changes_with_one_etag_one_wins(api: Api) -> None:
    tally: Counter[str] = Counter()
    for _ in range(ETAG_ROUNDS):
        org, _owner = await org_with_owner(api)

        def rename(name: str, etag: str, org_id: str = org.id) -> Any:
            return _rename_org(api, org_id, name, etag)

        winner = _one_wins(
            await _duel(rename("First", org.etag), rename("Second", org.etag)), LOST, tally
        )
        got = (await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id), metadata=service())).org
        assert got.name == ["First", "Second"][winner]

        outcomes = await _duel(
            api.orgs.DeleteOrg(
                orgs_pb2.DeleteOrgRequest(org_id=org.id, etag=got.etag, force=True),
                metadata=service(),
            ),
            rename("Third", got.etag),
        )
        _one_wins(outcomes, LOST | {"NOT_FOUND/ORG_NOT_FOUND"}, tally)
    print(f"\norg changes with one etag over {ETAG_ROUNDS} rounds: {dict(tally)}")


async def test_two_membership_changes_with_one_etag_one_wins(api: Api) -> None:
    tally: Counter[str] = Counter()
    org, _owner = await org_with_owner(api)
    for _ in range(ETAG_ROUNDS):
        user = (await api.sign_up()).user
        added = (
            await api.orgs.AddMember(
                orgs_pb2.AddMemberRequest(org_id=org.id, user_id=user.id), metadata=service()
            )
        ).member

        def set_role(role: Any, etag: str, user_id: str = user.id) -> Any:
            return _set_member_role(api, org.id, user_id, role, etag)

        roles = [resources_pb2.ORG_ROLE_ADMIN, resources_pb2.ORG_ROLE_OWNER]
        winner = _one_wins(
            await _duel(set_role(roles[0], added.etag), set_role(roles[1], added.etag)), LOST, tally
        )
        member = (
            await api.orgs.GetMember(
                orgs_pb2.GetMemberRequest(org_id=org.id, user_id=user.id), metadata=service()
            )
        ).member
        assert member.role == roles[winner]

        outcomes = await _duel(
            api.orgs.RemoveMember(
                orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=user.id, etag=member.etag),
                metadata=service(),
            ),
            set_role(resources_pb2.ORG_ROLE_MEMBER, member.etag),
        )
        _one_wins(outcomes, LOST | {"NOT_FOUND/MEMBER_NOT_FOUND"}, tally)
    print(f"\nmembership changes with one etag over {ETAG_ROUNDS} rounds: {dict(tally)}")
