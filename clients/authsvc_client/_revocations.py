"""The sidecar's deny set, fed by authsvc's WatchRevocations stream.

Private to :mod:`authsvc_client.sidecar`.

:class:`DenySet` holds what the stream said: revoked sessions, and sessions
whose tokens below a claims version are stale. :class:`Watcher` keeps one
stream open, reconnects with backoff, resumes after the last position (authsvc
replays what was missed) and notices a silent stream by its missing
heartbeats. It also tracks the *gap*: a window in which events may have been
lost, so tokens minted before it must be checked online.

Event kinds: ``REVOCATION_KIND_SESSION_REVOKED`` and
``REVOCATION_KIND_CLAIMS_CHANGED`` go into the deny set. Any other kind (one a
newer server added, or ``UNSPECIFIED``), and a known kind the deny set cannot
apply (no session id; a claims change without a version), is treated exactly
like a ``gap`` response: every token minted before now is checked online until
it has expired. An event always means that some tokens no longer stand, so
one this code cannot read must make it check more, never less: a newer server
must not make an older sidecar fail open. Each such kind is logged once (its
number only).

Threading: everything here is mutated on the sidecar's event loop only. The
hot path (possibly on other threads, for the sync interceptor) only reads:
dict lookups and attribute reads, which are atomic, and pruning replaces a
dict rather than deleting from it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import grpc

from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import auth_pb2

log = logging.getLogger("authsvc_client.sidecar")

REVOKED = "SESSION_REVOKED"
STALE = "TOKEN_STALE"
# Before the server has said how long to keep events: authsvc's default
# (access-token TTL 900 s + 60 s).
DEFAULT_RETENTION = 960.0
# Errors that retrying will not fix; at start they fail Sidecar.start().
_PERMANENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class DenySet:
    """Revoked sessions and stale claims versions, each kept ``retention`` seconds."""

    def __init__(self) -> None:
        # session id -> monotonic time at which the entry may go
        self.revoked: dict[str, float] = {}
        # session id -> (stale_below_version, monotonic time at which it may go)
        self.stale: dict[str, tuple[int, float]] = {}

    def check(self, session_id: str, version: int) -> str | None:
        """The reason to refuse a token of this session and version, or None."""
        if session_id in self.revoked:
            return REVOKED
        stale = self.stale.get(session_id)
        if stale is not None and version < stale[0]:
            return STALE
        return None

    def revoke(self, session_id: str, keep: float) -> None:
        until = time.monotonic() + keep
        self.revoked[session_id] = max(until, self.revoked.get(session_id, 0.0))

    def apply(self, revocations: Iterable[Any], keep: float) -> list[tuple[int, bool]]:
        """Adds the events of one response (``Revocation`` messages).

        Returns:
            ``(kind, known)`` of each event that could not be applied: a kind
            this code does not know (``known`` False), or a known kind without
            what it needs (``known`` True). The caller must treat each as a
            gap.
        """
        until = time.monotonic() + keep
        unapplied: list[tuple[int, bool]] = []
        for event in revocations:
            kind, session_id = int(event.kind), str(event.session_id)
            if kind == auth_pb2.REVOCATION_KIND_SESSION_REVOKED and session_id:
                self.revoked[session_id] = until
            elif kind == auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED and session_id:
                version = int(event.stale_below_version)
                if version <= 0:
                    unapplied.append((kind, True))
                    continue
                # Versions only grow; a later event covers an earlier one.
                before = self.stale.get(session_id, (0, 0.0))[0]
                self.stale[session_id] = (max(before, version), until)
            else:
                unapplied.append((kind, kind in _KNOWN_KINDS))
        return unapplied

    def prune(self) -> None:
        """Drops entries whose retention has passed (every token they covered expired)."""
        now = time.monotonic()
        if any(until <= now for until in self.revoked.values()):
            self.revoked = {k: u for k, u in self.revoked.items() if u > now}
        if any(until <= now for _, until in self.stale.values()):
            self.stale = {k: v for k, v in self.stale.items() if v[1] > now}


_KNOWN_KINDS = frozenset(
    {auth_pb2.REVOCATION_KIND_SESSION_REVOKED, auth_pb2.REVOCATION_KIND_CLAIMS_CHANGED}
)


class StreamCall(Protocol):
    """The part of a ``grpc.aio.UnaryStreamCall`` the watcher uses."""

    async def read(self) -> Any: ...


#: The position before every event: authsvc replays all it holds, and says
#: (``gap``) when its log cannot vouch for everything a live token may need.
FROM_THE_START = "0-0"

#: Opens WatchRevocations after a position; leaving the context ends the call
#: (and closes the connection, when it was opened for this stream alone).
OpenStream = Callable[[str], AbstractAsyncContextManager[StreamCall]]


class Watcher:
    """Runs WatchRevocations forever, feeding a :class:`DenySet`.

    Args:
        open_stream: starts WatchRevocations with the given ``after``.
        deny: where the events go.
        heartbeat_timeout: a stream silent this long is dead; reconnect.
        backoff: the first reconnect delay; it doubles up to ``max_backoff``
            and resets once a response arrives.
        max_backoff: the longest reconnect delay.
        gap_margin: seconds added to "now" when a gap starts, covering tokens
            minted by a server whose clock runs ahead, and ``iat`` being
            truncated to whole seconds.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        deny: DenySet,
        *,
        heartbeat_timeout: float,
        backoff: float,
        max_backoff: float,
        gap_margin: float,
    ) -> None:
        self._open = open_stream
        self._deny = deny
        self._heartbeat_timeout = heartbeat_timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._gap_margin = gap_margin
        #: The position after the last response applied; at first the start
        #: of the server's log, so that the first response replays every
        #: revocation that may still concern a live token.
        self.position = FROM_THE_START
        #: Seconds to keep an event, as the server last said.
        self.retention = DEFAULT_RETENTION
        #: True while a stream is open and has answered.
        self.connected = False
        #: Tokens with ``iat`` below this (epoch seconds) need an online check
        #: until ``gap_until`` (monotonic). Until the first response nothing is
        #: covered, so every token is checked online.
        self.gap_cutoff = math.inf
        self.gap_until = math.inf
        #: Streams opened so far (the first included).
        self.connects = 0
        #: Event kinds that could not be applied, logged once each:
        #: (kind, known) as ``DenySet.apply`` returns them.
        self.unapplied_kinds: set[tuple[int, bool]] = set()
        self._call: Any = None  # the open stream's call, while one is open
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A refusal nobody waits for any more is not an unretrieved error.
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def wait_ready(self) -> None:
        """Returns once the first response is in; raises a permanent failure.

        Raises:
            AuthsvcError: the stream was refused (API key unknown or not
                allowed, WatchRevocations not implemented).
        """
        await asyncio.shield(self._ready)

    def hang_up(self) -> None:
        """Cancels the open stream, if any, from outside the task reading it.

        Called before that task is cancelled: grpc then ends the pending read
        itself. A read cancelled only through its task has been seen, rarely,
        never returning, which held ``Sidecar.close()`` (and so the host's
        shutdown) forever.
        """
        call = self._call
        if call is not None:
            call.cancel()

    def needs_online(self, issued_at: int) -> bool:
        """Whether a token minted at ``issued_at`` may be covered by a lost event."""
        return issued_at < self.gap_cutoff and time.monotonic() < self.gap_until

    async def run(self) -> None:
        delay = self._backoff
        while True:
            try:
                after = self.position
                async with self._open(after) as call:
                    self._call = call
                    self.connects += 1
                    first = True
                    while True:
                        # In this task (no inner task to cancel and wait for,
                        # as wait_for would): see hang_up.
                        async with asyncio.timeout(self._heartbeat_timeout):
                            response = await call.read()
                        if response is grpc.aio.EOF:
                            raise ConnectionError("the revocation stream ended")
                        self._apply(response, first=first, after=after)
                        first = False
                        self.connected = True
                        delay = self._backoff
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                delay = self._failed(from_rpc_error(error), delay)
            except TimeoutError:
                log.warning("authsvc.sidecar.watch_silent", extra={"after": self.position})
            except Exception:
                log.warning("authsvc.sidecar.watch_failed", exc_info=True)
            finally:
                self._call = None
                self.connected = False
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 (jitter)
            delay = min(delay * 2, self._max_backoff)

    def _open_gap(self) -> None:
        """Tokens minted until now (plus the margin) are checked online until
        every one of them has expired (the retention, from now)."""
        cutoff = time.time() + self._gap_margin
        self.gap_cutoff = cutoff if math.isinf(self.gap_cutoff) else max(self.gap_cutoff, cutoff)
        until = time.monotonic() + self.retention
        self.gap_until = until if math.isinf(self.gap_until) else max(self.gap_until, until)

    def _failed(self, error: AuthsvcError, delay: float) -> float:
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            # The server does not take our position: replay its whole log;
            # the next first response says whether that covers everything.
            log.warning("authsvc.sidecar.watch_position_refused")
            self.position = FROM_THE_START
            return delay
        if error.code in _PERMANENT:
            log.error("authsvc.sidecar.watch_refused", extra={"reason": error.reason})
            if not self._ready.done():
                self._ready.set_exception(error)
            return self._max_backoff
        log.warning("authsvc.sidecar.watch_failed", extra={"code": error.code.name})
        return delay

    def _apply(self, response: Any, *, first: bool, after: str) -> None:
        if response.retention_seconds > 0:
            self.retention = float(response.retention_seconds)
        if first and response.gap:
            # Events before this stream may be lost: check tokens minted until
            # now online until every one of them has expired.
            self._open_gap()
            log.warning("authsvc.sidecar.watch_gap")
        elif first and self.gap_until == math.inf:
            # The first replay covered everything: no token needs a check.
            self.gap_cutoff = self.gap_until = -math.inf
        unapplied = self._deny.apply(response.revocations, self.retention)
        if unapplied:
            # An event we cannot read still says that some tokens no longer
            # stand, and we cannot tell which: the same as a lost event.
            self._open_gap()
            for kind, known in unapplied:
                if (kind, known) not in self.unapplied_kinds:
                    self.unapplied_kinds.add((kind, known))
                    name = (
                        "authsvc.sidecar.revocation_malformed"
                        if known
                        else "authsvc.sidecar.revocation_kind_unknown"
                    )
                    log.warning(name, extra={"kind": kind})
        if response.position:
            self.position = response.position
        if not self._ready.done():
            self._ready.set_result(None)
