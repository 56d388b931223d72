"""The one mapping from domain errors to gRPC statuses (AIP-193).

A status travels in the call's trailers, which clients refuse above their
metadata limit (8 KiB by default, with RESOURCE_EXHAUSTED and no ErrorInfo).
Messages, field names and descriptions may echo request input (an unknown
``update_mask`` path, say), so every string is cut here to a few hundred bytes
of UTF-8 and the number of entries is bounded: the whole status stays about
4 KiB at most on the wire, whatever the request held.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authsvc.errors import AuthError

DOMAIN = "authsvc"

# Budgets in bytes of UTF-8. The message also goes out as grpc-message,
# percent-encoded (up to three bytes per byte), and the details as base64.
MAX_MESSAGE = 256
MAX_FIELD = 64
MAX_DESCRIPTION = 128
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 128
MAX_METADATA_ENTRIES = 8
MAX_VIOLATIONS = 4
_ELLIPSIS = "\u2026"


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` bytes of UTF-8, else its longest prefix
    that does (whole characters) followed by an ellipsis."""
    if len(text) * 4 <= limit:
        return text  # fits whatever its characters are
    raw = text.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    if len(raw) <= limit:
        return raw.decode()
    return raw[: limit - len(_ELLIPSIS.encode())].decode("utf-8", "ignore") + _ELLIPSIS


def to_status(error: AuthError, request_id: str) -> grpc.Status:
    """A status with one ErrorInfo, plus BadRequest and RetryInfo where they apply."""
    status = status_pb2.Status(
        code=code_pb2.Code.Value(error.code), message=cut(error.message, MAX_MESSAGE)
    )
    metadata = {
        cut(key, MAX_METADATA_KEY): cut(value, MAX_METADATA_VALUE)
        for key, value in list(error.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    metadata["request_id"] = request_id  # the edge's: at most 128 ASCII characters
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=cut(v.field, MAX_FIELD), description=cut(v.description, MAX_DESCRIPTION)
                )
                for v in error.violations[:MAX_VIOLATIONS]
            ]
        )
        status.details.add().Pack(bad_request)
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo(
            retry_delay=Duration(seconds=max(1, math.ceil(error.retry_after)))
        )
        status.details.add().Pack(retry)
    result: grpc.Status = rpc_status.to_status(status)
    return result
