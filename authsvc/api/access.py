"""The method -> access table, read from the ``(authsvc.v1.access)`` options."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import ServiceDescriptor

from authsvc_client.v1 import options_pb2

PUBLIC = options_pb2.ACCESS_PUBLIC
USER = options_pb2.ACCESS_USER
SELF_OR_ADMIN = options_pb2.ACCESS_SELF_OR_ADMIN
ADMIN = options_pb2.ACCESS_ADMIN
ORG = options_pb2.ACCESS_ORG


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
