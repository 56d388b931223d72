"""The Authenticate hot path: access tokens already resolved, kept briefly.

A token seen before skips the signature check and the database read. That is
only safe while no revocation can be missed, so an entry is honoured only if

* it has not outlived its token, nor ``ttl`` seconds (a bound on how stale it
  can be if an event were ever lost),
* no invalidation event for its session or its user arrived after the entry
  was built (``mark`` is called on every such event, from this replica's own
  revocations synchronously, from other replicas' through the event bus),
* the event bus is healthy, i.e. is not possibly missing events right now, and
* it was resolved after the bus last resumed from a failure (``clear``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from authsvc.domain.principal import SessionInfo


@dataclass(frozen=True, slots=True)
class _Entry:
    info: SessionInfo
    built_at: float
    valid_until: float
    # The invalidation keys of info (str of its session and user ids), made
    # once here rather than on every hit.
    session_key: str
    user_key: str


class AuthCache:
    def __init__(self, *, max_entries: int, ttl: float) -> None:
        self._max = max_entries
        self._ttl = ttl
        self._entries: dict[bytes, _Entry] = {}
        # session id or user id -> monotonic time of its latest invalidation
        self._invalidated: dict[str, float] = {}
        # Entries resolved before this (monotonic) time are never stored.
        self._reset_at = -1.0

    def get(self, digest: bytes) -> SessionInfo | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        now = time.monotonic()
        inv = self._invalidated
        if (
            now >= entry.valid_until
            or inv.get(entry.session_key, -1.0) >= entry.built_at
            or inv.get(entry.user_key, -1.0) >= entry.built_at
        ):
            del self._entries[digest]
            return None
        return entry.info

    def put(self, digest: bytes, info: SessionInfo, built_at: float, token_ttl: float) -> None:
        """Stores a resolution that started (read the database) at ``built_at``."""
        if self._max == 0 or self._ttl == 0 or built_at <= self._reset_at:
            return
        if len(self._entries) >= self._max:
            # Drop the oldest insertion; dicts keep insertion order.
            del self._entries[next(iter(self._entries))]
        valid_until = built_at + min(self._ttl, token_ttl)
        self._entries[digest] = _Entry(
            info, built_at, valid_until, str(info.session_id), str(info.user_id)
        )

    def mark(self, key: str) -> None:
        """Invalidates every entry of a session id or user id built before now."""
        self._invalidated[key] = time.monotonic()

    def clear(self) -> None:
        """Forgets every entry, and refuses those still being resolved: the
        event follower resumed, and events may have been missed before."""
        self._reset_at = time.monotonic()
        self._entries.clear()

    def prune(self) -> None:
        """Forgets invalidations older than any entry can be."""
        horizon = time.monotonic() - self._ttl
        self._invalidated = {k: t for k, t in self._invalidated.items() if t >= horizon}
        now = time.monotonic()
        self._entries = {d: e for d, e in self._entries.items() if e.valid_until > now}
