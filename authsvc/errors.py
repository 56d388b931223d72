"""The domain error hierarchy.

Services raise these; the API edge (``authsvc.api.status``) is the one place
that turns them into a gRPC status with a ``google.rpc.ErrorInfo``. Each class
carries its status code name and its reason (an ``authsvc.v1.ErrorReason``
value without the prefix) as class attributes and registers itself by reason,
so a test can prove the hierarchy and the proto enum list the same reasons.
Messages are public: never put a secret or an internal detail in one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, reported as a ``google.rpc.BadRequest`` entry."""

    field: str
    description: str


class AuthError(Exception):
    """Base of every error a caller may see."""

    code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL"
    default_message: ClassVar[str] = "internal error"
    registry: ClassVar[dict[str, type[AuthError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "reason" in cls.__dict__:
            AuthError.registry[cls.reason] = cls

    def __init__(
        self,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after = retry_after
        super().__init__(self.message)


AuthError.registry["INTERNAL"] = AuthError


class InvalidArgument(AuthError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"
    default_message = "invalid argument"

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])


class WeakPassword(AuthError):
    code = "INVALID_ARGUMENT"
    reason = "WEAK_PASSWORD"
    default_message = "password does not meet the password policy"


class InvalidPageToken(AuthError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_PAGE_TOKEN"
    default_message = "invalid page token"


class InvalidCredentials(AuthError):
    code = "UNAUTHENTICATED"
    reason = "INVALID_CREDENTIALS"
    default_message = "invalid email or password"


class NotAuthenticated(AuthError):
    code = "UNAUTHENTICATED"
    reason = "NOT_AUTHENTICATED"
    default_message = "this call needs a credential"


class TokenInvalid(AuthError):
    code = "UNAUTHENTICATED"
    reason = "TOKEN_INVALID"
    default_message = "invalid token"


class TokenExpired(AuthError):
    code = "UNAUTHENTICATED"
    reason = "TOKEN_EXPIRED"
    default_message = "token expired"


class RefreshTokenReused(AuthError):
    code = "UNAUTHENTICATED"
    reason = "REFRESH_TOKEN_REUSED"
    default_message = "refresh token was already used; the session has been revoked"


class SessionRevoked(AuthError):
    code = "UNAUTHENTICATED"
    reason = "SESSION_REVOKED"
    default_message = "session revoked"


class SessionExpired(AuthError):
    code = "UNAUTHENTICATED"
    reason = "SESSION_EXPIRED"
    default_message = "session expired"


class ApiKeyInvalid(AuthError):
    code = "UNAUTHENTICATED"
    reason = "API_KEY_INVALID"
    default_message = "invalid API key"


class PermissionDenied(AuthError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"
    default_message = "permission denied"


class EmailAlreadyExists(AuthError):
    code = "ALREADY_EXISTS"
    reason = "EMAIL_ALREADY_EXISTS"
    default_message = "an account with this email already exists"


class UserNotFound(AuthError):
    code = "NOT_FOUND"
    reason = "USER_NOT_FOUND"
    default_message = "user not found"


class SessionNotFound(AuthError):
    code = "NOT_FOUND"
    reason = "SESSION_NOT_FOUND"
    default_message = "session not found"


class SignupDisabled(AuthError):
    code = "FAILED_PRECONDITION"
    reason = "SIGNUP_DISABLED"
    default_message = "sign-up is disabled"


class RateLimited(AuthError):
    code = "RESOURCE_EXHAUSTED"
    reason = "RATE_LIMITED"
    default_message = "too many attempts; try again later"


class BackendUnavailable(AuthError):
    """A backing store (Postgres, Redis, SQLite) failed; nothing was changed
    that the caller needs to know about, and the call may be retried."""

    code = "UNAVAILABLE"
    reason = "BACKEND_UNAVAILABLE"
    default_message = "a backing store is unavailable; retry"

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class TransientConflict(BackendUnavailable):
    """The transaction lost a deadlock or a serialization race; running it
    again will likely succeed (``SqlDatabase.attempts`` does, a few times)."""


class OrgNotFound(AuthError):
    code = "NOT_FOUND"
    reason = "ORG_NOT_FOUND"
    default_message = "organization not found"


class OrgSlugConflict(AuthError):
    code = "ALREADY_EXISTS"
    reason = "ORG_SLUG_CONFLICT"
    default_message = "another organization has this slug"


class MemberAlreadyExists(AuthError):
    code = "ALREADY_EXISTS"
    reason = "MEMBER_ALREADY_EXISTS"
    default_message = "the user is already a member of the organization"


class MemberNotFound(AuthError):
    code = "NOT_FOUND"
    reason = "MEMBER_NOT_FOUND"
    default_message = "the user is not a member of the organization"


class LastOwner(AuthError):
    code = "FAILED_PRECONDITION"
    reason = "LAST_OWNER"
    default_message = "the organization would be left without an owner"


class OrgMismatch(AuthError):
    code = "PERMISSION_DENIED"
    reason = "ORG_MISMATCH"
    default_message = "the request names an organization other than the session's active org"


class TokenStale(AuthError):
    code = "UNAUTHENTICATED"
    reason = "TOKEN_STALE"
    default_message = "the token's claims changed; refresh it"


class EtagMismatch(AuthError):
    code = "ABORTED"
    reason = "ETAG_MISMATCH"
    default_message = "the resource changed since it was read (stale etag)"


class OrgHasMembers(AuthError):
    code = "FAILED_PRECONDITION"
    reason = "ORG_HAS_MEMBERS"
    default_message = "the organization has other members; delete it with force"


class PendingTokenInvalid(AuthError):
    code = "UNAUTHENTICATED"
    reason = "PENDING_TOKEN_INVALID"
    default_message = "the pending sign-in is unknown, used or expired; sign in again"
