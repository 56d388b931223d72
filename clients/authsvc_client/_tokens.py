"""Local verification of authsvc access tokens (EdDSA JWTs) with PyJWT.

Private to :mod:`authsvc_client.sidecar`. A verified token becomes a
:class:`Verified`: the few claims the sidecar checks on every request (session,
claims version, issue and expiry times) and the ``SessionInfo`` handed to
handlers, built once from the claims.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc_client.v1 import resources_pb2

ALGORITHM = "EdDSA"
#: authsvc refuses longer tokens too; nothing it mints comes close.
MAX_LENGTH = 4096
_REQUIRED = ["iss", "aud", "sub", "sid", "iat", "exp", "jti"]

#: Claim values -> enum values: the `role` and `org_role` claims are the enum
#: value names without their prefix, in lowercase (resources.proto). The one
#: copy of these tables in the client package.
ROLE_CLAIMS: Mapping[str, resources_pb2.Role.ValueType] = {
    "user": resources_pb2.ROLE_USER,
    "admin": resources_pb2.ROLE_ADMIN,
}
ORG_ROLE_CLAIMS: Mapping[str, resources_pb2.OrgRole.ValueType] = {
    "owner": resources_pb2.ORG_ROLE_OWNER,
    "admin": resources_pb2.ORG_ROLE_ADMIN,
    "member": resources_pb2.ORG_ROLE_MEMBER,
}


class Invalid(Exception):
    """Malformed, forged, foreign (issuer, audience, algorithm) or incomplete."""


class Expired(Exception):
    """Genuine, but past its ``exp``."""


class UnknownKid(Exception):
    """Well-formed, but names a key that is not in the key set (yet)."""

    def __init__(self, kid: str) -> None:
        super().__init__("unknown key id")
        self.kid = kid


@dataclass(frozen=True, slots=True)
class Verified:
    """A token whose signature and claims checked out."""

    session_id: str
    version: int
    issued_at: int  # epoch seconds (``iat``)
    expires_at: int  # epoch seconds (``exp``)
    session: resources_pb2.SessionInfo


def key_id(token: str) -> str:
    """The ``kid`` of an EdDSA token's header.

    Raises:
        Invalid: not a compact JWS, not EdDSA, or without a string ``kid``.
    """
    if len(token) > MAX_LENGTH or token.count(".") != 2:
        raise Invalid()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Invalid() from None
    kid = header.get("kid")
    # Only EdDSA: an "alg" the token picks (none, HS256 with the public key as
    # the secret) must never select how it is checked.
    if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid:
        raise Invalid()
    return kid


def verify(
    token: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    issuer: str,
    audience: str,
    clock_skew: float,
) -> Verified:
    """Checks signature, algorithm, issuer, audience, times and claim shapes.

    Args:
        token: the compact JWT.
        keys: public keys by ``kid``.
        issuer: the expected ``iss``.
        audience: the expected ``aud``.
        clock_skew: seconds an ``iat`` may lie in the future (the minting
            server's clock may run ahead of ours). ``exp`` gets no leeway.

    Raises:
        Invalid, Expired, UnknownKid.
    """
    kid = key_id(token)
    key = keys.get(kid)
    if key is None:
        raise UnknownKid(kid)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            # iat is checked below, with clock_skew; PyJWT would allow none.
            options={"require": _REQUIRED, "verify_iat": False},
        )
    except jwt.ExpiredSignatureError:
        raise Expired() from None
    except jwt.PyJWTError:
        raise Invalid() from None
    return _from_claims(claims, clock_skew)


def _from_claims(claims: dict[str, Any], clock_skew: float) -> Verified:
    iat, exp, version = claims.get("iat"), claims.get("exp"), claims.get("ver")
    # Integers, not floats or booleans: "ver" decides TOKEN_STALE, "iat" the gap checks.
    if type(iat) is not int or type(exp) is not int or type(version) is not int:
        raise Invalid()
    if iat > time.time() + clock_skew or exp <= iat or version < 0:
        raise Invalid()
    sub, sid = claims["sub"], claims["sid"]
    role_name = claims.get("role")
    role = ROLE_CLAIMS.get(role_name) if isinstance(role_name, str) else None
    org_id = claims.get("org_id", "")
    org_role_name = claims.get("org_role", "")
    org_slug = claims.get("org_slug", "")
    if not (_is_uuid(sub) and _is_uuid(sid)) or role is None:
        raise Invalid()
    if not all(isinstance(v, str) for v in (org_id, org_role_name, org_slug)):
        raise Invalid()
    org_role = resources_pb2.ORG_ROLE_UNSPECIFIED
    if org_id or org_role_name or org_slug:
        # An org claim comes with its role, and names a real org id. The slug
        # may be missing (a token of a server from before the claim): then
        # the session has no slug, and a request naming its org by slug is
        # refused by the tenant-scoping interceptor rather than let through.
        if not _is_uuid(org_id) or org_role_name not in ORG_ROLE_CLAIMS:
            raise Invalid()
        org_role = ORG_ROLE_CLAIMS[org_role_name]
    session = resources_pb2.SessionInfo(
        session_id=sid,
        user_id=sub,
        role=role,
        org_id=org_id,
        org_slug=org_slug,
        org_role=org_role,
        expire_time=Timestamp(seconds=exp),
    )
    return Verified(session_id=sid, version=version, issued_at=iat, expires_at=exp, session=session)


def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def parse_jwks(keys: Any) -> dict[str, Ed25519PublicKey]:
    """The usable keys of a ``GetJwksResponse.keys``: Ed25519 signing keys only.

    Anything else in the set (another key type, curve or algorithm, a malformed
    ``x``) is skipped rather than trusted.
    """
    parsed: dict[str, Ed25519PublicKey] = {}
    for jwk in keys:
        if (jwk.kty, jwk.crv) != ("OKP", "Ed25519") or not jwk.kid:
            continue
        if jwk.alg not in ("", ALGORITHM) or jwk.use not in ("", "sig"):
            continue
        try:
            key = jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": jwk.x}, ALGORITHM).key
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if isinstance(key, Ed25519PublicKey):
            parsed[jwk.kid] = key
    return parsed
