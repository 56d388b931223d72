"""Access tokens: EdDSA (Ed25519) JWTs signed and verified with PyJWT."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from authsvc.domain.models import MAX_SLUG, OrgRole, Role
from authsvc.errors import TokenExpired, TokenInvalid
from authsvc.security.secrets import b64url, b64url_decode_canonical

ALGORITHM = "EdDSA"
# Room above the widest token ``issue`` can produce (below), for header fields
# a future signer may add; a token longer than that is refused unparsed.
LENGTH_MARGIN = 128
_WIDEST_INT = -(2**63)  # iat, exp and ver are 64-bit integers at most
_WIDEST_KID = "k" * 64  # kids are 32 hex characters; twice that, to be safe
_SIGNATURE_BYTES = 64  # Ed25519


def _b64_length(size: int) -> int:
    """Characters of unpadded base64url for ``size`` bytes."""
    return (4 * size + 2) // 3


def _json_b64_length(value: dict[str, Any]) -> int:
    # As PyJWT serializes header and payload (compact, ensure_ascii).
    return _b64_length(len(json.dumps(value, separators=(",", ":")).encode()))


def longest_token(issuer: str, audience: str) -> int:
    """The length of the longest access token ``AccessTokenCodec.issue`` can
    produce for this issuer and audience: every claim at its widest."""
    some_id = str(uuid.UUID(int=0))
    header = {"alg": ALGORITHM, "typ": "JWT", "kid": _WIDEST_KID}
    payload = {
        "iss": issuer,
        "aud": audience,
        "sub": some_id,
        "sid": some_id,
        "iat": _WIDEST_INT,
        "exp": _WIDEST_INT,
        "jti": uuid.UUID(int=0).hex,
        "role": max((r.value for r in Role), key=len),
        "ver": _WIDEST_INT,
        "org_id": some_id,
        "org_slug": "x" * MAX_SLUG,
        "org_role": max((r.value for r in OrgRole), key=len),
    }
    return (
        _json_b64_length(header) + 1 + _json_b64_length(payload) + 1 + _b64_length(_SIGNATURE_BYTES)
    )


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    role: Role
    issued_at: datetime
    expires_at: datetime
    org_id: uuid.UUID | None = None
    org_role: OrgRole | None = None
    version: int = 0
    org_slug: str = ""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey
    public_raw: bytes

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url(self.public_raw),
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }


class UnknownKeyId(TokenInvalid):
    """The token names a key this process has not loaded (yet)."""

    def __init__(self, kid: str) -> None:
        super().__init__()
        self.kid = kid


class AccessTokenCodec:
    def __init__(self, *, issuer: str, audience: str, ttl: timedelta) -> None:
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        # Checked before anything else: no base64 or JSON work on a token that
        # cannot be one of ours, however large the request that carried it.
        self.max_length = longest_token(issuer, audience) + LENGTH_MARGIN

    def issue(self, key: SigningKey, claims: AccessClaims) -> str:
        assert key.private is not None
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(claims.user_id),
            "sid": str(claims.session_id),
            "iat": int(claims.issued_at.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
            "jti": uuid.uuid4().hex,
            "role": claims.role.value,
            "ver": claims.version,
        }
        if claims.org_id is not None and claims.org_role is not None:
            payload["org_id"] = str(claims.org_id)
            payload["org_slug"] = claims.org_slug
            payload["org_role"] = claims.org_role.value
        return jwt.encode(payload, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})

    def verify(self, token: str, keys: dict[str, SigningKey]) -> AccessClaims:
        """Checks signature, algorithm, issuer, audience and expiry.

        Raises:
            TokenInvalid: longer than ``max_length``, malformed, forged,
                foreign, or not an EdDSA token.
            UnknownKeyId: well-formed but signed with a key not in ``keys``.
            TokenExpired: genuine but expired.
        """
        if len(token) > self.max_length or token.count(".") != 2:
            raise TokenInvalid()
        if any(b64url_decode_canonical(part) is None for part in token.split(".")):
            raise TokenInvalid()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise TokenInvalid()
        key = keys.get(kid)
        if key is None:
            raise UnknownKeyId(kid)
        try:
            payload = jwt.decode(
                token,
                key.public,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "sid", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        try:
            org = payload.get("org_id")
            org_role = payload.get("org_role")
            org_slug = payload.get("org_slug", "") if org else ""
            if not isinstance(org_slug, str):
                raise TypeError("org_slug")
            version = payload.get("ver", 0)
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError("ver")
            return AccessClaims(
                user_id=uuid.UUID(payload["sub"]),
                session_id=uuid.UUID(payload["sid"]),
                role=Role(payload["role"]),
                issued_at=datetime.fromtimestamp(payload["iat"], UTC),
                expires_at=datetime.fromtimestamp(payload["exp"], UTC),
                org_id=uuid.UUID(org) if org else None,
                org_role=OrgRole(org_role) if org and org_role else None,
                version=version,
                org_slug=org_slug,
            )
        except (KeyError, ValueError, TypeError):
            raise TokenInvalid() from None
