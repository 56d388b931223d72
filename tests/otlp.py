"""A real OTLP/gRPC trace receiver on loopback, for the tracing tests.

It implements the collector's TraceService (the generated code of
``opentelemetry-proto``, installed with the OTLP exporter) on a grpc.aio
server, keeps every span it is sent with its resource, and can be made to
hang (a collector that accepts the connection and never answers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


def value(any_value: common_pb2.AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (scalars; arrays as lists)."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind is None:
        return None
    return getattr(any_value, kind)


def attributes(keyvalues: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in keyvalues}


@dataclass(frozen=True)
class Span:
    """One received span, with its resource's attributes."""

    span: trace_pb2.Span
    resource: dict[str, Any]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects ExportTraceServiceRequests; ``hang`` makes Export never answer."""

    hang: bool = False
    requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    _server: grpc.aio.Server | None = None
    port: int = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if self.hang:
            await asyncio.Event().wait()  # until the exporter gives up (its timeout)
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self, self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to (``http``: no TLS)."""
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        out: list[Span] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    out.extend(Span(span, resource) for span in scope_spans.spans)
        return out

    def text(self) -> str:
        """Everything received (names, attributes, events, statuses, links,
        resources, scopes) as JSON text, to search for secrets."""
        return "\n".join(MessageToJson(request) for request in self.requests)

    async def wait_for(
        self, check: Callable[[list[Span]], bool], what: str, seconds: float = 20.0
    ) -> list[Span]:
        deadline = time.monotonic() + seconds
        while True:
            spans = self.spans()
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver never got {what}: {len(spans)} spans")
            await asyncio.sleep(0.05)


def descendants(spans: list[Span], root: Span) -> list[Span]:
    """The spans below ``root`` (children, their children...)."""
    by_parent: dict[str, list[Span]] = {}
    for span in spans:
        if span.trace_id == root.trace_id:
            by_parent.setdefault(span.parent_id, []).append(span)
    out: list[Span] = []
    todo = [root.span_id]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child.span_id)
    return out
