"""The method tables read from the RPC options: who may call a method
(``(authsvc.v1.access)``) and which reasons it may fail with
(``(authsvc.v1.errors)``)."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import ServiceDescriptor

from authsvc_client.v1 import errors_pb2, options_pb2

PUBLIC = options_pb2.ACCESS_PUBLIC
USER = options_pb2.ACCESS_USER
SELF_OR_ADMIN = options_pb2.ACCESS_SELF_OR_ADMIN
ADMIN = options_pb2.ACCESS_ADMIN
ORG = options_pb2.ACCESS_ORG

#: The reasons every method may answer without declaring them (see
#: MethodErrors in options.proto).
GENERIC_REASONS = frozenset(
    {"INVALID_ARGUMENT", "API_KEY_INVALID", "BACKEND_UNAVAILABLE", "INTERNAL"}
)

_PREFIX = "ERROR_REASON_"


def access_table(services: Iterable[ServiceDescriptor]) -> dict[str, int]:
    """Maps ``/package.Service/Method`` to its declared access.

    Raises:
        RuntimeError: a method declares none, so the server must not start.
    """
    table: dict[str, int] = {}
    for service in services:
        for method in service.methods:
            access = method.GetOptions().Extensions[options_pb2.access]
            if access == options_pb2.ACCESS_UNSPECIFIED:
                raise RuntimeError(f"{service.full_name}.{method.name} declares no access")
            table[f"/{service.full_name}/{method.name}"] = access
    return table


def errors_table(services: Iterable[ServiceDescriptor]) -> dict[str, frozenset[str]]:
    """Maps ``/package.Service/Method`` to every reason it may answer: the
    ones its ``(authsvc.v1.errors)`` declares (``ErrorReason`` names without
    the prefix, as ErrorInfo carries them) and the generic ones.

    Raises:
        RuntimeError: a method has no ``(authsvc.v1.errors)`` option (an empty
            one, ``{}``, declares that it fails with generic reasons only), or
            lists ERROR_REASON_UNSPECIFIED or a number ErrorReason does not
            define; the server must not start.
    """
    table: dict[str, frozenset[str]] = {}
    for service in services:
        for method in service.methods:
            name = f"{service.full_name}.{method.name}"
            options = method.GetOptions()
            if not options.HasExtension(options_pb2.errors):
                raise RuntimeError(f"{name} declares no (authsvc.v1.errors)")
            reasons = set(GENERIC_REASONS)
            for number in options.Extensions[options_pb2.errors].reasons:
                if number == errors_pb2.ERROR_REASON_UNSPECIFIED:
                    raise RuntimeError(f"{name} declares ERROR_REASON_UNSPECIFIED")
                try:
                    reasons.add(errors_pb2.ErrorReason.Name(number).removeprefix(_PREFIX))
                except ValueError:
                    raise RuntimeError(f"{name} declares an unknown reason {number}") from None
            table[f"/{service.full_name}/{method.name}"] = frozenset(reasons)
    return table
