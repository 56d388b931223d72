"""Entity tags (AIP-154) of users, orgs and memberships.

An etag is computed from the resource, never stored: the first 12 bytes of
SHA-256 over a canonical encoding of the resource's own fields, as 16
characters of unpadded base64url. The encoding is a kind tag and then every
field in a fixed order, each as a 4-byte big-endian length and its bytes:
text as UTF-8, ids in their canonical UUID text, enums by value, booleans as
"0"/"1", timestamps as integer microseconds since the Unix epoch (UTC; the
precision both databases store). Length prefixes keep any two different
field lists apart ("ab" + "c" is not "a" + "bc").

Because every field goes in, content that differs gives a different etag even
when two changes share one clock tick (the update time alone would not tell
them apart); the update time goes in too, so a change that restores earlier
content at a later time gets a new etag. An update that writes nothing keeps
the etag.

A membership's etag covers the membership (org, user, role, its times), not
the user's email and display name a Member message shows beside it: those
belong to the User, whose etag covers them.

The kind tag ("authsvc.user.v1", ...) keeps etags of different kinds apart and
versions the encoding: a change to it changes every etag once, which costs
holders of an old one an ABORTED and a re-read, nothing worse.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime

from authsvc.domain.models import Member, Org, User
from authsvc.errors import EtagMismatch

#: Longer etags are refused as bad input (ours are 16 characters).
MAX_LENGTH = 64
_DIGEST_BYTES = 12
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_Field = str | bool | uuid.UUID | datetime


def _encode(value: _Field) -> bytes:
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, datetime):
        delta = value.astimezone(UTC) - _EPOCH
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return str(micros).encode()
    return str(value).encode()  # str, a StrEnum's value, a UUID's canonical text


def _etag(kind: str, *fields: _Field) -> str:
    digest = hashlib.sha256()
    for part in (kind.encode(), *(_encode(f) for f in fields)):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return base64.urlsafe_b64encode(digest.digest()[:_DIGEST_BYTES]).decode().rstrip("=")


def user(value: User) -> str:
    return _etag(
        "authsvc.user.v1",
        value.id,
        value.email,
        value.email_verified,
        value.display_name,
        value.given_name,
        value.family_name,
        value.role.value,
        value.created_at,
        value.updated_at,
    )


def org(value: Org) -> str:
    return _etag(
        "authsvc.org.v1", value.id, value.slug, value.name, value.created_at, value.updated_at
    )


def member(value: Member) -> str:
    return _etag(
        "authsvc.member.v1",
        value.org_id,
        value.user_id,
        value.role.value,
        value.created_at,
        value.updated_at,
    )


def require(expected: str, current: str) -> None:
    """Passes when ``expected`` is empty (no check) or is ``current``.

    Call it inside the write transaction, on the resource as read under its
    row lock, so that of two writers holding one etag only the first wins.

    Raises: EtagMismatch.
    """
    if expected and expected != current:
        raise EtagMismatch()
