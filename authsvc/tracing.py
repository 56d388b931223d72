"""OpenTelemetry traces, when the standard ``OTEL_*`` environment asks for them.

Off unless an OTLP endpoint is configured (``enabled``). Off, nothing of the
OpenTelemetry SDK or its instrumentations is imported, and the server gets no
interceptor, the engine no event listener and Redis no hook: every
OpenTelemetry import below is inside a function that only runs when tracing is
on.

On, the composition root builds one ``Tracing`` (its own TracerProvider, never
the global one, so servers in one process keep theirs apart) and hands it to
each piece it instruments:

* RPCs: opentelemetry-instrumentation-grpc's aio server interceptor, first in
  the chain, so the edge's access log line and every statement run inside the
  RPC span; the caller's ``traceparent`` (the propagators of
  ``OTEL_PROPAGATORS``, W3C trace context and baggage by default) makes it a
  child of the caller's span.
* SQL statements: the SQLAlchemy instrumentation's engine tracer on this
  engine only; ``db.statement`` is the statement with its placeholders
  (parameters are never read), sqlcommenter off, and a failed statement's span
  says only the error's class and SQLSTATE (a driver's message can quote the
  value it refused).
* Redis commands: opentelemetry-instrumentation-redis on the given client only;
  ``db.statement`` is the command name and one ``?`` per argument (keys hold
  hashes of tokens and emails).

Exporting is OTLP over gRPC through a BatchSpanProcessor: spans are queued and
sent from the processor's own thread, so a collector that is down or slow
holds no RPC up. Everything else (service name, resource attributes,
endpoint, headers, TLS, timeouts, batch sizes, the sampler) is the SDK's own
reading of the ``OTEL_*`` variables.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc
    import redis.asyncio as aioredis
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Link, SpanKind, TraceState
    from opentelemetry.util.types import Attributes
    from sqlalchemy.engine.interfaces import ExceptionContext
    from sqlalchemy.ext.asyncio import AsyncEngine

#: service.name when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
SERVICE_NAME = "authsvc"


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for traces: an OTLP endpoint is set, and
    neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )


class Tracing:
    """One TracerProvider and the instrumentation of one server's parts."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    @classmethod
    def from_environment(cls) -> Tracing:
        """OTLP/gRPC export as the ``OTEL_*`` environment configures it."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return cls.exporting_to(OTLPSpanExporter())

    @classmethod
    def exporting_to(cls, exporter: SpanExporter) -> Tracing:
        """Spans batched to ``exporter`` (``from_environment``'s, or a test's)."""
        from opentelemetry.sdk.resources import SERVICE_NAME as NAME_KEY
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # An explicit attribute would override OTEL_SERVICE_NAME: give the
        # default only when the environment names no service.
        named = NAME_KEY in OTELResourceDetector().detect().attributes
        resource = Resource.create({} if named else {NAME_KEY: SERVICE_NAME})
        # Shut down in Server.stop, not at interpreter exit.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        # The sampler of OTEL_TRACES_SAMPLER, behind one rule: no trace starts
        # outside an RPC (see _in_rpcs).
        provider.sampler = _in_rpcs(provider.sampler)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The RPC span interceptor; it must come before the edge's."""
        return _rpc_interceptor(self.provider)

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """Statement spans for ``engine`` (and no other engine)."""
        from opentelemetry.instrumentation.sqlalchemy import engine as otel_sql
        from opentelemetry.instrumentation.sqlalchemy.version import __version__
        from opentelemetry.metrics import NoOpMeterProvider
        from sqlalchemy import event

        # The engine tracer itself, not SQLAlchemyInstrumentor().instrument():
        # that one is a process-wide singleton that also wraps every
        # create_engine and Engine.connect of the process, with the first
        # caller's provider. Pool usage goes to Prometheus, not OTel metrics.
        tracer = self.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__)
        usage = NoOpMeterProvider().get_meter(__name__).create_up_down_counter("unused")
        otel_sql.EngineTracer(  # type: ignore[no-untyped-call]
            tracer, engine.sync_engine, usage, enable_commenter=False
        )
        # Its error hook puts str(the driver's error) in the span's status,
        # and that can quote input: asyncpg's "invalid input for query
        # argument $1: '...'", Postgres' "invalid input syntax for type
        # uuid: ...". Ours says only what kind of error it was.
        event.remove(engine.sync_engine, "handle_error", otel_sql._handle_error)
        event.listen(engine.sync_engine, "handle_error", _end_failed_statement)

    def instrument_redis(self, client: aioredis.Redis) -> None:
        """Command spans for ``client`` (and no other client)."""
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor.instrument_client(client, tracer_provider=self.provider)

    async def shutdown(self) -> None:
        """Exports what is queued (within the exporter's timeout), then stops."""
        # Blocking (it joins the export thread): off the event loop.
        await asyncio.to_thread(self.provider.shutdown)


def _end_failed_statement(context: ExceptionContext) -> None:
    from opentelemetry.trace import Status, StatusCode

    span = getattr(context.execution_context, "_otel_span", None)
    if span is None:
        return
    if span.is_recording():
        # The error's class and SQLSTATE (as authsvc.storage.database reads
        # it), never its text.
        error = context.sqlalchemy_exception or context.original_exception
        orig = context.original_exception
        states = (getattr(e, "sqlstate", None) for e in (orig, orig.__cause__))
        state = next((s for s in states if isinstance(s, str)), None)
        described = type(error).__name__ + (f" SQLSTATE {state}" if state else "")
        span.set_status(Status(StatusCode.ERROR, described))
    span.end()


def _in_rpcs(delegate: Sampler) -> Sampler:
    """A sampler that starts no trace outside an RPC, else asks ``delegate``.

    Background work (the event relay's poll of the database's log four times a
    second, the key reload, the relay's XADD) would otherwise make a trace of
    one statement each, several a second per replica: a span without a parent
    that is not an RPC's server span is dropped.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class InRpcs(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid and kind is not trace.SpanKind.SERVER:
                return SamplingResult(Decision.DROP)
            return delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"InRpcs{{{delegate.get_description()}}}"

    return InRpcs()


def _rpc_interceptor(provider: TracerProvider) -> grpc.aio.ServerInterceptor:
    from opentelemetry.instrumentation.grpc._aio_server import (
        OpenTelemetryAioServerInterceptor,
        _OpenTelemetryAioServicerContext,
    )
    from opentelemetry.instrumentation.grpc.version import __version__

    class RpcSpans(OpenTelemetryAioServerInterceptor):
        """The instrumentation's interceptor, with writer streams too.

        Its stream wrapper iterates the handler (``async for``), which only
        works for an async generator. authsvc's server-streaming handlers
        (the edge's WatchRevocations, grpc's Health.Watch) are coroutines
        that ``context.write()`` (see EdgeInterceptor._wrap_stream for why);
        those get the same span and context wrapper around an ``await``.
        The instrumentation records no request, response or metadata value
        (only rpc.*, the peer address and user agent), and on abort the
        status description only for server-fault codes, whose messages here
        are fixed texts.
        """

        def _intercept_aio_server_stream(self, behavior: Any, details: Any) -> Any:
            if inspect.isasyncgenfunction(behavior):
                return super()._intercept_aio_server_stream(  # type: ignore[no-untyped-call]
                    behavior, details
                )

            async def write_stream(request: Any, context: Any) -> Any:
                with (
                    self._set_remote_context(context),
                    self._start_span(  # type: ignore[no-untyped-call]
                        details, context, set_status_on_exception=False
                    ) as span,
                ):
                    wrapped = _OpenTelemetryAioServicerContext(  # type: ignore[no-untyped-call]
                        context, span
                    )
                    return await behavior(request, wrapped)

            return write_stream

    # The scope aio_server_interceptor() would give it.
    tracer = provider.get_tracer(
        "opentelemetry.instrumentation.grpc",
        __version__,
        schema_url="https://opentelemetry.io/schemas/1.11.0",
    )
    interceptor: grpc.aio.ServerInterceptor = RpcSpans(tracer)  # type: ignore[no-untyped-call]
    return interceptor
