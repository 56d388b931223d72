"""Opaque, tamper-evident page tokens (AIP-158).

A token is ``base64url(payload) "." base64url(HMAC-SHA256(key, payload)[:16])``.
The payload binds the list it belongs to and a fingerprint of the filters, so
a modified token, one from another list or another filter, or an expired one is
refused. A token is only a position: it grants nothing, and every page checks
the caller again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from authsvc.domain.models import Cursor
from authsvc.errors import InvalidPageToken
from authsvc.security.secrets import b64url, b64url_decode_canonical

_MAX_LENGTH = 1024

T = TypeVar("T")
_TAG = 16


def fingerprint(*parts: object) -> str:
    """A short stable digest of a list's filter values."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class PageTokens:
    def __init__(self, key: bytes, ttl: timedelta = timedelta(hours=24)) -> None:
        self._key = key
        self._ttl = ttl

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_TAG]

    def encode(self, kind: str, filters: str, cursor: Cursor, now: datetime) -> str:
        payload = json.dumps(
            {
                "k": kind,
                "f": filters,
                "t": cursor.created_at.isoformat(),
                "i": str(cursor.id),
                "e": int((now + self._ttl).timestamp()),
            },
            separators=(",", ":"),
        ).encode()
        return f"{b64url(payload)}.{b64url(self._tag(payload))}"

    def page(
        self,
        kind: str,
        filters: str,
        rows: list[T],
        size: int,
        now: datetime,
        cursor: Callable[[T], Cursor],
    ) -> tuple[list[T], str]:
        """A page of ``rows`` (read with a limit of ``size + 1``, so that one
        more row tells whether a next page exists) and that next page's token,
        "" on the last page."""
        items = rows[:size]
        if len(rows) <= size:
            return items, ""
        return items, self.encode(kind, filters, cursor(items[-1]), now)

    def decode(self, token: str, kind: str, filters: str, now: datetime) -> Cursor:
        """Raises: InvalidPageToken."""
        if len(token) > _MAX_LENGTH or token.count(".") != 1:
            raise InvalidPageToken()
        body, tag = token.split(".")
        payload = b64url_decode_canonical(body)
        mac = b64url_decode_canonical(tag)
        if payload is None or mac is None or not hmac.compare_digest(mac, self._tag(payload)):
            raise InvalidPageToken()
        try:
            data = json.loads(payload)
            cursor = Cursor(datetime.fromisoformat(data["t"]).astimezone(UTC), uuid.UUID(data["i"]))
            expires = int(data["e"])
            same_list = data["k"] == kind and data["f"] == filters
        except (ValueError, KeyError, TypeError):
            raise InvalidPageToken() from None
        if not same_list:
            raise InvalidPageToken("page token belongs to another list or other filters")
        if expires < now.timestamp():
            raise InvalidPageToken("page token expired")
        return cursor
