"""Domain records: frozen dataclasses that know nothing of storage or gRPC."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

#: The longest org slug (validation and the longest token both use it).
MAX_SLUG = 63


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


class OrgRole(enum.StrEnum):
    """A member's role in an org; ``rank`` orders them (owner highest)."""

    MEMBER = "member"
    ADMIN = "admin"
    OWNER = "owner"

    @property
    def rank(self) -> int:
        return _ORG_RANK[self]


_ORG_RANK = {OrgRole.MEMBER: 1, OrgRole.ADMIN: 2, OrgRole.OWNER: 3}


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str
    role: Role
    email_verified: bool
    created_at: datetime
    updated_at: datetime
    given_name: str = ""
    family_name: str = ""


@dataclass(frozen=True, slots=True)
class Session:
    id: uuid.UUID
    user_id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    ip_address: str
    user_agent: str
    org_id: uuid.UUID | None = None
    claims_version: int = 0

    def is_live(self, now: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > now


@dataclass(frozen=True, slots=True)
class RefreshTokenRecord:
    id: int
    session_id: uuid.UUID
    token_hash: bytes
    generation: int
    created_at: datetime
    rotated_at: datetime | None
    grace_uses: int


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    created_at: datetime
    retired_at: datetime | None
    private_key_sealed: bytes
    public_key: bytes


@dataclass(frozen=True, slots=True)
class ClientMeta:
    """Where a call comes from, recorded on sessions."""

    ip_address: str = ""
    user_agent: str = ""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A keyset position: the sort key of the last row of a page."""

    created_at: datetime
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Org:
    id: uuid.UUID
    slug: str
    name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    """A membership, with the user's email and name for listing."""

    org_id: uuid.UUID
    user_id: uuid.UUID
    role: OrgRole
    email: str
    display_name: str
    created_at: datetime
    updated_at: datetime
