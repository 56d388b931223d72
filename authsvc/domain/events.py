"""Invalidation events and their log positions."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace

from authsvc.errors import InvalidArgument

SESSION_REVOKED = "session"
"""Every token of the session ``key`` is revoked."""
CLAIMS_CHANGED = "claims"
"""The claims of session ``key`` changed; tokens below ``version`` are stale."""
USER_CHANGED = "user"
"""User ``key`` changed (role, email, memberships, deletion): drop cached views."""

_POSITION = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")  # ASCII digits only


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    key: str
    version: int = 0
    at: float = 0.0  # unix seconds, when published
    position: str = ""  # "<ms>-<seq>" in the log; empty before it is logged

    def at_position(self, position: str) -> Event:
        return replace(self, position=position)


def session_revoked(*session_ids: uuid.UUID | None) -> list[Event]:
    """Every token of these sessions is revoked."""
    now = time.time()
    return [Event(SESSION_REVOKED, str(s), at=now) for s in session_ids if s is not None]


def user_changed(*user_ids: uuid.UUID) -> list[Event]:
    now = time.time()
    return [Event(USER_CHANGED, str(u), at=now) for u in user_ids]


def claims_changed(
    user_ids: Iterable[uuid.UUID], bumped: Iterable[tuple[uuid.UUID, int]]
) -> list[Event]:
    """After ``bump_claims``: drop the users' cached views, and tell local
    verifiers which tokens of their sessions are stale."""
    now = time.time()
    return [
        *(Event(USER_CHANGED, str(u), at=now) for u in user_ids),
        *(Event(CLAIMS_CHANGED, str(s), version=v, at=now) for s, v in bumped),
    ]


@dataclass(frozen=True, slots=True)
class LogHead:
    """The newest position the log gave out, and since when (unix ms) it
    vouches for every event; 0: since before any session existed."""

    log_ms: int
    log_seq: int
    started_ms: int
    log_id: str = ""

    @property
    def position(self) -> tuple[int, int]:
        return (self.log_ms, self.log_seq)


@dataclass(frozen=True, slots=True)
class Replay:
    """What a log holds after a position, and where that leaves the reader."""

    events: list[Event]
    position: str
    gap: bool
    #: The log holds more after ``position``: read on from there.
    more: bool = False


def position_key(position: str) -> tuple[int, int]:
    """Orders positions ("<ms>-<seq>", as Redis stream ids).

    Raises: InvalidArgument.
    """
    match = _POSITION.fullmatch(position)
    if match is None:
        raise InvalidArgument.field("after", "not a position")
    return int(match[1]), int(match[2])
