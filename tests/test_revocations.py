"""WatchRevocations: the feed local token verifiers follow, over a real channel.

What a sidecar relies on: every revocation and claims change arrives, in
order, soon after the call that caused it; a reconnect with the last position
replays what was missed, and nothing else; a position the server's log cannot
vouch for is reported as a gap; an idle stream sends heartbeats; and on the
postgres backend an event made on one replica reaches watchers of another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from sqlalchemy import update

from authsvc.storage import event_log
from authsvc.storage.tables import event_log_head
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    Backend,
    Storage,
    bearer,
    failure,
    remember,
    service,
    start_api,
    stop_api,
)
from tests.events import logged, migrated

Stream = Any  # a grpc.aio UnaryStreamCall


def _watch(api: Api, after: str = "", metadata: Any = None) -> Stream:
    return api.auth.WatchRevocations(
        auth_pb2.WatchRevocationsRequest(after=after),
        metadata=metadata if metadata is not None else service(),
    )


async def _next(stream: Stream, within: float = 5.0) -> auth_pb2.WatchRevocationsResponse:
    response = await asyncio.wait_for(stream.read(), within)
    assert response is not grpc.aio.EOF, "the stream ended"
    return response  # type: ignore[no-any-return]


async def _next_events(stream: Stream, within: float = 5.0) -> auth_pb2.WatchRevocationsResponse:
    """The next response that carries events (skipping heartbeats)."""
    deadline = time.monotonic() + within
    while True:
        response = await _next(stream, max(0.01, deadline - time.monotonic()))
        if response.revocations:
            return response


async def _signed_in(api: Api) -> tuple[str, str]:
    """A new user's (access token, session id)."""
    created = await api.sign_up()
    return created.tokens.access_token, created.tokens.session_id


@pytest.fixture
async def watching(api: Api) -> AsyncIterator[tuple[Api, Stream, str]]:
    stream = _watch(api)
    first = await _next(stream)
    yield api, stream, first.position
    stream.cancel()


async def test_the_first_response_ends_an_empty_replay(api: Api) -> None:
    stream = _watch(api)
    try:
        first = await _next(stream)
    finally:
        stream.cancel()
    assert first.position
    assert not first.revocations
    assert not first.gap
    assert first.retention_seconds == api.settings.access_token_ttl + 60


async def test_sign_out_arrives_as_a_revocation(watching: tuple[Api, Stream, str]) -> None:
    api, stream, position = watching
    token, session_id = await _signed_in(api)
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
    response = await _next_events(stream)
    assert [(r.session_id, r.kind) for r in response.revocations] == [
        (session_id, auth_pb2.REVOCATION_KIND_SESSION_REVOKED)
    ]
    assert response.position != position
    assert abs(response.revocations[0].time.seconds - time.time()) < 60


async def test_revoke_all_sends_every_session(watching: tuple[Api, Stream, str]) -> None:
    api, stream, _ = watching
    created = await api.sign_up()
    remember(created.tokens.access_token)
    others = []
    for _ in range(2):
        signed = await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
        remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
        others.append(signed.result.tokens.session_id)
    await api.sessions.RevokeAllSessions(
        sessions_pb2.RevokeAllSessionsRequest(),
        metadata=bearer(created.tokens.access_token),
    )
    seen: set[str] = set()
    while len(seen) < 3:
        response = await _next_events(stream)
        assert all(r.kind == auth_pb2.REVOCATION_KIND_SESSION_REVOKED for r in response.revocations)
        seen.update(r.session_id for r in response.revocations)
    assert seen == {created.tokens.session_id, *others}


async def test_a_membership_change_makes_older_tokens_stale(
    watching: tuple[Api, Stream, str],
) -> None:
    api, stream, _ = watching
    owner_token, _ = await _signed_in(api)
    member = await api.sign_up()
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug="stale-claims", name="Stale"),
            metadata=bearer(owner_token),
        )
    ).org
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org.id, user_id=member.user.id), metadata=service()
    )
    switched = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=member.tokens.refresh_token, org_id=org.id)
    )
    remember(switched.tokens.access_token, switched.tokens.refresh_token)
    old_version = _claims(switched.tokens.access_token)["ver"]
    # The switch itself changed the session's claims: tokens from before it
    # are stale, the new one is not.
    (switch,) = (await _next_events(stream)).revocations
    assert (switch.session_id, switch.kind) == (
        member.tokens.session_id,
        auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED,
    )
    assert switch.stale_below_version == old_version > _claims(member.tokens.access_token)["ver"]

    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(
            org_id=org.id, user_id=member.user.id, role=resources_pb2.ORG_ROLE_ADMIN
        ),
        metadata=service(),
    )
    response = await _next_events(stream)
    (event,) = response.revocations
    assert event.session_id == member.tokens.session_id
    assert event.kind == auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED
    assert event.stale_below_version > old_version

    # The next refresh mints a token at (not below) the new version.
    refreshed = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=switched.tokens.refresh_token)
    )
    remember(refreshed.tokens.access_token, refreshed.tokens.refresh_token)
    claims = _claims(refreshed.tokens.access_token)
    assert claims["ver"] == event.stale_below_version
    assert claims["org_role"] == "admin"


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


KNOWN_KINDS = {auth_pb2.REVOCATION_KIND_SESSION_REVOKED, auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED}


async def _collect(
    stream: Stream, first: auth_pb2.WatchRevocationsResponse, count: int
) -> list[Any]:
    """The events of ``first`` and of the responses after it, until ``count``."""
    events = list(first.revocations)
    while len(events) < count:
        events += (await _next_events(stream)).revocations
    return events


async def test_each_event_says_what_happened_and_none_is_unspecified(api: Api) -> None:
    """A revocation is SESSION_REVOKED (no version), a claims change
    CLAIMS_CHANGED with the session's new claims version; over a mix of every
    change that makes events, live and in a replay, no event is
    REVOCATION_KIND_UNSPECIFIED (which a verifier would have to treat as a gap)."""
    live = _watch(api)
    await _next(live)
    revoked, changed = (
        auth_pb2.REVOCATION_KIND_SESSION_REVOKED,
        auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED,
    )
    expected: list[tuple[str, int, int]] = []  # (session, kind, stale_below_version)

    owner_token, owner_session = await _signed_in(api)
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug="kinds", name="Kinds"), metadata=bearer(owner_token)
        )
    ).org
    member = await api.sign_up()
    sid = member.tokens.session_id
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org.id, user_id=member.user.id), metadata=service()
    )
    # A switch of the active org.
    switched = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=member.tokens.refresh_token, org_slug="kinds")
    )
    remember(switched.tokens.access_token, switched.tokens.refresh_token)
    expected.append((sid, changed, _claims(switched.tokens.access_token)["ver"]))
    refresh_token = switched.tokens.refresh_token

    async def new_version() -> int:
        nonlocal refresh_token
        pair = await api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=refresh_token)
        )
        remember(pair.tokens.access_token, pair.tokens.refresh_token)
        refresh_token = pair.tokens.refresh_token
        return int(_claims(pair.tokens.access_token)["ver"])

    # An org role change, a platform role change, a removal from the org.
    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(
            org_id=org.id, user_id=member.user.id, role=resources_pb2.ORG_ROLE_ADMIN
        ),
        metadata=service(),
    )
    expected.append((sid, changed, await new_version()))
    await api.users.SetUserRole(
        users_pb2.SetUserRoleRequest(user_id=member.user.id, role=resources_pb2.ROLE_ADMIN),
        metadata=service(),
    )
    expected.append((sid, changed, await new_version()))
    await api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.user.id), metadata=service()
    )
    expected.append((sid, changed, await new_version()))
    # A revocation by an admin, and a sign-out.
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=sid), metadata=service()
    )
    expected.append((sid, revoked, 0))
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(owner_token))
    expected.append((owner_session, revoked, 0))
    versions = [v for _, kind, v in expected if kind == changed]
    # Each change raised the version: strictly increasing.
    assert all(a < b for a, b in itertools.pairwise(versions)), versions

    try:
        seen_live = await _collect(live, auth_pb2.WatchRevocationsResponse(), len(expected))
    finally:
        live.cancel()
    await logged(api)
    replay = _watch(api, after="0-0")
    try:
        first = await _next(replay)
        assert not first.gap
        replayed = await _collect(replay, first, len(expected))
    finally:
        replay.cancel()

    for events in (seen_live, replayed):
        assert all(e.kind in KNOWN_KINDS for e in events), [e.kind for e in events]
        assert [(e.session_id, e.kind, e.stale_below_version) for e in events] == expected


async def test_a_reconnect_replays_what_it_missed_and_nothing_else(api: Api) -> None:
    before, _ = await _signed_in(api)
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(before))
    await logged(api)
    stream = _watch(api)
    position = (await _next(stream)).position
    stream.cancel()

    missed = []
    for _ in range(3):
        token, session_id = await _signed_in(api)
        await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        missed.append(session_id)
    await logged(api)

    resumed = _watch(api, after=position)
    try:
        first = await _next(resumed)
        assert not first.gap
        assert [r.session_id for r in first.revocations] == missed
        # Resuming from the end replays nothing.
        again = _watch(api, after=first.position)
        try:
            assert list((await _next(again)).revocations) == []
        finally:
            again.cancel()
    finally:
        resumed.cancel()


async def test_an_unknown_recent_position_is_a_gap(api: Api) -> None:
    token, session_id = await _signed_in(api)
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
    await logged(api)
    forged = f"{int(time.time() * 1000)}-987654"
    stream = _watch(api, after=forged)
    try:
        first = await _next(stream)
        assert first.gap
        # Everything the log still holds comes along.
        assert session_id in {r.session_id for r in first.revocations}
    finally:
        stream.cancel()


async def test_a_position_older_than_the_retention_is_no_gap(api: Api) -> None:
    """Events older than the retention concern only expired tokens, and this
    log was created before any session existed: it vouches for everything."""
    ancient = f"{int((time.time() - api.settings.access_token_ttl - 3600) * 1000)}-0"
    for after in (ancient, "0-0"):
        stream = _watch(api, after=after)
        try:
            assert not (await _next(stream)).gap
        finally:
            stream.cancel()


async def test_a_log_younger_than_the_retention_cannot_vouch_for_older_positions(
    storage: Storage, servers: Any
) -> None:
    """A database upgraded to the event log while it had sessions: events
    before the upgrade were never logged, and may concern live tokens."""
    await migrated(storage)
    api = await servers()
    await api.sign_up()
    async with api.server.core.db.transaction() as tx:
        await tx.conn.execute(
            update(event_log_head).values(started_ms=int((time.time() - 60) * 1000))
        )
    older = f"{int((time.time() - 120) * 1000)}-0"
    for after, gap in ((older, True), ("0-0", True)):
        stream = _watch(api, after=after)
        try:
            assert (await _next(stream)).gap is gap
        finally:
            stream.cancel()
    # From its start on, it vouches.
    stream = _watch(api, after="")
    try:
        newest = (await _next(stream)).position
    finally:
        stream.cancel()
    stream = _watch(api, after=newest)
    try:
        assert not (await _next(stream)).gap
    finally:
        stream.cancel()


@pytest.mark.parametrize("after", ["x", "1-", "-1", "1-2-3", "12345", "1 - 2", "9" * 40 + "-0"])
async def test_a_malformed_position_is_invalid_argument(api: Api, after: str) -> None:
    error = await failure(_next(_watch(api, after=after)))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_user_token_may_not_watch(api: Api) -> None:
    token, _ = await _signed_in(api)
    error = await failure(_next(_watch(api, metadata=bearer(token))))
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    error = await failure(_next(_watch(api, metadata=())))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "NOT_AUTHENTICATED")


async def test_an_idle_stream_sends_heartbeats(backend_urls: Backend, tmp_path: Path) -> None:
    api = await start_api(backend_urls, tmp_path, revocation_heartbeat=0.2)
    try:
        stream = _watch(api)
        first = await _next(stream)
        started = time.monotonic()
        beats = [await _next(stream, within=2.0) for _ in range(3)]
        elapsed = time.monotonic() - started
        assert all(not b.revocations and b.position == first.position for b in beats)
        assert 0.4 < elapsed < 2.0
        stream.cancel()
    finally:
        await stop_api(api)


async def test_a_restart_loses_no_event(storage: Storage, log_file: Path) -> None:
    """The log is in the database: a watcher resuming after the server
    restarted gets what happened meanwhile, with no gap, on both backends."""
    await migrated(storage)
    first = await start_api(storage.backend, storage.data_dir)
    try:
        stream = _watch(first)
        await _next(stream)
        token, _ = await _signed_in(first)
        await first.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        position = (await _next_events(stream)).position
        stream.cancel()
        # Revoked while no watcher is connected; then the server restarts.
        token, missed = await _signed_in(first)
        await first.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        await logged(first)
    finally:
        await stop_api(first)
    second = await start_api(storage.backend, storage.data_dir)
    try:
        resumed = _watch(second, after=position)
        replay = await _next(resumed)
        assert not replay.gap
        assert [r.session_id for r in replay.revocations] == [missed]
        resumed.cancel()
    finally:
        await stop_api(second)


@pytest.mark.postgres
async def test_events_reach_the_watchers_of_another_replica(
    migrated_postgres: str, redis_url: str, tmp_path: Path
) -> None:
    backend = Backend("postgres", {"database_url": migrated_postgres, "redis_url": redis_url})
    a = await start_api(backend, tmp_path / "a")
    b = await start_api(backend, tmp_path / "b")
    try:
        stream = _watch(b)
        await _next(stream)
        latencies = []
        for _ in range(5):
            token, session_id = await _signed_in(a)
            started = time.monotonic()
            await a.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
            response = await _next_events(stream)
            latencies.append(time.monotonic() - started)
            assert [r.session_id for r in response.revocations] == [session_id]
        assert max(latencies) < 1.0, latencies
        stream.cancel()
    finally:
        await stop_api(b)
        await stop_api(a)


async def test_stopping_the_server_ends_watch_streams_at_once(
    backend_urls: Backend, tmp_path: Path
) -> None:
    api = await start_api(backend_urls, tmp_path, shutdown_grace=10.0)
    stream = _watch(api)
    await _next(stream)
    started = time.monotonic()
    stopping = asyncio.ensure_future(api.server.stop())
    error = await failure(_next(stream, within=5.0))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    await stopping
    await api.channel.close()
    # Well inside the 10 s grace an open stream would otherwise hold it for.
    assert time.monotonic() - started < 5.0


async def test_a_long_replay_comes_in_parts_and_misses_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log longer than one replay (REPLAY_LIMIT events; 3 here) is sent in
    parts, in order, before the live events: none falls between them."""
    monkeypatch.setattr(event_log, "REPLAY_LIMIT", 3)
    revoked = []
    for _ in range(7):
        token, session_id = await _signed_in(api)
        await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        revoked.append(session_id)
    await logged(api)
    stream = _watch(api, after="0-0")
    try:
        first = await _next(stream)
        assert not first.gap
        assert [r.session_id for r in first.revocations] == revoked[:3]
        seen = [r.session_id for r in first.revocations]
        while len(seen) < len(revoked):
            seen += [r.session_id for r in (await _next_events(stream)).revocations]
        assert seen == revoked
        # And live events follow.
        token, live = await _signed_in(api)
        await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        assert [r.session_id for r in (await _next_events(stream)).revocations] == [live]
    finally:
        stream.cancel()
