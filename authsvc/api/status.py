"""The one mapping from domain errors to gRPC statuses (AIP-193)."""

from __future__ import annotations

import math

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authsvc.errors import AuthError

DOMAIN = "authsvc"


def to_status(error: AuthError, request_id: str) -> grpc.Status:
    """A status with one ErrorInfo, plus BadRequest and RetryInfo where they apply."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=DOMAIN,
        metadata={**error.metadata, "request_id": request_id},
    )
    status.details.add().Pack(info)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
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
