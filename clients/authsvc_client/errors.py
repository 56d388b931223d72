"""Typed errors from authsvc's statuses, read back from ``google.rpc.ErrorInfo``.

Every ``ErrorReason`` has its own exception class (``InvalidCredentials``,
``OrgNotFound``, ``LastOwner`` ...), all subclasses of ``AuthsvcError``;
``from_rpc_error`` returns the one the status names::

    try:
        await stub.SignInWithPassword(request)
    except grpc.aio.AioRpcError as rpc_error:
        error = from_rpc_error(rpc_error)
        if isinstance(error, InvalidCredentials): ...   # or error.reason == "INVALID_CREDENTIALS"

A status without an authsvc ``ErrorInfo`` (a transport failure, a deadline, a
reason newer than this client) gives a plain ``AuthsvcError`` (``reason`` is
then the unknown reason, or ``""``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from authsvc_client.v1 import errors_pb2

DOMAIN = "authsvc"
_STATUS_KEY = "grpc-status-details-bin"
_PREFIX = "ERROR_REASON_"

#: Every reason the server may send (``ErrorReason`` names without the prefix).
REASONS = frozenset(
    name.removeprefix(_PREFIX)
    for name in errors_pb2.ErrorReason.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "ERROR_REASON_UNSPECIFIED"
)


class AuthsvcError(Exception):
    """A failed authsvc call: its status code, ErrorInfo reason and details.

    Subclasses name one reason each (class attributes ``REASON`` and
    ``CODE``, the status code the reason travels with) and register
    themselves; ``from_rpc_error`` picks them by reason. A subclass built
    without arguments (``OrgMismatch(message="...")``) takes its own code and
    reason.
    """

    #: The ErrorInfo reason of this class; empty on the base class.
    REASON: ClassVar[str] = ""
    #: The status code the reason travels with.
    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    #: reason -> class, filled by ``__init_subclass__``.
    registry: ClassVar[dict[str, type[AuthsvcError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.REASON:
            if cls.REASON in AuthsvcError.registry:
                raise TypeError(f"two error classes for reason {cls.REASON}")
            AuthsvcError.registry[cls.REASON] = cls

    def __init__(
        self,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        message: str = "",
        metadata: dict[str, str] | None = None,
        details: list[Any] | None = None,
    ) -> None:
        reason = self.REASON if reason is None else reason
        super().__init__(f"{reason}: {message}")
        self.code: grpc.StatusCode = self.CODE if code is None else code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = {} if metadata is None else metadata
        self.details: list[Any] = [] if details is None else details

    @property
    def request_id(self) -> str:
        return self.metadata.get("request_id", "")

    def detail(self, kind: type[Any]) -> Any | None:
        """The first detail of a type, e.g. ``error_details_pb2.BadRequest``."""
        return next((d for d in self.details if isinstance(d, kind)), None)


_C = grpc.StatusCode


class InvalidArgument(AuthsvcError):
    """A field is missing, too long or malformed (see the ``BadRequest`` detail)."""

    REASON, CODE = "INVALID_ARGUMENT", _C.INVALID_ARGUMENT


class InvalidCredentials(AuthsvcError):
    """Unknown email or wrong password (indistinguishable)."""

    REASON, CODE = "INVALID_CREDENTIALS", _C.UNAUTHENTICATED


class EmailAlreadyExists(AuthsvcError):
    """An account with this email exists."""

    REASON, CODE = "EMAIL_ALREADY_EXISTS", _C.ALREADY_EXISTS


class WeakPassword(AuthsvcError):
    """The password breaks the password policy."""

    REASON, CODE = "WEAK_PASSWORD", _C.INVALID_ARGUMENT


class TokenExpired(AuthsvcError):
    """The token was valid once and has expired."""

    REASON, CODE = "TOKEN_EXPIRED", _C.UNAUTHENTICATED


class TokenInvalid(AuthsvcError):
    """The token is malformed, forged, foreign or unknown."""

    REASON, CODE = "TOKEN_INVALID", _C.UNAUTHENTICATED


class RefreshTokenReused(AuthsvcError):
    """A spent refresh token was presented again; the session is revoked."""

    REASON, CODE = "REFRESH_TOKEN_REUSED", _C.UNAUTHENTICATED


class SessionRevoked(AuthsvcError):
    """The session was signed out or revoked."""

    REASON, CODE = "SESSION_REVOKED", _C.UNAUTHENTICATED


class UserNotFound(AuthsvcError):
    """No user with that id."""

    REASON, CODE = "USER_NOT_FOUND", _C.NOT_FOUND


class NotAuthenticated(AuthsvcError):
    """The RPC needs a credential and none was sent."""

    REASON, CODE = "NOT_AUTHENTICATED", _C.UNAUTHENTICATED


class PermissionDenied(AuthsvcError):
    """The credential is valid but does not allow this call."""

    REASON, CODE = "PERMISSION_DENIED", _C.PERMISSION_DENIED


class SignupDisabled(AuthsvcError):
    """Self sign-up is turned off."""

    REASON, CODE = "SIGNUP_DISABLED", _C.FAILED_PRECONDITION


class RateLimited(AuthsvcError):
    """Too many attempts; the ``RetryInfo`` detail says when to try again."""

    REASON, CODE = "RATE_LIMITED", _C.RESOURCE_EXHAUSTED


class SessionExpired(AuthsvcError):
    """The session reached its absolute lifetime."""

    REASON, CODE = "SESSION_EXPIRED", _C.UNAUTHENTICATED


class SessionNotFound(AuthsvcError):
    """No session with that id."""

    REASON, CODE = "SESSION_NOT_FOUND", _C.NOT_FOUND


class InvalidPageToken(AuthsvcError):
    """The page token is malformed, modified, foreign or expired."""

    REASON, CODE = "INVALID_PAGE_TOKEN", _C.INVALID_ARGUMENT


class ApiKeyInvalid(AuthsvcError):
    """The API key is not one the server knows."""

    REASON, CODE = "API_KEY_INVALID", _C.UNAUTHENTICATED


class BackendUnavailable(AuthsvcError):
    """A backing store cannot be reached; retry."""

    REASON, CODE = "BACKEND_UNAVAILABLE", _C.UNAVAILABLE


class Internal(AuthsvcError):
    """An unexpected server failure (the server log has it under ``request_id``)."""

    REASON, CODE = "INTERNAL", _C.INTERNAL


class OrgNotFound(AuthsvcError):
    """No organization with that id or slug."""

    REASON, CODE = "ORG_NOT_FOUND", _C.NOT_FOUND


class OrgSlugConflict(AuthsvcError):
    """Another organization has this slug."""

    REASON, CODE = "ORG_SLUG_CONFLICT", _C.ALREADY_EXISTS


class MemberAlreadyExists(AuthsvcError):
    """The user is already a member of the organization."""

    REASON, CODE = "MEMBER_ALREADY_EXISTS", _C.ALREADY_EXISTS


class MemberNotFound(AuthsvcError):
    """The user is not a member of the organization."""

    REASON, CODE = "MEMBER_NOT_FOUND", _C.NOT_FOUND


class LastOwner(AuthsvcError):
    """The change would leave the organization without an owner."""

    REASON, CODE = "LAST_OWNER", _C.FAILED_PRECONDITION


class OrgMismatch(AuthsvcError):
    """The request names an organization other than the session's active org
    (or the session has none). Raised by the server, by the tenant-scoping
    client interceptor's callers (``from_rpc_error``) and by
    ``authsvc_client.scoping.assert_same_org``."""

    REASON, CODE = "ORG_MISMATCH", _C.PERMISSION_DENIED


class TokenStale(AuthsvcError):
    """The token's claims changed after it was minted; refresh it."""

    REASON, CODE = "TOKEN_STALE", _C.UNAUTHENTICATED


class EtagMismatch(AuthsvcError):
    """The request's ``etag`` is not the resource's current one: someone changed
    it since it was read. Read it again, and redo the change if it still applies."""

    REASON, CODE = "ETAG_MISMATCH", _C.ABORTED


class OrgHasMembers(AuthsvcError):
    """The organization has members other than the caller (for an admin token
    or API key: any member); delete it with ``force`` to remove them too."""

    REASON, CODE = "ORG_HAS_MEMBERS", _C.FAILED_PRECONDITION


class PendingTokenInvalid(AuthsvcError):
    """The pending token of a sign-in challenge is malformed, unknown, already
    used or expired; sign in again."""

    REASON, CODE = "PENDING_TOKEN_INVALID", _C.UNAUTHENTICATED


del _C


def error_class(reason: str) -> type[AuthsvcError]:
    """The exception class of a reason (``AuthsvcError`` for an unknown one)."""
    return AuthsvcError.registry.get(reason, AuthsvcError)


def status_metadata(
    code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
) -> tuple[tuple[str, bytes]]:
    """Trailing metadata carrying a ``google.rpc.Status`` with one authsvc ``ErrorInfo``,
    as authsvc sends it (for failures produced on the client side, or by a
    service that reports errors the authsvc way)."""
    info = error_details_pb2.ErrorInfo(domain=DOMAIN, reason=reason, metadata=metadata or {})
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    return ((_STATUS_KEY, status.SerializeToString()),)


def _status(metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    for key, value in metadata or ():
        if key == _STATUS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(error: grpc.RpcError) -> AuthsvcError:
    """Builds the typed error of a failed call (sync or asyncio).

    Returns the subclass of the ErrorInfo's reason (``OrgNotFound`` ...), or
    ``AuthsvcError`` itself when the status carries no known authsvc reason.
    """
    call: Any = error  # AioRpcError and the sync _InactiveRpcError are both Calls
    code: grpc.StatusCode = call.code()
    status = _status(call.trailing_metadata())
    details: list[Any] = []
    reason, metadata = "", {}
    message = call.details() or ""
    if status is not None:
        for any_detail in status.details:
            for kind in (
                error_details_pb2.ErrorInfo,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
            ):
                if any_detail.Is(kind.DESCRIPTOR):
                    detail = kind()
                    any_detail.Unpack(detail)
                    details.append(detail)
        info = next((d for d in details if isinstance(d, error_details_pb2.ErrorInfo)), None)
        if info is not None and info.domain == DOMAIN:
            reason, metadata = info.reason, dict(info.metadata)
    return error_class(reason)(code, reason, message, metadata, details)
