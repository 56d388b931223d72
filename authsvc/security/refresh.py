"""Opaque refresh tokens.

A session's first refresh token is 256 random bits. Each successor is
HMAC-SHA256(server key, predecessor): as unpredictable as the first to anyone
without the server key, and it lets the server hand the *same* successor to a
client that repeats a refresh inside the reuse grace interval, although the
database holds nothing but SHA-256 hashes of tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from authsvc.security.secrets import b64url

PREFIX = "rt_"
MAX_LENGTH = 128


class RefreshTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def new(self) -> str:
        return PREFIX + b64url(secrets.token_bytes(32))

    def successor(self, token: str) -> str:
        return PREFIX + b64url(hmac.new(self._key, token.encode(), hashlib.sha256).digest())
