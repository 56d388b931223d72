"""Who is calling: resolved once per call at the edge, passed to services."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from authsvc.domain.models import OrgRole, Role


class PrincipalKind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """An access token resolved against the live session and user rows."""

    session_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    role: Role
    org_id: uuid.UUID | None
    expires_at: datetime
    session_expires_at: datetime
    # The live role in org_id (None without an active org).
    org_role: OrgRole | None = None
    # The slug of org_id now (empty without an active org).
    org_slug: str = ""
    # The org and role the access token itself names (its org_id, org_slug
    # and org_role claims), whatever the session holds now: signed by us when
    # the session was in that org, so evidence that the caller could see it
    # then. Only a retried delete reads them (authsvc.services.orgs,
    # allow_missing).
    token_org_id: uuid.UUID | None = None
    token_org_role: OrgRole | None = None
    token_org_slug: str = ""


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    session: SessionInfo | None = None
    service_name: str | None = None

    @property
    def is_admin(self) -> bool:
        """Admin tokens and service keys may act on any user."""
        if self.kind is PrincipalKind.SERVICE:
            return True
        return self.session is not None and self.session.role is Role.ADMIN

    def may_act_on(self, user_id: uuid.UUID) -> bool:
        return self.is_admin or (self.session is not None and self.session.user_id == user_id)


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS)
