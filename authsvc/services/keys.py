"""Signing keys: created on first start, rotated on demand, sealed at rest.

Every replica keeps the key set in memory and reloads it from the database
periodically and whenever a token names a key it does not know (at most once a
second), so a key rotated by ``authsvc keys rotate`` is picked up without a
restart. A retired key stays in the JWKS, and keeps verifying, until every
token it signed has expired.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from authsvc.domain.models import SigningKeyRecord
from authsvc.domain.ports import Clock, Database
from authsvc.security.jwt_tokens import SigningKey
from authsvc.security.secrets import Secrets

_FORCED_RELOAD_FLOOR = 1.0


class KeyStore:
    def __init__(
        self,
        db: Database,
        secrets: Secrets,
        clock: Clock,
        *,
        access_ttl: timedelta,
        retire_margin: timedelta = timedelta(minutes=2),
    ) -> None:
        self._db = db
        self._secrets = secrets
        self._clock = clock
        self._access_ttl = access_ttl
        # Tokens carry whole-second timestamps and other servers' clocks
        # drift: retired keys stay this much longer than a token lives.
        self._retire_margin = retire_margin
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._last_forced = 0.0

    @property
    def active(self) -> SigningKey:
        if self._active is None:
            raise RuntimeError("signing keys not loaded")
        return self._active

    @property
    def verification_keys(self) -> dict[str, SigningKey]:
        return self._keys

    def jwks(self) -> list[dict[str, str]]:
        return [key.jwk() for key in self._keys.values()]

    async def load(self, *, create: bool = False) -> None:
        """Loads the key set; with ``create``, makes the first key if there is none."""
        async with self._db.reader() as tx:
            records = await tx.keys.all()
        if create and not any(r.retired_at is None for r in records):
            await self.rotate()
            return
        self._install(records)

    async def reload_for(self, kid: str) -> bool:
        """Reloads after a token named an unknown key; True if it is known now."""
        now = time.monotonic()
        if now - self._last_forced >= _FORCED_RELOAD_FLOOR:
            self._last_forced = now
            await self.load()
        return kid in self._keys

    async def rotate(self) -> str:
        """Makes a new active key, retires the others; returns the new kid."""
        now = self._clock.now()
        private = Ed25519PrivateKey.generate()
        kid = uuid.uuid4().hex
        raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        record = SigningKeyRecord(
            kid=kid,
            created_at=now,
            retired_at=None,
            private_key_sealed=self._secrets.seal(raw_private, kid.encode()),
            public_key=private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )
        async with self._db.transaction() as tx:
            await tx.keys.add(record)
            await tx.keys.retire_others(kid, now)
            await tx.keys.delete_retired_before(now - self._access_ttl - self._retire_margin)
            records = await tx.keys.all()
        self._install(records)
        return kid

    def _install(self, records: list[SigningKeyRecord]) -> None:
        horizon = self._clock.now() - self._access_ttl - self._retire_margin
        keys: dict[str, SigningKey] = {}
        active: SigningKey | None = None
        for record in records:  # newest first
            if record.retired_at is not None and record.retired_at < horizon:
                continue
            private = None
            if record.retired_at is None:
                raw = self._secrets.unseal(record.private_key_sealed, record.kid.encode())
                private = Ed25519PrivateKey.from_private_bytes(raw)
            key = SigningKey(
                kid=record.kid,
                private=private,
                public=Ed25519PublicKey.from_public_bytes(record.public_key),
                public_raw=record.public_key,
            )
            keys[record.kid] = key
            if active is None and private is not None:
                active = key
        self._keys = keys
        if active is not None:
            self._active = active
