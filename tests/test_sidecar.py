"""The sidecar interceptors in front of a small service, against a real authsvc.

A tiny protected service (raw bytes in and out: each handler answers with the
``SessionInfo`` and token it was handed, as JSON) runs on a ``grpc.aio``
server behind ``AuthInterceptor``, or on a classic threaded server behind
``SyncAuthInterceptor``; its sidecar talks to a real authsvc over real
channels. Where a test must know how often the sidecar called authsvc, the
sidecar is given a channel that counts its calls; where authsvc must become
unreachable or silent, a TCP proxy sits between them; where the revocation
stream must carry an event authsvc does not send (a kind of a newer server), a
relay of the test's own serves WatchRevocations and hands GetJwks and
Authenticate on to the real authsvc.

The sign-out latency test prints the time from SignOut returning to the
sidecar's first refusal (run with ``-s`` to see it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.storage import migrate
from authsvc_client.errors import AuthsvcError, SessionRevoked, from_rpc_error
from authsvc_client.sidecar import (
    AuthInterceptor,
    Sidecar,
    SyncAuthInterceptor,
    current_session,
    current_token,
)
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2
from tests.app import (
    API_KEY,
    PASSWORD,
    Api,
    Backend,
    Storage,
    bearer,
    bounded_teardown,
    failure,
    find_leaks,
    org_member,
    org_with_owner,
    refreshed,
    remember,
    service,
    start_api,
    stop_api,
    until_tokens_are_covered,
)
from tests.events import young_log

SERVICE = "sidecartest.v1.Echo"
WHO = f"/{SERVICE}/Who"
PUBLIC = f"/{SERVICE}/Public"
STREAM = f"/{SERVICE}/Stream"  # unary -> stream
UPLOAD = f"/{SERVICE}/Upload"  # stream -> unary
CHAT = f"/{SERVICE}/Chat"  # stream -> stream

AUTHENTICATE = "/authsvc.v1.AuthService/Authenticate"
GET_JWKS = "/authsvc.v1.AuthService/GetJwks"
WATCH = "/authsvc.v1.AuthService/WatchRevocations"

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
REVOKED = (UNAUTH, "SESSION_REVOKED")
STALE = (UNAUTH, "TOKEN_STALE")
INVALID = (UNAUTH, "TOKEN_INVALID")
EXPIRED = (UNAUTH, "TOKEN_EXPIRED")
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")

# Reconnect quickly in tests (gRPC's own defaults back off for up to minutes).
FAST = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


# --------------------------------------------------------------------------- the protected service


def _seen(scribble: bool = False) -> bytes:
    """What the handler was handed. With ``scribble`` it then changes its
    SessionInfo, which must not leak into the next call with the same token."""
    session = current_session()
    seen = {
        "session": None if session is None else MessageToDict(session),
        "token": current_token(),
    }
    if session is not None and scribble:
        session.user_id = "changed by a handler"
    return json.dumps(seen).encode()


async def _who(request: bytes, context: Any) -> bytes:
    return _seen(scribble=True)


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _seen()


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    async for _ in requests:
        pass
    return _seen()


async def _chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield _seen()


def _who_sync(request: bytes, context: Any) -> bytes:
    return _seen(scribble=True)


def _stream_sync(request: bytes, context: Any) -> Iterator[bytes]:
    for _ in range(2):
        yield _seen()


def _upload_sync(requests: Iterator[bytes], context: Any) -> bytes:
    for _ in requests:
        pass
    return _seen()


def _chat_sync(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for _ in requests:
        yield _seen()


def _echo_service(sync: bool) -> grpc.GenericRpcHandler:
    who, stream, upload, chat = (
        (_who_sync, _stream_sync, _upload_sync, _chat_sync)
        if sync
        else (_who, _stream, _upload, _chat)
    )
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Public": grpc.unary_unary_rpc_method_handler(who),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


@dataclass
class Edge:
    """A protected service, its sidecar and a client channel to it."""

    sidecar: Sidecar
    channel: grpc.aio.Channel
    stop: Callable[[], Awaitable[None]]

    async def call(
        self, token: str | None, method: str = WHO, requests: tuple[bytes, ...] = (b"a", b"b")
    ) -> dict[str, Any]:
        """Calls a method; returns what its handler was handed (the last
        message's, for streaming responses)."""
        metadata = bearer(token) if token is not None else ()
        channel: Any = self.channel  # raw bytes in and out: no (de)serializers
        if method in (WHO, PUBLIC):
            reply = await channel.unary_unary(method)(b"", metadata=metadata)
            return dict(json.loads(reply))
        if method == STREAM:
            replies = [r async for r in channel.unary_stream(method)(b"", metadata=metadata)]
        elif method == UPLOAD:
            reply = await channel.stream_unary(method)(iter(requests), metadata=metadata)
            replies = [reply]
        else:
            call = channel.stream_stream(method)(iter(requests), metadata=metadata)
            replies = [r async for r in call]
        assert len(replies) == {STREAM: 2, UPLOAD: 1, CHAT: len(requests)}[method]
        return dict(json.loads(replies[-1])) if replies else {}

    async def with_header(self, authorization: str) -> dict[str, Any]:
        channel: Any = self.channel
        metadata = (("authorization", authorization),)
        return dict(json.loads(await channel.unary_unary(WHO)(b"", metadata=metadata)))

    async def session(self, token: str, method: str = WHO) -> dict[str, Any]:
        seen = await self.call(token, method)
        assert seen["token"] == token
        return dict(seen["session"])

    async def refusal(self, token: str | None, method: str = WHO) -> AuthsvcError:
        # No request messages: a grpc.aio client still writing requests when
        # the server refuses may report INTERNAL instead of the server's
        # status (grpc/grpc#36066), which would hide what the sidecar sent.
        try:
            await self.call(token, method, requests=())
        except grpc.aio.AioRpcError as error:
            return from_rpc_error(error)
        raise AssertionError("the sidecar let the call through")

    async def refused_within(self, token: str, seconds: float) -> tuple[AuthsvcError, float]:
        """Calls until refused; returns the refusal and how long it took."""
        started = time.perf_counter()
        while True:
            try:
                await self.call(token)
            except grpc.aio.AioRpcError as error:
                return from_rpc_error(error), time.perf_counter() - started
            elapsed = time.perf_counter() - started
            assert elapsed < seconds, f"still accepted after {elapsed:.2f} s"
            await asyncio.sleep(0.001)


class Counting:
    """Counts the calls a sidecar makes, by method."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def count(self, details: Any) -> None:
        method = details.method
        self.calls[method.decode() if isinstance(method, bytes) else method] += 1


# grpc.aio files an interceptor under the first call kind it implements only.
class _CountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, counting: Counting) -> None:
        self._counting = counting

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._counting.count(details)
        return await continuation(details, request)


class _CountStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counting: Counting) -> None:
        self._counting = counting

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self._counting.count(details)
        return await continuation(details, request)


Counted = Callable[[str], tuple[grpc.aio.Channel, Counting]]


@pytest.fixture
async def counted() -> AsyncIterator[Counted]:
    """``counted(target)``: a channel to authsvc whose calls are counted."""
    channels: list[grpc.aio.Channel] = []

    def make(target: str) -> tuple[grpc.aio.Channel, Counting]:
        counting = Counting()
        interceptors = [_CountUnary(counting), _CountStream(counting)]
        channel = grpc.aio.insecure_channel(target, options=FAST, interceptors=interceptors)
        channels.append(channel)
        return channel, counting

    yield make
    for channel in channels:
        await channel.close()


Make = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def edges(counted: Counted) -> AsyncIterator[Make]:
    """``make(target, sync=False, settle=False, **sidecar_options)``: a
    started sidecar and a protected server in front of it.

    ``settle`` waits until tokens minted from now on are past the sidecar's
    startup gap (it uses ``gap_margin=0`` then), so they are checked with no
    call to authsvc at all.
    """
    made: list[Edge] = []  # stopped before the counted channels close (fixture order)

    async def make(
        target: str | grpc.aio.Channel, *, sync: bool = False, settle: bool = False, **options: Any
    ) -> Edge:
        if options.get("mode", "watch") == "watch":
            options.setdefault("api_key", API_KEY)
        if settle:
            options.setdefault("gap_margin", 0.0)
        sidecar = Sidecar(target, **options)
        public = {PUBLIC}
        stop: Callable[[], Awaitable[None]]
        if sync:
            await asyncio.to_thread(sidecar.start_in_thread)
            threaded = grpc.server(
                ThreadPoolExecutor(8), interceptors=[SyncAuthInterceptor(sidecar, public=public)]
            )
            threaded.add_generic_rpc_handlers((_echo_service(sync=True),))
            port = threaded.add_insecure_port("127.0.0.1:0")
            threaded.start()

            async def stop() -> None:
                await bounded_teardown(
                    asyncio.to_thread(lambda: threaded.stop(0).wait()), "stopping a threaded server"
                )
                await asyncio.to_thread(sidecar.close_sync)

        else:
            await sidecar.start()
            server = grpc.aio.server(interceptors=[AuthInterceptor(sidecar, public=public)])
            server.add_generic_rpc_handlers((_echo_service(sync=False),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()

            async def stop() -> None:
                await bounded_teardown(server.stop(0), "stopping a server behind the sidecar")
                await bounded_teardown(sidecar.close(), "closing a sidecar")

        edge = Edge(sidecar, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), stop)
        made.append(edge)
        if settle:
            await until_tokens_are_covered(sidecar)
        return edge

    yield make
    for edge in reversed(made):
        await bounded_teardown(edge.channel.close(), "closing a test channel")
        await edge.stop()


# --------------------------------------------------------------------------- a TCP proxy


@dataclass
class _Link:
    transports: list[asyncio.WriteTransport] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    frozen: bool = False


class Proxy:
    """Forwards TCP to authsvc; can go down (refuse and cut connections) or
    freeze (keep connections open but forward nothing, like a dead peer
    behind a NAT)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in self._links:
            for transport in link.transports:
                transport.abort()
            for task in link.tasks:
                task.cancel()
        self._links = []

    def freeze(self) -> None:
        for link in self._links:
            link.frozen = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        link = _Link([writer.transport, up_writer.transport])
        self._links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await source.read(65536):
                if link.frozen:
                    await asyncio.Event().wait()  # until cancelled
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.close()


@pytest.fixture
async def proxy(api: Api) -> AsyncIterator[Proxy]:
    """A proxy in front of the shared server."""
    proxy = Proxy(api.target)
    await proxy.up()
    yield proxy
    await proxy.down()


# --------------------------------------------------------------------------- helpers


def _payload(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def _mint(api: Api, payload: dict[str, Any], **header: Any) -> str:
    """A token signed with authsvc's real, active key (what only authsvc can make)."""
    key = api.server.core.keys.active
    assert key.private is not None
    token = jwt.encode(payload, key.private, algorithm="EdDSA", headers={"kid": key.kid, **header})
    remember(token)
    return token


async def _signed_up(api: Api) -> Any:
    return (await api.sign_up()).tokens


async def _sign_in(api: Api, email: str) -> Any:
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return signed.result.tokens


async def _sign_out(api: Api, token: str) -> None:
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))


async def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {seconds} s"
        await asyncio.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def storage(storage: Storage) -> Storage:
    """This module's own stores, migrated up front (servers on them do not
    migrate PostgreSQL themselves)."""
    url = storage.env.get("AUTHSVC_DATABASE_URL")
    if url is not None:
        with ThreadPoolExecutor(1) as pool:  # Alembic's env runs its own event loop
            pool.submit(migrate.upgrade, url).result()
    return storage


# --------------------------------------------------------------------------- who is calling


@pytest.mark.parametrize("method", [WHO, STREAM, UPLOAD, CHAT])
async def test_a_valid_token_reaches_the_handler_as_session_info(
    api: Api, edges: Make, method: str
) -> None:
    edge = await edges(api.target, settle=True)
    created = await api.sign_up()
    token = created.tokens.access_token
    claims = _payload(token)
    for _ in range(2):  # verified, then from the cache: the same answer
        session = await edge.session(token, method)
        assert session == {
            "sessionId": created.tokens.session_id,
            "userId": created.user.id,
            "role": "ROLE_USER",
            "expireTime": MessageToDict(Timestamp(seconds=claims["exp"])),
        }
        assert claims["exp"] == created.tokens.expire_time.seconds
    # The sidecar's own entry point agrees.
    info = await edge.sidecar.authenticate(token)
    assert (info.user_id, info.session_id, info.email) == (
        created.user.id,
        created.tokens.session_id,
        "",
    )


async def test_the_active_org_and_its_role_reach_the_handler(api: Api, edges: Make) -> None:
    edge = await edges(api.target, settle=True)
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id, resources_pb2.ORG_ROLE_MEMBER)
    admin = await org_member(api, org.id, resources_pb2.ORG_ROLE_ADMIN)
    for user, role in (
        (owner, "ORG_ROLE_OWNER"),
        (member, "ORG_ROLE_MEMBER"),
        (admin, "ORG_ROLE_ADMIN"),
    ):
        session = await edge.session(user.token)
        assert (session["userId"], session["orgId"], session["orgSlug"], session["orgRole"]) == (
            user.id,
            org.id,
            org.slug,
            role,
        )
        assert "email" not in session  # not a claim

    # Clearing the active org: the next token carries none.
    cleared = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=member.tokens.refresh_token, org_id="")
    )
    remember(cleared.tokens.access_token, cleared.tokens.refresh_token)
    session = await edge.session(cleared.tokens.access_token)
    assert "orgId" not in session
    assert "orgSlug" not in session
    assert "orgRole" not in session


# --------------------------------------------------------------------------- refusals


def _forgeries(api: Api, token: str) -> dict[str, str]:
    """Tokens that must each be refused TOKEN_INVALID, most signed with the real key."""
    good = _payload(token)
    now = int(time.time())
    kid = api.server.core.keys.active.kid

    def changed(**changes: Any) -> dict[str, Any]:
        payload = {**good, **changes}
        return {k: v for k, v in payload.items() if v is not None}

    stranger = Ed25519PrivateKey.generate()
    forged = {
        "another issuer": _mint(api, changed(iss="someone-else")),
        "another audience": _mint(api, changed(aud="another-service")),
        "no session id": _mint(api, changed(sid=None)),
        "no claims version": _mint(api, changed(ver=None)),
        "a float claims version": _mint(api, changed(ver=1.5)),
        "no jti": _mint(api, changed(jti=None)),
        "an unknown role": _mint(api, changed(role="superuser")),
        "a subject that is no uuid": _mint(api, changed(sub="alice")),
        "an org without its role": _mint(api, changed(org_id=str(uuid.uuid4()))),
        "an org slug without its org": _mint(api, changed(org_slug="acme")),
        "an org slug that is no string": _mint(
            api, changed(org_id=str(uuid.uuid4()), org_role="member", org_slug=7)
        ),
        "issued in the future": _mint(api, changed(iat=now + 3600, exp=now + 7200)),
        "an unknown kid": _mint(api, good, kid=uuid.uuid4().hex),
        "a foreign signature": jwt.encode(good, stranger, algorithm="EdDSA", headers={"kid": kid}),
        "HS256 keyed with anything": jwt.encode(
            good, "x" * 32, algorithm="HS256", headers={"kid": kid}
        ),
        "alg none": jwt.encode(good, "", algorithm="none", headers={"kid": kid}),
        "a tampered payload": _tamper(token),
        "not a jwt": "not-a-jwt",
        "oversized": token + "A" * 5000,
    }
    remember(*forged.values())
    return forged


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    return ".".join((header, flipped, signature))


async def test_bad_tokens_are_refused_with_their_reason(api: Api, edges: Make) -> None:
    edge = await edges(api.target)
    token = (await _signed_up(api)).access_token
    for what, forged in _forgeries(api, token).items():
        for method in (WHO, PUBLIC, CHAT):
            error = await edge.refusal(forged, method)
            assert (error.code, error.reason) == INVALID, what
            assert error.message  # says why, in words

    error = await edge.refusal(None)
    assert (error.code, error.reason) == (UNAUTH, "NOT_AUTHENTICATED")
    for header in (f"Basic {token}", "Bearer", "Bearer ", token):
        error = await failure(edge.with_header(header))
        assert (error.code, error.reason) == INVALID, header
    # The scheme is case-insensitive, as authsvc's own.
    assert (await edge.with_header(f"bearer {token}"))["token"] == token


async def test_an_expired_token_is_refused_even_from_the_cache(api: Api, edges: Make) -> None:
    edge = await edges(api.target)
    good = _payload((await _signed_up(api)).access_token)
    now = int(time.time())
    expired = _mint(api, {**good, "iat": now - 100, "exp": now - 1})
    error = await edge.refusal(expired)
    assert (error.code, error.reason) == EXPIRED

    # Accepted (and cached) while it lives, refused the moment it expires.
    short = _mint(api, {**good, "iat": now, "exp": now + 2})
    assert (await edge.session(short))["sessionId"] == good["sid"]
    while True:  # asked again and again: served until exp, refused from then on
        asked = time.time()
        try:
            await edge.session(short)
        except grpc.aio.AioRpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            break
        assert asked < now + 2, "served after it expired"
        await asyncio.sleep(0.01)
    assert (error.code, error.reason) == EXPIRED
    assert time.time() >= now + 2  # refused from exp on, not before


async def test_a_public_method_needs_no_token_but_refuses_a_bad_one(api: Api, edges: Make) -> None:
    edge = await edges(api.target)
    assert await edge.call(None, PUBLIC) == {"session": None, "token": None}
    tokens = await _signed_up(api)
    seen = await edge.call(tokens.access_token, PUBLIC)
    assert seen["session"]["sessionId"] == tokens.session_id
    error = await edge.refusal("garbage", PUBLIC)
    assert (error.code, error.reason) == INVALID
    await _sign_out(api, tokens.access_token)
    error = await _refused_on(edge, tokens.access_token, PUBLIC)
    assert (error.code, error.reason) == REVOKED


async def _refused_on(edge: Edge, token: str, method: str, seconds: float = 5.0) -> AuthsvcError:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await edge.call(token, method)
        except grpc.aio.AioRpcError as error:
            return from_rpc_error(error)
        assert time.monotonic() < deadline, "still accepted"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- revocations


async def test_sign_out_is_refused_at_once_without_a_call_per_request(
    api: Api, edges: Make, counted: Counted
) -> None:
    channel, counter = counted(api.target)
    edge = await edges(channel, settle=True)
    latencies = []
    for _ in range(10):
        tokens = await _signed_up(api)
        for _ in range(3):
            assert (await edge.session(tokens.access_token))["sessionId"] == tokens.session_id
        await _sign_out(api, tokens.access_token)
        error, took = await edge.refused_within(tokens.access_token, 5.0)
        assert (error.code, error.reason) == REVOKED
        latencies.append(took)
        # And it stays refused, for every kind of method.
        for method in (WHO, STREAM, UPLOAD, CHAT):
            error = await edge.refusal(tokens.access_token, method)
            assert (error.code, error.reason) == REVOKED, (method, error.message)
    print(
        f"\nSignOut -> sidecar refusal ({api.backend}, {len(latencies)} rounds): "
        f"median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 1.0, latencies
    # Local checks only: the sidecar asked authsvc for keys once and opened
    # one stream, and never called Authenticate.
    assert counter.calls[AUTHENTICATE] == 0, counter.calls
    assert counter.calls[GET_JWKS] == 1, counter.calls
    assert counter.calls[WATCH] == 1, counter.calls


async def test_revoking_one_session_leaves_the_others(api: Api, edges: Make) -> None:
    edge = await edges(api.target, settle=True)
    created = await api.sign_up()
    other = await _sign_in(api, created.user.email)
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=created.tokens.session_id),
        metadata=service(),
    )
    error, _ = await edge.refused_within(created.tokens.access_token, 2.0)
    assert (error.code, error.reason) == REVOKED
    assert (await edge.session(other.access_token))["sessionId"] == other.session_id

    # Sign out everywhere: every session of the user goes.
    third = await _sign_in(api, created.user.email)
    await api.sessions.RevokeAllSessions(
        sessions_pb2.RevokeAllSessionsRequest(user_id=created.user.id), metadata=service()
    )
    for token in (other.access_token, third.access_token):
        error, _ = await edge.refused_within(token, 2.0)
        assert (error.code, error.reason) == REVOKED


async def test_a_membership_change_makes_the_token_stale_until_refreshed(
    api: Api, edges: Make
) -> None:
    edge = await edges(api.target, settle=True)
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id)
    assert (await edge.session(member.token))["orgRole"] == "ORG_ROLE_MEMBER"

    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(
            org_id=org.id, user_id=member.id, role=resources_pb2.ORG_ROLE_ADMIN
        ),
        metadata=service(),
    )
    error, _ = await edge.refused_within(member.token, 2.0)
    assert (error.code, error.reason) == STALE
    assert (await edge.session(owner.token))["orgRole"] == "ORG_ROLE_OWNER"  # not touched

    # The refreshed token carries the new claims and is served.
    tokens = await refreshed(api, member.tokens.refresh_token)
    session = await edge.session(tokens.access_token)
    assert (session["orgId"], session["orgRole"]) == (org.id, "ORG_ROLE_ADMIN")

    # Removed from the org: stale again; the next token has no org.
    await api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.id), metadata=service()
    )
    error, _ = await edge.refused_within(tokens.access_token, 2.0)
    assert (error.code, error.reason) == STALE
    tokens = await refreshed(api, tokens.refresh_token)
    session = await edge.session(tokens.access_token)
    assert "orgId" not in session
    assert "orgRole" not in session


@pytest.mark.parametrize("log_age", ["old", "young"])
async def test_sessions_revoked_before_the_sidecar_started_are_refused(
    api: Api, edges: Make, counted: Counted, log_age: str
) -> None:
    """The first stream replays authsvc's whole log, so a session revoked
    before the sidecar started is refused from the deny set. A log that
    vouches for everything (this suite's: created with the database) needs
    no call at all; a log younger than a token's lifetime (a database that had
    sessions before its log existed) may lack earlier events, so it reports a
    gap and older tokens are checked online (cached)."""
    young = log_age == "young"
    async with young_log(api) if young else contextlib.nullcontext():
        await _revoked_before_start(api, edges, counted, young)


async def _revoked_before_start(api: Api, edges: Make, counted: Counted, young: bool) -> None:
    revoked = await _signed_up(api)
    await _sign_out(api, revoked.access_token)
    live = await api.sign_up()
    channel, counter = counted(api.target)
    edge = await edges(channel, online_cache_ttl=60.0)

    error = await edge.refusal(revoked.access_token)
    assert (error.code, error.reason) == REVOKED
    for _ in range(5):
        session = await edge.session(live.tokens.access_token)
        assert session["sessionId"] == live.tokens.session_id
    if young:
        # Authenticate's answer (with the email), asked once, then cached.
        assert session["email"] == live.user.email
        assert counter.calls[AUTHENTICATE] == 1, counter.calls
    else:
        # The token's own claims: no email, and no call.
        assert "email" not in session
        assert counter.calls[AUTHENTICATE] == 0, counter.calls


# --------------------------------------------------------------------------- event kinds


class Relay:
    """An AuthService in front of the real authsvc: it serves WatchRevocations
    itself (its own events only, after a first answer without a gap), and
    hands GetJwks and Authenticate on to authsvc, counting the Authenticate
    calls. So the sidecar behind it learns of a revocation only by asking."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._events: asyncio.Queue[list[auth_pb2.Revocation]] = asyncio.Queue()
        self.authenticate_calls = 0
        self.target = ""
        self._server: grpc.aio.Server | None = None

    def send(self, *events: auth_pb2.Revocation) -> None:
        """Sends ``events`` in one response to every open stream's next read."""
        self._events.put_nowait(list(events))

    async def _watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        n = 0
        yield auth_pb2.WatchRevocationsResponse(position="relay-0", retention_seconds=960)
        while True:
            try:
                events = await asyncio.wait_for(self._events.get(), 1.0)
            except TimeoutError:
                yield auth_pb2.WatchRevocationsResponse(position=f"relay-{n}")  # a heartbeat
                continue
            n += 1
            yield auth_pb2.WatchRevocationsResponse(revocations=events, position=f"relay-{n}")

    async def _authenticate(self, request: Any, context: Any) -> Any:
        self.authenticate_calls += 1
        try:
            return await self._api.auth.Authenticate(request)
        except grpc.aio.AioRpcError as error:
            # authsvc's refusal as it is: code, message and ErrorInfo.
            trailers = tuple(error.trailing_metadata() or ())
            await context.abort(error.code(), error.details() or "", trailers)

    async def _jwks(self, request: Any, context: Any) -> Any:
        return await self._api.auth.GetJwks(request)

    async def start(self) -> None:
        def unary(function: Any, request: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                function,
                request_deserializer=request.FromString,
                response_serializer=lambda response: response.SerializeToString(),
            )

        handlers = {
            "Authenticate": unary(self._authenticate, auth_pb2.AuthenticateRequest),
            "GetJwks": unary(self._jwks, auth_pb2.GetJwksRequest),
            "WatchRevocations": grpc.unary_stream_rpc_method_handler(
                self._watch,
                request_deserializer=auth_pb2.WatchRevocationsRequest.FromString,
                response_serializer=lambda response: response.SerializeToString(),
            ),
        }
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("authsvc.v1.AuthService", handlers),)
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.target = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await bounded_teardown(self._server.stop(0), "stopping the relay")


@pytest.fixture
async def relay(api: Api) -> AsyncIterator[Relay]:
    """A started Relay (ask for it before ``edges``: it must outlive the sidecar)."""
    made = Relay(api)
    await made.start()
    yield made
    await made.stop()


#: Events the sidecar cannot apply: (what, the event, the log line's name).
_UNREADABLE = [
    (
        "a kind newer than the sidecar",
        {"kind": 99},
        "authsvc.sidecar.revocation_kind_unknown",
    ),
    (
        "an unspecified kind",
        {"kind": auth_pb2.REVOCATION_KIND_UNSPECIFIED},
        "authsvc.sidecar.revocation_kind_unknown",
    ),
    (
        "a claims change without a version",
        {"kind": auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED, "stale_below_version": 0},
        "authsvc.sidecar.revocation_malformed",
    ),
]


@pytest.mark.parametrize(("what", "fields", "logged"), _UNREADABLE, ids=[u[0] for u in _UNREADABLE])
async def test_an_event_of_an_unknown_kind_is_a_gap_never_nothing(
    api: Api,
    relay: Relay,
    edges: Make,
    caplog: pytest.LogCaptureFixture,
    what: str,
    fields: dict[str, Any],
    logged: str,
) -> None:
    """A newer server must not make an older sidecar fail open: an event the
    sidecar cannot read says that some tokens no longer stand, and it cannot
    tell which, so from then on it checks every token minted before the event
    online (Authenticate), exactly as after a gap, until they have expired."""
    ttl = 2.0
    edge = await edges(relay.target, online_cache_ttl=ttl, gap_margin=0.0)
    before, other = await api.sign_up(), await api.sign_up()
    for created in (before, other, before):  # local: the token's claims, no call
        session = await edge.session(created.tokens.access_token)
        assert (session["sessionId"], "email" in session) == (created.tokens.session_id, False)
    assert relay.authenticate_calls == 0

    caplog.set_level(logging.WARNING, logger="authsvc_client.sidecar")
    now = Timestamp()
    now.GetCurrentTime()
    # Twice, for another session of nobody here: the same kind is logged once.
    relay.send(
        *(auth_pb2.Revocation(session_id=str(uuid.uuid4()), time=now, **fields) for _ in range(2))
    )
    deadline = time.monotonic() + 5.0
    while "email" not in await edge.session(before.tokens.access_token):
        assert time.monotonic() < deadline, f"{what}: still checked locally only"
        await asyncio.sleep(0.01)
    # Asked once, then answered from the online cache.
    for _ in range(5):
        assert (await edge.session(before.tokens.access_token))["email"] == before.user.email
    assert relay.authenticate_calls == 1
    assert (await edge.session(other.tokens.access_token))["email"] == other.user.email
    assert relay.authenticate_calls == 2

    # A token minted after the event is covered by the stream: local again.
    await until_tokens_are_covered(edge.sidecar)
    later = await api.sign_up()
    assert "email" not in await edge.session(later.tokens.access_token)
    assert relay.authenticate_calls == 2

    # Revoked at authsvc (whose own stream this sidecar does not hear): the
    # online check refuses it once the cached answer is older than the TTL.
    await _sign_out(api, before.tokens.access_token)
    error, _ = await edge.refused_within(before.tokens.access_token, ttl + 3.0)
    assert (error.code, error.reason) == REVOKED
    assert relay.authenticate_calls >= 3
    assert (await edge.session(other.tokens.access_token))["sessionId"] == other.tokens.session_id

    records = [r for r in caplog.records if r.getMessage() == logged]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(records[0], "kind", None) == fields["kind"]
    assert find_leaks(str(records[0].__dict__)) == []


# --------------------------------------------------------------------------- reconnects


async def test_a_reconnect_misses_no_revocation(
    storage: Storage,
    log_file: Path,
    edges: Make,
    counted: Counted,
) -> None:
    """authsvc goes away; a replica revokes the session meanwhile; authsvc
    comes back on the same address and the sidecar refuses the token.

    The replica's event is in the database's log (on both backends; the
    embedded server restarted on the same file), replayed from the sidecar's
    position: no gap, no online check.
    """
    listen = f"127.0.0.1:{_free_port()}"
    first = await start_api(storage.backend, storage.data_dir, listen=listen)
    replica = await start_api(storage.backend, storage.data_dir)
    second: Api | None = None
    try:
        channel, counter = counted(first.target)
        edge = await edges(channel, settle=True, reconnect_backoff=0.05, max_reconnect_backoff=0.2)
        tokens = await _signed_up(first)
        assert (await edge.session(tokens.access_token))["sessionId"] == tokens.session_id

        await stop_api(first)
        await _until(lambda: not edge.sidecar.watching, 5.0, "disconnected")
        await _sign_out(replica, tokens.access_token)
        # Disconnected: the cached verification stands (the documented window).
        assert (await edge.session(tokens.access_token))["sessionId"] == tokens.session_id

        second = await start_api(storage.backend, storage.data_dir, listen=listen)
        error, _ = await edge.refused_within(tokens.access_token, 10.0)
        assert (error.code, error.reason) == REVOKED
        assert edge.sidecar.watching
        assert counter.calls[AUTHENTICATE] == 0, counter.calls
        assert counter.calls[WATCH] >= 2

        # New tokens work; new revocations arrive as before.
        fresh = await _signed_up(second)
        assert (await edge.session(fresh.access_token))["sessionId"] == fresh.session_id
        await _sign_out(second, fresh.access_token)
        error, _ = await edge.refused_within(fresh.access_token, 2.0)
        assert (error.code, error.reason) == REVOKED
    finally:
        for server in (second, replica):
            if server is not None:
                await stop_api(server)


async def test_a_silent_stream_is_replaced(
    backend_urls: Backend, tmp_path: Path, log_file: Path, edges: Make
) -> None:
    """A connection that stays open but carries nothing (a dead peer behind a
    NAT) is noticed by the missing heartbeats and replaced."""
    api = await start_api(backend_urls, tmp_path, revocation_heartbeat=0.2)
    proxy = Proxy(api.target)
    await proxy.up()
    try:
        edge = await edges(proxy.target, settle=True, heartbeat_timeout=1.0)
        tokens = await _signed_up(api)
        assert (await edge.session(tokens.access_token))["sessionId"] == tokens.session_id
        proxy.freeze()
        await _sign_out(api, tokens.access_token)
        error, took = await edge.refused_within(tokens.access_token, 6.0)
        assert (error.code, error.reason) == REVOKED
        assert took > 0.5  # it did wait for the silence to tell
    finally:
        await proxy.down()
        await stop_api(api)


# --------------------------------------------------------------------------- keys


async def test_key_rotation_while_the_sidecar_runs(
    storage: Storage,
    servers: Callable[..., Awaitable[Api]],
    edges: Make,
    counted: Counted,
) -> None:
    api = await servers(key_reload_interval=3600)
    channel, counter = counted(api.target)
    edge = await edges(channel, jwks_refresh_floor=0.5, jwks_refresh_interval=3600)
    created = await api.sign_up()
    old_kid = api.server.core.keys.active.kid
    before = created.tokens.access_token
    unseen = (await _sign_in(api, created.user.email)).access_token  # old key, not yet shown
    assert (await edge.session(before))["userId"] == created.user.id
    assert counter.calls[GET_JWKS] == 1

    new_kid = await api.server.core.keys.rotate()
    assert new_kid != old_kid
    after = (await _sign_in(api, created.user.email)).access_token
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    # Within the refetch floor since the start's fetch, the unknown kid is
    # refused without a fetch; past it, it makes the sidecar refetch, once.
    deadline = time.monotonic() + 3.0
    while True:
        try:
            assert (await edge.session(after))["userId"] == created.user.id
            break
        except grpc.aio.AioRpcError as rpc_error:
            reason = from_rpc_error(rpc_error).reason
        assert (reason, counter.calls[GET_JWKS]) == ("TOKEN_INVALID", 1)
        assert time.monotonic() < deadline, "the new key was never fetched"
        await asyncio.sleep(0.02)
    assert counter.calls[GET_JWKS] == 2  # the unknown kid made it refetch, once
    # Tokens of the retired key keep working, cached or not.
    for token in (before, unseen, after):
        assert (await edge.session(token))["userId"] == created.user.id
    assert counter.calls[GET_JWKS] == 2


async def test_keys_are_refreshed_periodically(
    storage: Storage, servers: Callable[..., Awaitable[Api]], edges: Make
) -> None:
    api = await servers(key_reload_interval=3600)
    # No refetch on unknown kids (floor of an hour): only the periodic refresh.
    edge = await edges(api.target, jwks_refresh_floor=3600, jwks_refresh_interval=0.3)
    created = await api.sign_up()
    await api.server.core.keys.rotate()
    after = (await _sign_in(api, created.user.email)).access_token
    deadline = time.monotonic() + 3.0
    while True:
        try:
            assert (await edge.session(after))["userId"] == created.user.id
            break
        except grpc.aio.AioRpcError as rpc_error:
            # Until the next periodic fetch, the new kid is unknown.
            reason = from_rpc_error(rpc_error).reason
        assert reason == "TOKEN_INVALID"
        assert time.monotonic() < deadline, "the new key was not picked up"
        await asyncio.sleep(0.05)


async def test_unknown_kids_do_not_flood_authsvc_with_key_fetches(
    api: Api, edges: Make, counted: Counted
) -> None:
    channel, counter = counted(api.target)
    # The flood lasts 0.3 floor, so a round of refusals slowed by a loaded
    # machine still ends well before the floor would allow another fetch.
    floor = 2.0
    edge = await edges(channel, jwks_refresh_floor=floor)
    started = time.monotonic()  # the start's fetch is done by now
    good = _payload((await _signed_up(api)).access_token)
    stranger = Ed25519PrivateKey.generate()

    def made_up() -> str:
        token = jwt.encode(good, stranger, algorithm="EdDSA", headers={"kid": uuid.uuid4().hex})
        remember(token)
        return token

    await asyncio.sleep(max(0.0, started + floor - time.monotonic()))  # past that floor
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < 0.3 * floor:  # well within one floor
        errors = await asyncio.gather(*(edge.refusal(made_up()) for _ in range(20)))
        assert all((e.code, e.reason) == INVALID for e in errors)
        rounds += 1
    assert rounds >= 2
    assert counter.calls[GET_JWKS] == 2, counter.calls  # the start's, and one refetch


# --------------------------------------------------------------------------- authsvc unreachable


async def test_watch_mode_keeps_verifying_with_cached_keys_while_authsvc_is_down(
    api: Api, proxy: Proxy, edges: Make
) -> None:
    edge = await edges(
        proxy.target,
        settle=True,
        reconnect_backoff=0.05,
        max_reconnect_backoff=0.3,
        jwks_refresh_floor=0.1,
    )
    cached = await _signed_up(api)
    assert (await edge.session(cached.access_token))["sessionId"] == cached.session_id

    await proxy.down()
    await _until(lambda: not edge.sidecar.watching, 5.0, "disconnected")
    fresh = await _signed_up(api)  # minted while the sidecar cannot reach authsvc
    for tokens in (cached, fresh):
        assert (await edge.session(tokens.access_token))["sessionId"] == tokens.session_id
    # A key it cannot fetch: unavailable, not invalid (it may be genuine) once
    # the refetch floor lets the sidecar try; within the floor since its last
    # fetch attempt, the unknown kid is refused as invalid without one.
    unknown = _mint(api, _payload(fresh.access_token), kid=uuid.uuid4().hex)
    deadline = time.monotonic() + 2.0
    while True:
        error = await edge.refusal(unknown)
        if (error.code, error.reason) == UNAVAILABLE:
            break
        assert (error.code, error.reason) == INVALID
        assert time.monotonic() < deadline, "an unknown kid never made the sidecar try a fetch"
        await asyncio.sleep(0.02)

    # Back: revocations made while it was away are applied (replayed).
    await _sign_out(api, fresh.access_token)
    await proxy.up()
    await _until(lambda: edge.sidecar.watching, 5.0, "reconnected")
    error, _ = await edge.refused_within(fresh.access_token, 2.0)
    assert (error.code, error.reason) == REVOKED
    assert (await edge.session(cached.access_token))["sessionId"] == cached.session_id


async def test_online_mode_asks_authenticate_with_a_short_cache(
    api: Api, edges: Make, counted: Counted
) -> None:
    channel, counter = counted(api.target)
    edge = await edges(channel, mode="online", online_cache_ttl=0.5)
    created = await api.sign_up()
    token = created.tokens.access_token
    for _ in range(5):
        session = await edge.session(token)
        assert (session["sessionId"], session["email"]) == (
            created.tokens.session_id,
            created.user.email,
        )
    assert counter.calls[AUTHENTICATE] == 1
    assert counter.calls[WATCH] == 0

    await _sign_out(api, token)
    error, took = await edge.refused_within(token, 2.0)
    assert (error.code, error.reason) == REVOKED
    assert took < 0.5 + 0.3, took
    print(f"\nSignOut -> refusal in online mode (cache 0.5 s, {api.backend}): {took * 1000:.0f} ms")

    # Concurrent first requests of one token share one Authenticate.
    fresh = (await _signed_up(api)).access_token
    before = counter.calls[AUTHENTICATE]
    await asyncio.gather(*(edge.session(fresh) for _ in range(20)))
    assert counter.calls[AUTHENTICATE] == before + 1


@pytest.mark.parametrize("fail_open", [False, True])
async def test_online_mode_when_authsvc_is_down(
    api: Api, proxy: Proxy, edges: Make, fail_open: bool
) -> None:
    edge = await edges(proxy.target, mode="online", online_cache_ttl=0.2, fail_open=fail_open)
    created = await api.sign_up()
    token = created.tokens.access_token
    assert (await edge.session(token))["email"] == created.user.email

    await proxy.down()
    # Until the cached answer expires (0.2 s) it is served; then the sidecar
    # asks authsvc, which it cannot reach.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            if "email" not in await edge.session(token):
                break  # fail_open: accepted on the local checks alone
        except grpc.aio.AioRpcError:
            break  # refused: which way is checked below
        assert time.monotonic() < deadline, "the cached answer never expired"
        await asyncio.sleep(0.02)
    other = await _signed_up(api)
    for candidate in (token, other.access_token):
        if fail_open:
            # Accepted on the local verification alone: claims, no email.
            session = await edge.session(candidate)
            assert "email" not in session
        else:
            error = await edge.refusal(candidate)
            assert (error.code, error.reason) == UNAVAILABLE
    # Local checks still refuse what they can tell on their own.
    error = await edge.refusal("garbage")
    assert (error.code, error.reason) == INVALID

    await proxy.up()
    await _until_accepted(edge, other.access_token, 5.0)
    assert (await edge.session(other.access_token))["email"]  # authsvc's answer again


async def _until_accepted(edge: Edge, token: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if "email" in await edge.session(token):
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, "not accepted again"
        await asyncio.sleep(0.05)


async def test_start_fails_loudly(api: Api) -> None:
    with pytest.raises(AuthsvcError) as raised:
        await Sidecar(api.target, api_key="ak_not_a_key_of_this_server").start()
    assert (raised.value.code, raised.value.reason) == (UNAUTH, "API_KEY_INVALID")

    started = time.monotonic()
    with pytest.raises(AuthsvcError) as raised:
        await Sidecar(f"127.0.0.1:{_free_port()}", api_key=API_KEY, startup_timeout=0.5).start()
    assert (raised.value.code, raised.value.reason) == UNAVAILABLE
    assert time.monotonic() - started < 3.0

    with pytest.raises(ValueError, match="API key"):
        Sidecar(api.target)


# --------------------------------------------------------------------------- threaded servers


async def test_the_sync_interceptor_on_a_threaded_server(api: Api, edges: Make) -> None:
    # A log younger than a token's lifetime: tokens older than the sidecar
    # are checked online.
    async with young_log(api):
        await _sync_interceptor(api, edges)


async def _sync_interceptor(api: Api, edges: Make) -> None:
    earlier = await api.sign_up()  # before the sidecar: checked online, on its loop
    edge = await edges(api.target, sync=True, settle=True)
    later = await api.sign_up()  # after: local only, on the server's worker threads

    for method in (WHO, STREAM, UPLOAD, CHAT):
        session = await edge.session(earlier.tokens.access_token, method)
        assert (session["userId"], session["email"]) == (earlier.user.id, earlier.user.email)
        session = await edge.session(later.tokens.access_token, method)
        assert (session["userId"], session.get("email")) == (later.user.id, None)

    error = await edge.refusal(None)
    assert (error.code, error.reason) == (UNAUTH, "NOT_AUTHENTICATED")
    error = await edge.refusal("garbage", CHAT)
    assert (error.code, error.reason) == INVALID
    assert await edge.call(None, PUBLIC) == {"session": None, "token": None}

    # Worker threads do not carry one call's caller into the next.
    await asyncio.gather(*(edge.session(later.tokens.access_token) for _ in range(20)))
    assert await edge.call(None, PUBLIC) == {"session": None, "token": None}

    await _sign_out(api, later.tokens.access_token)
    error, _ = await edge.refused_within(later.tokens.access_token, 1.0)
    assert (error.code, error.reason) == REVOKED

    # The sidecar's sync entry point, from a thread of ours.
    info = await asyncio.to_thread(edge.sidecar.authenticate_sync, earlier.tokens.access_token)
    assert info.user_id == earlier.user.id
    with pytest.raises(SessionRevoked) as raised:  # the typed error of the reason
        await asyncio.to_thread(edge.sidecar.authenticate_sync, later.tokens.access_token)
    assert (raised.value.code, raised.value.reason) == REVOKED


# --------------------------------------------------------------------------- closing


async def test_close_is_bounded_even_if_a_task_will_not_end(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A host's shutdown must not wait on the sidecar forever: close() hangs
    up the revocation stream first (so grpc ends its pending read), and a
    background task that does not end within the bound once cancelled is
    abandoned with a warning."""
    caplog.set_level(logging.WARNING, logger="authsvc_client.sidecar")
    sidecar = Sidecar(api.target, api_key=API_KEY)
    await sidecar.start()
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    stuck = asyncio.create_task(stubborn(), name="stubborn")
    sidecar._tasks.append(stuck)  # one more background task, as close() sees them
    started = time.monotonic()
    try:
        await asyncio.wait_for(sidecar.close(), 30)
        # It waited the bound for the stubborn task, then left it behind; the
        # watcher (reading its stream) and the others ended, none abandoned.
        assert time.monotonic() - started >= 4.9
        assert not stuck.done()
        stuck_logs = [r for r in caplog.records if r.getMessage() == "authsvc.sidecar.task_stuck"]
        assert [getattr(r, "task", None) for r in stuck_logs] == ["stubborn"]
    finally:
        released.set()
        await stuck


async def test_close_ends_the_watcher_without_abandoning_it(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authsvc_client.sidecar")
    sidecar = Sidecar(api.target, api_key=API_KEY)
    await sidecar.start()
    assert sidecar.watching
    tasks = list(sidecar._tasks)
    await asyncio.wait_for(sidecar.close(), 30)
    assert all(task.done() for task in tasks)
    assert not [r for r in caplog.records if r.getMessage() == "authsvc.sidecar.task_stuck"]
