"""Invalidation events and their log positions."""

from __future__ import annotations

import re
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


@dataclass(frozen=True, slots=True)
class Replay:
    """What a log holds after a position, and where that leaves the reader."""

    events: list[Event]
    position: str
    gap: bool


def position_key(position: str) -> tuple[int, int]:
    """Orders positions ("<ms>-<seq>", as Redis stream ids).

    Raises: InvalidArgument.
    """
    match = _POSITION.fullmatch(position)
    if match is None:
        raise InvalidArgument.field("after", "not a position")
    return int(match[1]), int(match[2])
