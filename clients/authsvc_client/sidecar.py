"""The sidecar: authenticate the callers of *your* gRPC service with authsvc's tokens.

A service that receives calls puts :class:`AuthInterceptor` (``grpc.aio``
servers) or :class:`SyncAuthInterceptor` (classic threaded ``grpc`` servers) in
front of its handlers. The interceptor reads ``authorization: Bearer <jwt>``,
verifies the access token locally against the JWKS fetched from authsvc, refuses
revoked and stale tokens it learnt of from authsvc's WatchRevocations stream,
and hands the handler who is calling::

    from authsvc_client.sidecar import AuthInterceptor, Sidecar, current_session

    sidecar = Sidecar("authsvc:50051", api_key=os.environ["AUTHSVC_API_KEY"])
    await sidecar.start()                  # fetches the JWKS, opens the stream
    server = grpc.aio.server(interceptors=[
        AuthInterceptor(sidecar, public={"/notes.v1.Notes/Health"}),
    ])
    ...
    async def GetNote(self, request, context):
        session = current_session()        # authsvc_client.v1.resources_pb2.SessionInfo
        ...                                # session.user_id, .org_id, .org_role ...
    ...
    await server.stop(grace)
    await sidecar.close()

A classic threaded server runs the sidecar's asyncio machinery (key fetches,
the revocation stream, online checks) on a thread of its own::

    sidecar = Sidecar("authsvc:50051", api_key=key)
    sidecar.start_in_thread()              # blocks until started; raises like start()
    server = grpc.server(ThreadPoolExecutor(16),
                         interceptors=[SyncAuthInterceptor(sidecar)])
    ...
    server.stop(grace).wait()
    sidecar.close_sync()

In a handler, :func:`current_session` is the caller's ``SessionInfo`` (a copy
of its own per call) and :func:`current_token` the raw access token (to call
further services on the caller's behalf). Both are None in a public method
called without a token. Outside a handler protected by an interceptor, both
are None. ``Sidecar.authenticate`` (async) and ``Sidecar.authenticate_sync``
(any thread but the sidecar's own loop) check a token without an interceptor.

What a token must be
--------------------
An EdDSA (Ed25519) JWS whose ``kid`` is in authsvc's JWKS; any other ``alg`` is
refused, whatever the token says. Its ``iss`` and ``aud`` must be the configured
``issuer`` and ``audience``; ``exp`` in the future (no leeway); ``iat`` no more
than ``clock_skew`` seconds in the future; ``sub``, ``sid`` UUIDs; ``jti``
present; ``role`` "user" or "admin"; ``ver`` an integer; and, when the session
has an active org, ``org_id`` a UUID with ``org_role`` "owner", "admin" or
"member", and ``org_slug`` a string (a token without it, from a server older
than the claim, is taken with an empty slug). The handler's ``SessionInfo`` is
built from these claims: session_id, user_id, role, org_id, org_slug, org_role
and expire_time; ``email`` and ``session_expire_time`` are empty (they are not
in the token). In online mode,
and for tokens checked online during a gap (below), it is authsvc's own answer
instead: the live role and org, with email.

Refusals are ``UNAUTHENTICATED`` with a ``google.rpc.Status`` carrying
``ErrorInfo(domain="authsvc", reason=...)``, readable with
:func:`authsvc_client.errors.from_rpc_error`, as authsvc itself sends them:

* ``NOT_AUTHENTICATED``: no ``authorization`` header on a method that needs one.
* ``TOKEN_INVALID``: not ``Bearer <token>``, malformed, forged, another issuer
  or audience, another algorithm, a ``kid`` authsvc does not publish.
* ``TOKEN_EXPIRED``: past ``exp``.
* ``SESSION_REVOKED``: the session was signed out or revoked.
* ``TOKEN_STALE``: the session's claims (platform role, org, org slug, org role) changed
  after the token was minted: refresh it.
* ``SESSION_EXPIRED`` and others: whatever authsvc answered an online check.
* ``UNAVAILABLE`` / ``BACKEND_UNAVAILABLE``: an online check could not reach
  authsvc and ``fail_open`` is off, or a token names a key that could not be
  fetched because authsvc is unreachable.

Public methods (``public=``, full names such as ``"/pkg.Service/Method"``)
run without a token. A token sent anyway is verified like on any other method
and a bad one is refused, as authsvc treats its own public methods: a client
that sends a credential learns that it is bad rather than being served
anonymously.

Cost per request
----------------
Verifying an EdDSA signature costs about as much as a small RPC, so verified
tokens are cached (token -> claims, until ``exp``, at most ``cache_size``
tokens). A repeated token costs a dict lookup, an expiry comparison and a
deny-set lookup; the handler gets a fresh copy of the ``SessionInfo``. In all,
about 5 us per call on top of the handler, against about 300 us for a
verification. The sync
interceptor does that lookup on the server's worker thread and touches the
sidecar's event loop only on a miss (a new token, an online check due).

Revocation: ``mode="watch"`` (default)
--------------------------------------
A background task holds a WatchRevocations stream open (authenticated with
``api_key``, an authsvc API key). Each event is kept in a local deny set for
the ``retention_seconds`` the server announces (the longest an access token
lives, plus a margin): a revoked session's tokens are refused with
SESSION_REVOKED, tokens whose ``ver`` is below a session's
``stale_below_version`` with TOKEN_STALE. No call per request: a sign-out
reaches the sidecar as fast as the stream carries it (tests/test_sidecar.py
measures it).

* Disconnects: the task reconnects with exponential backoff (from
  ``reconnect_backoff`` up to ``max_reconnect_backoff``, with jitter) and
  resumes after the last position; authsvc replays what happened meanwhile.
  A stream silent for ``heartbeat_timeout`` seconds (authsvc sends a heartbeat
  every 5 s by default) is taken for dead and replaced.
* While authsvc is unreachable, tokens keep being verified locally with the
  cached keys, and the deny set keeps refusing what it holds; revocations made
  meanwhile are applied when the stream is back (by replay), not before.
* Start: the first stream asks for authsvc's whole log (``after="0-0"``),
  which keeps every event as long as a token can live, so revocations made
  before the sidecar started are refused too, without a call per token.
* Gaps: when authsvc says events after our position may be missing
  (``gap=true``: its log cannot vouch for that position, e.g. one from another
  deployment or from before a database restore), every token issued before then (``iat`` earlier
  than now + ``gap_margin``) is checked online with Authenticate, cached
  ``online_cache_ttl`` seconds, until the retention has passed and every such
  token has expired. A token minted later needs no check: the stream covers
  it. Online checks follow ``fail_open`` (below).
* Event kinds: each event has a ``kind``. ``SESSION_REVOKED`` and
  ``CLAIMS_CHANGED`` go into the deny set as above. An event of any other kind
  (one added by a server newer than this sidecar, or ``UNSPECIFIED``) is never
  skipped: it is treated exactly like a gap, from the moment it arrives (every
  token issued before then is checked online until it has expired), since it
  says that some tokens no longer stand and the sidecar cannot tell which. A
  newer server cannot make an older sidecar fail open. Each such kind is logged
  once (``authsvc.sidecar.revocation_kind_unknown``, with the kind's number and
  nothing else). So is a known kind that lacks what it needs (a session id, a
  claims version), which is treated the same way.

Revocation: ``mode="online"``
-----------------------------
No stream: after the local verification, every token is checked with
Authenticate, and the answer (a session, or a refusal) is cached
``online_cache_ttl`` seconds, so a revocation reaches the sidecar within that
time. Concurrent checks of one token share one call. ``api_key`` is not needed.

Failure behaviour: ``fail_open``
--------------------------------
When an online check (online mode, or a gap in watch mode) cannot get an answer
from authsvc (UNAVAILABLE, deadline of ``call_timeout`` exceeded, or authsvc
answering anything but a token verdict):

* ``fail_open=False`` (default): the call is refused with UNAVAILABLE /
  BACKEND_UNAVAILABLE; the client may retry. Nothing is cached, so the first
  check after authsvc is back succeeds.
* ``fail_open=True``: the locally verified token is accepted (signature,
  expiry, deny set all passed), and that decision is cached
  ``online_cache_ttl`` seconds, so an outage does not cost a failing call per
  request. Revocations of the outage are not seen until it ends.

Startup: :meth:`Sidecar.start` fetches the JWKS (retrying until
``startup_timeout``) and, in watch mode, waits for the stream's first response;
it raises :class:`~authsvc_client.errors.AuthsvcError` (UNAVAILABLE /
BACKEND_UNAVAILABLE when authsvc cannot be reached in time; the stream's own
error when the API key is refused). Keys are refreshed every
``jwks_refresh_interval`` seconds and when a token names an unknown ``kid``, at
most once per ``jwks_refresh_floor`` seconds (tokens with unknown kids within
the floor are refused TOKEN_INVALID, so made-up kids cannot flood authsvc);
keys retired by a rotation stay published, so older tokens keep verifying.

Channel: given a target string, the sidecar opens (and closes) an insecure
``grpc.aio`` channel with short reconnect backoff for GetJwks and
Authenticate, and a fresh connection for each revocation stream, so that a
stream found silent is not reopened on the same dead connection. For TLS or
other options pass a ``grpc.aio.Channel`` created on the loop that runs the
sidecar (it is not closed by :meth:`Sidecar.close`); the stream then reopens on
that channel, so give it keepalive (``grpc.keepalive_time_ms``) to let gRPC
notice a dead connection itself.

Threads: all state is written on the sidecar's event loop only; the hot path
reads it from any thread (dict lookups and attribute reads, which are atomic),
and caches are pruned by replacing a dict, never by deleting from one that
another thread may be reading.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from authsvc_client._jwks import KeySet
from authsvc_client._revocations import DenySet, StreamCall, Watcher
from authsvc_client._tokens import Expired, Invalid, UnknownKid, Verified, verify
from authsvc_client.errors import DOMAIN, AuthsvcError, error_class, from_rpc_error
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc, resources_pb2

__all__ = [
    "AuthInterceptor",
    "Sidecar",
    "SyncAuthInterceptor",
    "current_session",
    "current_token",
]

log = logging.getLogger("authsvc_client.sidecar")

SessionInfo = resources_pb2.SessionInfo
Mode = Literal["watch", "online"]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_V = TypeVar("_V")

_session: contextvars.ContextVar[SessionInfo | None] = contextvars.ContextVar(
    "authsvc_session", default=None
)
_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("authsvc_token", default=None)

_HOUSEKEEPING_INTERVAL = 5.0
#: Seconds close() gives each background task to end once cancelled.
_CLOSE_TIMEOUT = 5.0
# Channel options of a channel the sidecar opens: come back quickly after an
# authsvc outage (gRPC's defaults back off up to two minutes).
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def current_session() -> SessionInfo | None:
    """The caller of the RPC being served, as the interceptor resolved it."""
    return _session.get()


def current_token() -> str | None:
    """The caller's access token (without "Bearer "), to forward on their behalf."""
    return _token.get()


def _refusal(reason: str, message: str) -> AuthsvcError:
    # The typed class of the reason (SessionRevoked, TokenStale ...), as
    # from_rpc_error would build it from the status sent to the caller.
    return error_class(reason)(grpc.StatusCode.UNAUTHENTICATED, reason, message, {}, [])


def _unavailable(message: str) -> AuthsvcError:
    reason = "BACKEND_UNAVAILABLE"
    return error_class(reason)(grpc.StatusCode.UNAVAILABLE, reason, message, {}, [])


_MESSAGES = {
    "SESSION_REVOKED": "the session was signed out or revoked",
    "TOKEN_STALE": "the token's claims changed; refresh it",
}


def to_status(error: AuthsvcError) -> grpc.Status:
    """The status a refusal travels with: one ``ErrorInfo`` in domain "authsvc"."""
    code: int = error.code.value[0]
    status = status_pb2.Status(code=code, message=error.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
    result: grpc.Status = rpc_status.to_status(status)
    return result


@dataclass(frozen=True, slots=True)
class _Checked:
    """An online check's outcome, cached until ``until`` (monotonic)."""

    until: float
    session: SessionInfo | None
    error: AuthsvcError | None


class Sidecar:
    """Verifies authsvc access tokens locally and keeps up with revocations.

    Args:
        target: authsvc's address ("host:port"), or a ``grpc.aio.Channel`` to it
            (yours to close; made on the loop that runs the sidecar).
        api_key: an authsvc API key, sent as ``x-api-key`` on WatchRevocations;
            required in watch mode.
        mode: "watch" (revocations pushed by authsvc) or "online" (Authenticate
            per token, cached ``online_cache_ttl`` seconds).
        issuer: the ``iss`` authsvc signs with (AUTHSVC_ISSUER).
        audience: the ``aud`` authsvc signs with (AUTHSVC_AUDIENCE).
        jwks_refresh_floor: minimum seconds between JWKS fetches caused by an
            unknown ``kid``.
        jwks_refresh_interval: seconds between periodic JWKS fetches.
        online_cache_ttl: seconds an online check's answer is reused.
        fail_open: accept locally verified tokens when an online check cannot
            reach authsvc (see the module docstring).
        reconnect_backoff: first delay before reopening the revocation stream.
        max_reconnect_backoff: the longest such delay.
        heartbeat_timeout: seconds without a response after which the stream is
            taken for dead (three of authsvc's default heartbeat intervals).
        gap_margin: after a gap, tokens issued before now + this are checked
            online (covers clock skew and whole-second ``iat``).
        clock_skew: seconds an ``iat`` may be in the future.
        call_timeout: deadline of GetJwks and Authenticate calls.
        cache_size: most verified tokens (and online answers) kept.
        startup_timeout: how long :meth:`start` may take.
        channel_options: extra options of the channel opened for ``target``.
        metrics_registry: a ``prometheus_client.CollectorRegistry`` of the host
            service, on which the sidecar registers its counters (tokens
            accepted, refused by reason, deny-set size, stream reconnects,
            JWKS fetches). None (the default): nothing is counted, and
            prometheus-client is not imported (``authsvc-client[metrics]``
            installs it).
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        api_key: str | None = None,
        mode: Mode = "watch",
        issuer: str = "authsvc",
        audience: str = "authsvc",
        jwks_refresh_floor: float = 5.0,
        jwks_refresh_interval: float = 300.0,
        online_cache_ttl: float = 2.0,
        fail_open: bool = False,
        reconnect_backoff: float = 0.5,
        max_reconnect_backoff: float = 30.0,
        heartbeat_timeout: float = 15.0,
        gap_margin: float = 5.0,
        clock_skew: float = 60.0,
        call_timeout: float = 2.0,
        cache_size: int = 100_000,
        startup_timeout: float = 10.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        metrics_registry: Any = None,
    ) -> None:
        if mode not in ("watch", "online"):
            raise ValueError("mode must be 'watch' or 'online'")
        if mode == "watch" and not api_key:
            raise ValueError("watch mode needs an authsvc API key (api_key=)")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._target = target
        self._api_key = api_key or ""
        self.mode: Mode = mode
        self._issuer = issuer
        self._audience = audience
        self._jwks_floor = jwks_refresh_floor
        self._jwks_interval = jwks_refresh_interval
        self._online_ttl = online_cache_ttl
        self._fail_open = fail_open
        self._backoff = reconnect_backoff
        self._max_backoff = max_reconnect_backoff
        self._heartbeat_timeout = heartbeat_timeout
        self._gap_margin = gap_margin
        self._clock_skew = clock_skew
        self._call_timeout = call_timeout
        self._cache_size = cache_size
        self._startup_timeout = startup_timeout
        self._channel_options = (*_CHANNEL_OPTIONS, *channel_options)

        # Written on the sidecar's loop only; read from any thread (see _lookup).
        self._tokens: dict[str, Verified] = {}
        self._checked: dict[str, _Checked] = {}
        self._deny = DenySet()
        self._watcher: Watcher | None = None
        self._online = mode == "online"

        self._channel: grpc.aio.Channel | None = None
        self._owns_channel = False
        self._stub: auth_pb2_grpc.AuthServiceAsyncStub | None = None
        self._keys: KeySet | None = None
        self._asking: dict[str, asyncio.Task[_Checked]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._metrics = (
            _SidecarMetrics(self, metrics_registry) if metrics_registry is not None else None
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Fetches the JWKS and, in watch mode, opens the revocation stream.

        Raises:
            AuthsvcError: UNAVAILABLE / BACKEND_UNAVAILABLE when authsvc cannot
                be reached within ``startup_timeout``; the stream's error when
                WatchRevocations is refused (e.g. API_KEY_INVALID).
        """
        if self._loop is not None:
            raise RuntimeError("the sidecar is already started")
        self._loop = asyncio.get_running_loop()
        if isinstance(self._target, str):
            self._channel = grpc.aio.insecure_channel(
                self._target, options=list(self._channel_options)
            )
            self._owns_channel = True
        else:
            self._channel = self._target
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._keys = KeySet(self._fetch_jwks, refresh_floor=self._jwks_floor)
        try:
            async with asyncio.timeout(self._startup_timeout):
                await self._first_keys()
                self._tasks = [
                    asyncio.create_task(self._every(self._jwks_interval, self._keys.refresh)),
                    asyncio.create_task(self._every(_HOUSEKEEPING_INTERVAL, self._prune)),
                ]
                if not self._online:
                    self._watcher = Watcher(
                        self._open_stream,
                        self._deny,
                        heartbeat_timeout=self._heartbeat_timeout,
                        backoff=self._backoff,
                        max_backoff=self._max_backoff,
                        gap_margin=self._gap_margin,
                    )
                    self._tasks.append(asyncio.create_task(self._watcher.run()))
                    await self._watcher.wait_ready()
        except TimeoutError:
            await self.close()
            raise _unavailable("authsvc did not answer within the startup timeout") from None
        except BaseException:
            await self.close()
            raise

    async def _first_keys(self) -> None:
        assert self._keys is not None
        delay = 0.1
        while True:
            try:
                await self._keys.refresh("start")
                return
            except grpc.aio.AioRpcError as error:
                log.warning("authsvc.sidecar.jwks_fetch_failed", extra={"code": error.code().name})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        """Stops the background tasks and closes the channel it opened.

        Each task gets ``_CLOSE_TIMEOUT`` seconds to end once cancelled; one
        that does not is abandoned with a warning, so a host's shutdown never
        waits on the sidecar forever.
        """
        tasks, self._tasks = self._tasks, []
        if self._watcher is not None:
            self._watcher.hang_up()
        for task in tasks:
            task.cancel()
        for task in tasks:
            # asyncio.wait, not wait_for: a stuck task is left behind, not
            # cancelled again and waited for. Raises CancelledError if close()
            # itself is cancelled: that must propagate.
            done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT)
            if not done:
                log.warning("authsvc.sidecar.task_stuck", extra={"task": task.get_name()})
                continue
            if not task.cancelled() and task.exception() is not None:
                log.error("authsvc.sidecar.task_failed", exc_info=task.exception())
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
        self._watcher = None
        self._loop = None

    def start_in_thread(self) -> None:
        """Starts the sidecar on an event loop of its own, in a daemon thread.

        For classic threaded gRPC servers; blocks until :meth:`start` is done.

        Raises:
            AuthsvcError: as :meth:`start`; the thread is stopped again then.
        """
        if self._thread is not None:
            raise RuntimeError("the sidecar is already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="authsvc-sidecar", daemon=True)
        thread.start()
        self._thread = thread
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        except BaseException:
            self._stop_thread(loop, thread)
            raise

    def close_sync(self, timeout: float = 10.0) -> None:
        """Stops what :meth:`start_in_thread` started."""
        thread = self._thread
        loop = self._loop
        if thread is None:
            return
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)
            finally:
                self._stop_thread(loop, thread)

    def _stop_thread(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._thread = None

    @property
    def watching(self) -> bool:
        """True while the revocation stream is open and answering (watch mode)."""
        return self._watcher is not None and self._watcher.connected

    # ------------------------------------------------------------------ checking

    async def authenticate(self, token: str) -> SessionInfo:
        """Resolves an access token, as the interceptors do.

        Returns:
            The caller's SessionInfo (a copy of its own).

        Raises:
            AuthsvcError: UNAUTHENTICATED with the refusal's reason, or
                UNAVAILABLE / BACKEND_UNAVAILABLE (see the module docstring).
        """
        try:
            session = self._lookup(token)
            if session is None:
                session = await self._resolve(token)
        except AuthsvcError as error:
            self._count(error)
            raise
        self._count(None)
        return session

    def authenticate_sync(self, token: str, timeout: float | None = None) -> SessionInfo:
        """:meth:`authenticate` from a thread other than the sidecar's loop.

        A cached token is answered on the calling thread; anything else runs on
        the sidecar's loop, waiting at most ``timeout`` seconds (default: room
        for a key fetch and an online check, ``2 * call_timeout + 1``).

        Raises:
            AuthsvcError: as :meth:`authenticate`; UNAVAILABLE /
                BACKEND_UNAVAILABLE when the loop does not answer in time.
        """
        try:
            session = self._lookup_or_resolve_sync(token, timeout)
        except AuthsvcError as error:
            self._count(error)
            raise
        self._count(None)
        return session

    def _count(self, refusal: AuthsvcError | None) -> None:
        """One check's outcome, on the host's registry (if it gave one)."""
        if self._metrics is None:
            return
        if refusal is None:
            self._metrics.verified.inc()
        else:
            self._metrics.refused(refusal.reason)

    def _lookup_or_resolve_sync(self, token: str, timeout: float | None) -> SessionInfo:
        session = self._lookup(token)
        if session is not None:
            return session
        loop = self._loop
        if loop is None:
            raise RuntimeError("the sidecar is not started")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("authenticate_sync() on the sidecar's loop; await authenticate()")
        future = asyncio.run_coroutine_threadsafe(self._resolve(token), loop)
        try:
            return future.result(2 * self._call_timeout + 1.0 if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _unavailable("the sidecar did not answer in time") from None

    def _lookup(self, token: str) -> SessionInfo | None:
        """The hot path: a cached token's answer, or None when the loop must work.

        Runs on any thread: it only reads (dict lookups, attribute reads).

        Raises:
            AuthsvcError: the token is expired, revoked or stale, or an online
                check refused it.
        """
        verified = self._tokens.get(token)
        if verified is None:
            return None
        self._check(verified)
        if not self._needs_online(verified):
            return _copy(verified.session)
        checked = self._checked.get(token)
        if checked is None or checked.until <= time.monotonic():
            return None
        if checked.error is not None:
            raise checked.error
        assert checked.session is not None
        return _copy(checked.session)

    async def _resolve(self, token: str) -> SessionInfo:
        """The slow path, on the sidecar's loop."""
        session = self._lookup(token)
        if session is not None:
            return session
        verified = self._tokens.get(token)
        if verified is None:
            verified = await self._verify(token)
            self._remember(token, verified)
            self._check(verified)
        if not self._needs_online(verified):
            return _copy(verified.session)
        checked = self._checked.get(token)
        if checked is None or checked.until <= time.monotonic():
            checked = await self._ask(token, verified)
        if checked.error is not None:
            raise checked.error
        assert checked.session is not None
        return _copy(checked.session)

    def _check(self, verified: Verified) -> None:
        if time.time() >= verified.expires_at:
            raise _refusal("TOKEN_EXPIRED", "the access token has expired")
        reason = self._deny.check(verified.session_id, verified.version)
        if reason is not None:
            raise _refusal(reason, _MESSAGES[reason])

    def _needs_online(self, verified: Verified) -> bool:
        if self._online:
            return True
        watcher = self._watcher
        return watcher is not None and watcher.needs_online(verified.issued_at)

    async def _verify(self, token: str) -> Verified:
        # Inline on the loop: one Ed25519 verification (~0.2 ms) costs less than
        # a hop to a thread, and each token is verified once, then cached.
        keys = self._keys
        if keys is None:
            raise RuntimeError("the sidecar is not started")
        try:
            try:
                return self._decode(token, keys)
            except UnknownKid as unknown:
                known = await keys.refresh_for(unknown.kid)
                if known is None:
                    raise _unavailable("authsvc's keys could not be fetched") from None
                if not known:
                    raise _refusal("TOKEN_INVALID", "the token names an unknown key") from None
                return self._decode(token, keys)
        except UnknownKid:
            raise _refusal("TOKEN_INVALID", "the token names an unknown key") from None
        except Invalid:
            raise _refusal("TOKEN_INVALID", "the access token is not valid") from None
        except Expired:
            raise _refusal("TOKEN_EXPIRED", "the access token has expired") from None

    def _decode(self, token: str, keys: KeySet) -> Verified:
        return verify(
            token,
            keys.keys,
            issuer=self._issuer,
            audience=self._audience,
            clock_skew=self._clock_skew,
        )

    def _remember(self, token: str, verified: Verified) -> None:
        if len(self._tokens) >= self._cache_size:
            self._tokens = _evicted(
                self._tokens, self._cache_size, lambda v: v.expires_at, time.time()
            )
        self._tokens[token] = verified

    async def _ask(self, token: str, verified: Verified) -> _Checked:
        """One Authenticate per token at a time; concurrent askers share it."""
        task = self._asking.get(token)
        if task is None:
            # A task of its own, shielded: the caller whose RPC is cancelled
            # must not cancel the check the others wait on.
            task = asyncio.create_task(self._authenticate_online(token, verified))
            self._asking[token] = task

            def done(finished: asyncio.Task[_Checked]) -> None:
                if self._asking.get(token) is finished:
                    del self._asking[token]
                if not finished.cancelled():
                    finished.exception()  # retrieved, even if every waiter left

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _authenticate_online(self, token: str, verified: Verified) -> _Checked:
        stub = self._stub
        if stub is None:
            raise RuntimeError("the sidecar is not started")
        try:
            response = await stub.Authenticate(
                auth_pb2.AuthenticateRequest(access_token=token), timeout=self._call_timeout
            )
            checked = _Checked(time.monotonic() + self._online_ttl, response.session, None)
        except grpc.aio.AioRpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if error.code == grpc.StatusCode.UNAUTHENTICATED and error.reason:
                if error.reason == "SESSION_REVOKED":
                    self._deny.revoke(verified.session_id, self._retention(verified))
                refusal = _refusal(error.reason, error.message)
                checked = _Checked(time.monotonic() + self._online_ttl, None, refusal)
            elif self._fail_open:
                log.warning(
                    "authsvc.sidecar.online_check_failed_open", extra={"code": error.code.name}
                )
                checked = _Checked(time.monotonic() + self._online_ttl, verified.session, None)
            else:
                log.warning("authsvc.sidecar.online_check_failed", extra={"code": error.code.name})
                raise _unavailable("authsvc cannot be reached to check the token") from None
        if len(self._checked) >= self._cache_size:
            self._checked = _evicted(
                self._checked, self._cache_size, lambda c: c.until, time.monotonic()
            )
        self._checked[token] = checked
        return checked

    def _retention(self, verified: Verified) -> float:
        if self._watcher is not None:
            return self._watcher.retention
        return max(0.0, verified.expires_at - time.time()) + 60.0

    # ------------------------------------------------------------------ background

    @contextlib.asynccontextmanager
    async def _open_stream(self, after: str) -> AsyncIterator[StreamCall]:
        # A stream that went silent may sit on a dead connection the channel
        # cannot notice (nothing is sent on it): each stream of a sidecar that
        # owns its channel gets a fresh connection, closed with the stream. A
        # local subchannel pool, or gRPC would hand it the old connection again.
        own = isinstance(self._target, str)
        channel = (
            grpc.aio.insecure_channel(
                self._target,
                options=[*self._channel_options, ("grpc.use_local_subchannel_pool", 1)],
            )
            if isinstance(self._target, str)
            else self._target
        )
        try:
            call = auth_pb2_grpc.AuthServiceStub(channel).WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after=after),
                metadata=(("x-api-key", self._api_key),),
            )
            try:
                yield cast(StreamCall, call)
            finally:
                call.cancel()
        finally:
            if own:
                await channel.close()

    async def _fetch_jwks(self) -> Any:
        assert self._stub is not None
        return await self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=self._call_timeout)

    async def _prune(self) -> None:
        now, mono = time.time(), time.monotonic()
        if any(v.expires_at <= now for v in self._tokens.values()):
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
        if any(c.until <= mono for c in self._checked.values()):
            self._checked = {k: c for k, c in self._checked.items() if c.until > mono}
        self._deny.prune()

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("authsvc.sidecar.background_failed", exc_info=True)


def _copy(session: SessionInfo) -> SessionInfo:
    # Each call gets its own message: a handler changing it must not change
    # what the next call with the same token sees (0.4 us).
    copy = SessionInfo()
    copy.CopyFrom(session)
    return copy


def _evicted(
    entries: dict[str, _V], size: int, expiry: Callable[[_V], float], now: float
) -> dict[str, _V]:
    """A smaller copy of a full cache: without the expired, else without the oldest quarter.

    A new dict rather than deletions: other threads may be reading the old one.
    """
    kept = {k: v for k, v in entries.items() if expiry(v) > now}
    if len(kept) >= size:
        kept = dict(itertools.islice(kept.items(), len(kept) - size * 3 // 4, None))
    return kept


# ---------------------------------------------------------------------- interceptors


def _bearer(metadata: Iterable[Any] | None) -> str | None:
    """The token of ``authorization: Bearer <token>``; None without the header.

    Raises:
        AuthsvcError: TOKEN_INVALID when the header is not a bearer token.
    """
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise _refusal("TOKEN_INVALID", "authorization must be 'Bearer <access token>'")
            return token
    return None


class _Gate:
    """What both interceptors share: which methods are public, wrapped handlers."""

    def __init__(self, sidecar: Sidecar, public: Iterable[str]) -> None:
        self._sidecar = sidecar
        self._public = frozenset(public)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def _cached(self, method: str, handler: Handler) -> Handler | None:
        # Keyed by method and checked by identity: continuation() is still
        # called on every call, so interceptors after this one keep running.
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        return None

    def _store(self, method: str, handler: Handler, wrapped: Handler) -> Handler:
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _rewrap(handler: Handler, **behaviour: Any) -> Handler:
    """A handler of the same kind and (de)serializers with another behaviour."""
    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    ((kind, function),) = behaviour.items()
    new: Handler = kinds[kind](
        function,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return new


class AuthInterceptor(_Gate, grpc.aio.ServerInterceptor):
    """Authenticates every call of a ``grpc.aio`` server with the sidecar.

    Args:
        sidecar: a started :class:`Sidecar` on the server's event loop.
        public: full method names ("/pkg.Service/Method") callable without a
            token (a token sent anyway must be valid).
    """

    def __init__(self, sidecar: Sidecar, *, public: Iterable[str] = ()) -> None:
        super().__init__(sidecar, public)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        wrapped = self._cached(method, handler)
        if wrapped is None:
            wrapped = self._store(method, handler, self._wrap(method in self._public, handler))
        return wrapped

    async def _admit(self, public: bool, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        sidecar = self._sidecar
        try:
            token = _bearer(context.invocation_metadata())
            if token is None:
                if not public:
                    raise _refusal("NOT_AUTHENTICATED", "this method needs an access token")
                session = None
            else:
                session = sidecar._lookup(token)
                if session is None:
                    session = await sidecar._resolve(token)
        except AuthsvcError as error:
            status = to_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
        _session.set(session)
        _token.set(token)

    def _wrap(self, public: bool, handler: Handler) -> Handler:
        admit = self._admit
        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            async def serve_unary_unary(request: Any, context: Any) -> Any:
                await admit(public, context)
                return await _settle(unary_unary(request, context))

            return _rewrap(handler, unary_unary=serve_unary_unary)
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def serve_stream_unary(requests: Any, context: Any) -> Any:
                await admit(public, context)
                return await _settle(stream_unary(requests, context))

            return _rewrap(handler, stream_unary=serve_stream_unary)
        if handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            async def serve_unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await admit(public, context)
                async for response in _responses(unary_stream(request, context)):
                    yield response

            return _rewrap(handler, unary_stream=serve_unary_stream)
        if handler.stream_stream is not None:
            stream_stream = handler.stream_stream

            async def serve_stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                await admit(public, context)
                async for response in _responses(stream_stream(requests, context)):
                    yield response

            return _rewrap(handler, stream_stream=serve_stream_stream)
        return handler


async def _settle(result: Any) -> Any:
    """A unary handler's response, whether it was a coroutine or a plain value."""
    if inspect.isawaitable(result):
        return await result
    return result


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses: an async or plain iterator, or none
    (a coroutine that wrote them with ``context.write``)."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for response in result:
            yield response


class SyncAuthInterceptor(_Gate, grpc.ServerInterceptor):
    """Authenticates every call of a classic threaded ``grpc`` server.

    Args:
        sidecar: a :class:`Sidecar` started with :meth:`Sidecar.start_in_thread`
            (or on an event loop running in another thread).
        public: full method names ("/pkg.Service/Method") callable without a
            token (a token sent anyway must be valid).
    """

    def __init__(self, sidecar: Sidecar, *, public: Iterable[str] = ()) -> None:
        super().__init__(sidecar, public)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        wrapped = self._cached(method, handler)
        if wrapped is None:
            wrapped = self._store(method, handler, self._wrap(method in self._public, handler))
        return wrapped

    def _admit(self, public: bool, context: grpc.ServicerContext) -> None:
        sidecar = self._sidecar
        try:
            token = _bearer(context.invocation_metadata())
            if token is None:
                if not public:
                    raise _refusal("NOT_AUTHENTICATED", "this method needs an access token")
                session = None
            else:
                session = sidecar.authenticate_sync(token)
        except AuthsvcError as error:
            context.abort_with_status(to_status(error))
        # Worker threads serve one call after another: set both, always.
        _session.set(session)
        _token.set(token)

    def _wrap(self, public: bool, handler: Handler) -> Handler:
        admit = self._admit
        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            def serve_unary_unary(request: Any, context: Any) -> Any:
                admit(public, context)
                try:
                    return unary_unary(request, context)
                finally:
                    _clear()

            return _rewrap(handler, unary_unary=serve_unary_unary)
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            def serve_stream_unary(requests: Any, context: Any) -> Any:
                admit(public, context)
                try:
                    return stream_unary(requests, context)
                finally:
                    _clear()

            return _rewrap(handler, stream_unary=serve_stream_unary)
        if handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            def serve_unary_stream(request: Any, context: Any) -> Iterator[Any]:
                admit(public, context)
                try:
                    yield from unary_stream(request, context)
                finally:
                    _clear()

            return _rewrap(handler, unary_stream=serve_unary_stream)
        if handler.stream_stream is not None:
            stream_stream = handler.stream_stream

            def serve_stream_stream(requests: Any, context: Any) -> Iterator[Any]:
                admit(public, context)
                try:
                    yield from stream_stream(requests, context)
                finally:
                    _clear()

            return _rewrap(handler, stream_stream=serve_stream_stream)
        return handler


def _clear() -> None:
    _session.set(None)
    _token.set(None)


class _SidecarMetrics:
    """The sidecar's metrics on the host's registry (prometheus-client is
    imported here, only when a registry was passed)."""

    def __init__(self, sidecar: Sidecar, registry: Any) -> None:
        from prometheus_client import Counter

        self.verified = Counter(
            "authsvc_sidecar_verified",
            "Access tokens the sidecar accepted (one per check).",
            registry=registry,
        )
        self._refused = Counter(
            "authsvc_sidecar_refused",
            "Access tokens the sidecar refused, by ErrorInfo reason.",
            ("reason",),
            registry=registry,
        )
        self._refused_by = {r: self._refused.labels(r) for r in _REFUSAL_REASONS}
        registry.register(_SidecarCollector(sidecar))

    def refused(self, reason: str) -> None:
        # Reasons are the ErrorReason names (a fixed set); anything else
        # counts as UNKNOWN so no label value comes from outside the set.
        child = self._refused_by.get(reason) or self._refused_by["UNKNOWN"]
        child.inc()


#: The reasons the sidecar refuses with (its own, and an online check's).
_REFUSAL_REASONS = (
    "TOKEN_INVALID",
    "TOKEN_EXPIRED",
    "SESSION_REVOKED",
    "SESSION_EXPIRED",
    "TOKEN_STALE",
    "NOT_AUTHENTICATED",
    "BACKEND_UNAVAILABLE",
    "UNKNOWN",
)


class _SidecarCollector:
    """Values the sidecar keeps anyway, read at a scrape."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sidecar = self._sidecar
        deny = sidecar._deny
        yield GaugeMetricFamily(
            "authsvc_sidecar_deny_set_size",
            "Revoked sessions and stale claims versions the sidecar holds.",
            value=len(deny.revoked) + len(deny.stale),
        )
        watcher = sidecar._watcher
        yield CounterMetricFamily(
            "authsvc_sidecar_stream_reconnects",
            "Times the WatchRevocations stream was opened again after the first.",
            value=max(0, watcher.connects - 1) if watcher is not None else 0,
        )
        fetches = CounterMetricFamily(
            "authsvc_sidecar_jwks_fetches",
            "GetJwks calls, by cause: start, interval (periodic), unknown_kid "
            "(a token named a key the sidecar did not hold).",
            labels=("cause",),
        )
        keys = sidecar._keys
        counts = keys.fetches if keys is not None else {}
        for cause in ("start", "interval", "unknown_kid"):
            fetches.add_metric((cause,), counts.get(cause, 0))
        yield fetches
