"""Prometheus metrics: one registry per server, and its ``/metrics`` endpoint.

Built by the composition root only when ``AUTHSVC_METRICS_LISTEN`` is set;
otherwise nothing here is constructed, nothing is counted, and services get
``authsvc.domain.metrics.NoMetrics``. There is no global registry: every
:class:`~authsvc.app.Server` has its own (a test process runs many).

* gRPC server metrics under the names of go-grpc-prometheus / py-grpc-prometheus
  (``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_msg_received_total``, ``grpc_server_msg_sent_total``,
  ``grpc_server_handling_seconds``), counted by the edge interceptor. Every
  method's series exist from startup, made from the service descriptors, and
  a series is made only for a method this server serves: a name a client
  makes up never becomes a label value.
* authsvc's own (``authsvc_*``): what the services report through the
  :class:`~authsvc.domain.metrics.Metrics` port, and gauges read when
  Prometheus scrapes (bus health and lag, watchers, database pool, outbox),
  read on the server's event loop so nothing races the code that owns them.

Every label value comes from a fixed set (method names from the descriptors,
status code names, the tuples of ``authsvc.domain.metrics``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from authsvc.config import parse_listen
from authsvc.domain.metrics import (
    CACHE_RESULTS,
    HASH_OPS,
    LIMIT_KINDS,
    OUTCOMES,
    REFRESH_RESULTS,
)

#: Every status code name, the values of ``grpc_code``.
CODES = tuple(code.name for code in grpc.StatusCode)
#: The values of ``grpc_type``.
UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = (
    "unary",
    "client_stream",
    "server_stream",
    "bidi_stream",
)
#: Seconds a scrape waits for the gauges read on the event loop (the
#: outbox is a database query); past it they are left out of that scrape.
SAMPLE_TIMEOUT = 2.0
#: A call cancelled this close to its deadline ended by the deadline.
DEADLINE_SLACK = 0.1
#: Argon2 takes tens of milliseconds; waiting for a thread can take longer.
_HASH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def method_type(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming:
        return BIDI_STREAM if server_streaming else CLIENT_STREAM
    return SERVER_STREAM if server_streaming else UNARY


def handler_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    return method_type(handler.request_streaming, handler.response_streaming)


class MethodMetrics:
    """One method's label children, bound once: a call costs a few ``inc``."""

    __slots__ = ("handled", "received", "seconds", "sent", "started")

    def __init__(self, grpc: GrpcServerMetrics, service: str, method: str, kind: str) -> None:
        labels = (kind, service, method)
        self.started = grpc.started.labels(*labels)
        self.received = grpc.received.labels(*labels)
        self.sent = grpc.sent.labels(*labels)
        self.seconds = grpc.seconds.labels(*labels)
        self.handled = {code: grpc.handled.labels(*labels, code) for code in CODES}

    def begin(self, context: grpc.aio.ServicerContext[Any, Any], now: float) -> float | None:
        """Counts a started call; returns its deadline (``perf_counter`` time)."""
        self.started.inc()
        remaining = context.time_remaining()
        return None if remaining is None else now + remaining

    def end(self, code: str, started: float, deadline: float | None) -> None:
        now = time.perf_counter()
        if code == "CANCELLED" and deadline is not None and now >= deadline - DEADLINE_SLACK:
            # grpc cancels the handler alike when the client goes away and
            # when the deadline passes; the caller saw DEADLINE_EXCEEDED. The
            # client's own timer may fire (and cancel the call) a moment
            # before this side's deadline, which started when the request
            # arrived: hence the slack.
            code = "DEADLINE_EXCEEDED"
        self.handled[code].inc()
        self.seconds.observe(now - started)


class GrpcServerMetrics:
    """The go-grpc-prometheus server metrics, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        names = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", names, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            (*names, "grpc_code"),
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received",
            "RPC stream messages received by the server.",
            names,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent",
            "gRPC stream messages sent by the server.",
            names,
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            names,
            registry=registry,
        )
        self._methods: dict[str, MethodMetrics] = {}
        self._lock = threading.Lock()

    def add_services(self, services: Iterable[ServiceDescriptor]) -> None:
        """Makes every method's series (at zero) before the first call."""
        for service in services:
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                self._add(path, method_type(m.client_streaming, m.server_streaming))

    def method(self, path: str, kind: str) -> MethodMetrics:
        """The children of a method this server serves (``path`` is
        ``/package.Service/Method``; only ever called with a path the server
        found a handler for)."""
        found = self._methods.get(path)
        return found if found is not None else self._add(path, kind)

    def _add(self, path: str, kind: str) -> MethodMetrics:
        with self._lock:
            found = self._methods.get(path)
            if found is None:
                service, _, name = path.lstrip("/").rpartition("/")
                found = self._methods[path] = MethodMetrics(self, service, name, kind)
            return found


class ServiceMetrics:
    """The ``Metrics`` port (``authsvc.domain.metrics``) on a registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        sign_ups = Counter(
            "authsvc_sign_ups", "SignUp calls by outcome.", ("outcome",), registry=registry
        )
        sign_ins = Counter(
            "authsvc_sign_ins",
            "SignInWithPassword calls by outcome.",
            ("outcome",),
            registry=registry,
        )
        refreshes = Counter(
            "authsvc_refresh_tokens",
            "Refresh-token exchanges: rotated, grace (the current token again), "
            "reused (reuse detected, session revoked).",
            ("result",),
            registry=registry,
        )
        limited = Counter(
            "authsvc_rate_limited",
            "Sign-up and sign-in attempts refused by a rate limit, by limit.",
            ("limit",),
            registry=registry,
        )
        cache = Counter(
            "authsvc_authenticate_cache",
            "Authenticate resolutions: hit (from the cache), miss, bypass (cache "
            "not trusted: the revocation bus is unhealthy).",
            ("result",),
            registry=registry,
        )
        wait = Histogram(
            "authsvc_password_hash_wait_seconds",
            "Time a password hash or verify waited for a hasher thread.",
            ("op",),
            buckets=_HASH_BUCKETS,
            registry=registry,
        )
        took = Histogram(
            "authsvc_password_hash_seconds",
            "Time a password hash or verify took in its thread.",
            ("op",),
            buckets=_HASH_BUCKETS,
            registry=registry,
        )
        self._sign_ups = {o: sign_ups.labels(o) for o in OUTCOMES}
        self._sign_ins = {o: sign_ins.labels(o) for o in OUTCOMES}
        self._refreshes = {r: refreshes.labels(r) for r in REFRESH_RESULTS}
        self._limited = {k: limited.labels(k) for k in LIMIT_KINDS}
        self._cache = {r: cache.labels(r) for r in CACHE_RESULTS}
        self._hash = {op: (wait.labels(op), took.labels(op)) for op in HASH_OPS}

    def sign_up(self, outcome: str) -> None:
        self._sign_ups[outcome].inc()

    def sign_in(self, outcome: str) -> None:
        self._sign_ins[outcome].inc()

    def refresh(self, result: str) -> None:
        self._refreshes[result].inc()

    def rate_limited(self, kind: str) -> None:
        self._limited[kind].inc()

    def authenticate_cache(self, result: str) -> None:
        self._cache[result].inc()

    def password_hash(self, op: str, wait: float, duration: float) -> None:
        waited, took = self._hash[op]
        waited.observe(wait)
        took.observe(duration)


@dataclass(frozen=True)
class Sample:
    """The gauges read at a scrape (on the event loop)."""

    bus_healthy: bool
    bus_lag: float
    bus_source: str  # "redis" or "database"
    watchers: int
    pool_in_use: int
    pool_waiting: int
    outbox: tuple[int, float] | None  # (depth, oldest age s); None: unreadable


class SampledCollector(Collector):
    """Gauges computed when Prometheus scrapes, by a coroutine run on the
    server's loop (the scrape itself runs in the HTTP server's thread)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sample: Callable[[], Awaitable[Sample]]
    ) -> None:
        self._loop = loop
        self._sample = sample

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._loop.is_closed() or _on_loop(self._loop):
            return
        future = asyncio.run_coroutine_threadsafe(_call(self._sample), self._loop)
        try:
            s = future.result(SAMPLE_TIMEOUT)
        except Exception:  # a loop stopping, a timeout: this scrape goes without
            future.cancel()
            return
        yield GaugeMetricFamily(
            "authsvc_revocation_bus_healthy",
            "1 while the revocation bus follows the event log (from Redis, or "
            "from the database while Redis is down) within the max lag; 0 while "
            "it may miss events (Authenticate then bypasses its cache).",
            value=1.0 if s.bus_healthy else 0.0,
        )
        yield GaugeMetricFamily(
            "authsvc_revocation_bus_lag_seconds",
            "Seconds since the revocation bus last read the event log.",
            value=s.bus_lag,
        )
        source = GaugeMetricFamily(
            "authsvc_revocation_bus_source",
            "Where the revocation bus reads the event log: 1 for the current source.",
            labels=("source",),
        )
        for name in ("redis", "database"):
            source.add_metric((name,), 1.0 if s.bus_source == name else 0.0)
        yield source
        yield GaugeMetricFamily(
            "authsvc_revocation_watchers",
            "Open WatchRevocations streams on this server.",
            value=s.watchers,
        )
        yield GaugeMetricFamily(
            "authsvc_db_pool_in_use",
            "Database connections checked out of the pool.",
            value=s.pool_in_use,
        )
        yield GaugeMetricFamily(
            "authsvc_db_pool_waiting",
            "Database work waiting for a pooled connection (checkout or connect).",
            value=s.pool_waiting,
        )
        if s.outbox is not None:
            yield GaugeMetricFamily(
                "authsvc_outbox_depth",
                "Committed events not yet given a log position, or (with Redis) "
                "not yet copied to the Redis stream.",
                value=s.outbox[0],
            )
            yield GaugeMetricFamily(
                "authsvc_outbox_oldest_age_seconds",
                "Age of the oldest of those events (0 when there is none).",
                value=s.outbox[1],
            )


async def _call(sample: Callable[[], Awaitable[Sample]]) -> Sample:
    return await sample()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class MetricsEndpoint:
    """prometheus-client's HTTP server for one registry (``/metrics``)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self._registry = registry
        self._host, self._port = parse_listen(listen)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (once started)."""
        return self._httpd.server_port if self._httpd is not None else self._port

    def start(self) -> None:
        """Raises: OSError (the address cannot be bound)."""
        self._httpd, self._thread = start_http_server(
            self._port, self._host, registry=self._registry
        )

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
