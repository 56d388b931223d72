"""Typed errors from authsvc's statuses, read back from ``google.rpc.ErrorInfo``.

try:
    await stub.SignInWithPassword(request)
except grpc.aio.AioRpcError as rpc_error:
    error = from_rpc_error(rpc_error)
    if error.reason == "INVALID_CREDENTIALS": ...
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
    """A failed authsvc call: its status code, ErrorInfo reason and details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str],
        details: list[Any],
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata
        self.details = details

    @property
    def request_id(self) -> str:
        return self.metadata.get("request_id", "")

    def detail(self, kind: type[Any]) -> Any | None:
        """The first detail of a type, e.g. ``error_details_pb2.BadRequest``."""
        return next((d for d in self.details if isinstance(d, kind)), None)


def _status(metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    for key, value in metadata or ():
        if key == _STATUS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(error: grpc.RpcError) -> AuthsvcError:
    """Builds the typed error of a failed call (sync or asyncio)."""
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
    return AuthsvcError(code, reason, message, metadata, details)
