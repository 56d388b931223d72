"""Traces: OpenTelemetry spans sent over OTLP/gRPC to a real receiver.

``authsvc serve`` runs as a subprocess configured only by the standard
``OTEL_*`` variables, exporting to an in-test OTLP trace receiver on loopback
(tests/otlp.py). One sign-in sent with a ``traceparent`` must come back as a
span tree under the test's span (the RPC's server span, its SQL statements,
its Redis commands on Postgres+Redis), the log lines of that RPC must carry
its trace id, and nothing received may hold a secret or the email.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from authsvc.app import build_server
from authsvc.security.secrets import sha256
from authsvc.storage import migrate
from authsvc.storage.database import create_engine
from authsvc.tracing import Tracing, enabled
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.app import (
    API_KEY,
    API_KEYS,
    PASSWORD,
    SECRET_KEY,
    Backend,
    find_leaks,
    remember,
    remember_bytes,
)
from tests.app import (
    test_settings as make_settings,
)
from tests.otlp import CLIENT, SERVER, Receiver, Span, descendants
from tests.processes import assert_no_secrets, clean_env, env_secrets, spawn_authsvc

OTEL_PREFIX = "OTEL_"


def _no_otel_env(**settings: str) -> dict[str, str]:
    """clean_env without any OTEL_* of the machine running the suite."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(OTEL_PREFIX)}
    env.update(settings)
    return env


def _traceparent() -> tuple[str, str, str]:
    """(trace id, span id, the W3C traceparent header naming them, sampled)."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


# -- authsvc serve as a subprocess ---------------------------------------------------


@dataclass
class Served:
    """``authsvc serve``, its stderr read as it comes (JSON log lines)."""

    proc: asyncio.subprocess.Process
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, env: dict[str, str], cwd: Path) -> Served:
        served = cls(await spawn_authsvc("serve", env=env, cwd=cwd), env)
        served._reader = asyncio.create_task(served._read())
        waiter = asyncio.create_task(served._started.wait())
        exited = asyncio.create_task(served.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=60, return_when="FIRST_COMPLETED")
        waiter.cancel()
        exited.cancel()
        if not served._started.is_set():
            await served.stop()
            raise AssertionError(f"authsvc serve did not start:\n{served.stderr}")
        # Answered: serve() is back in its loop, with its SIGTERM handler
        # installed (it is, right after the "server.started" line).
        async with grpc.aio.insecure_channel(served.target) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        return served

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            event = _json(line)
            if event.get("event") == "server.started":
                self.port = int(event["port"])
                self._started.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def log(self) -> list[dict[str, Any]]:
        return [event for event in map(_json, self.lines) if event]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> int:
        """SIGTERM (the process flushes its spans and exits), then its exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        assert_no_secrets(self.stderr, *env_secrets(self.env), proc=self.proc)
        assert self.proc.returncode is not None
        return self.proc.returncode


def _json(line: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict):
            return event
    return {}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture(params=["embedded", "postgres"])
def storage(request: pytest.FixtureRequest) -> dict[str, str]:
    """AUTHSVC_* of a fresh database: an embedded SQLite, or a Postgres
    database of its own (migrated) with the session's Redis."""
    if request.param == "embedded":
        return {}
    url = request.getfixturevalue("make_postgres_db")()
    migrate.upgrade(url)
    return {"AUTHSVC_DATABASE_URL": url, "AUTHSVC_REDIS_URL": request.getfixturevalue("redis_url")}


def _serve_env(tmp_path: Path, storage: dict[str, str], **otel: str) -> dict[str, str]:
    return _no_otel_env(
        AUTHSVC_DATA_DIR=str(tmp_path / "data"),
        AUTHSVC_LISTEN="127.0.0.1:0",
        AUTHSVC_SECRET_KEY=SECRET_KEY,
        AUTHSVC_API_KEYS=API_KEYS,
        AUTHSVC_ARGON2_MEMORY_KIB="1024",
        AUTHSVC_ARGON2_TIME_COST="1",
        AUTHSVC_LOG_FORMAT="json",
        AUTHSVC_SHUTDOWN_GRACE="1",
        **storage,
        **otel,
    )


@dataclass
class Calls:
    """What the calls of one user sent and got."""

    email: str
    tokens: list[str] = field(default_factory=list)


async def _sign_up_and_in(target: str, traceparent: str) -> Calls:
    """Sign-up (untraced by us), then the traced sign-in (with the API key,
    so its hash is checked too), Authenticate and Refresh with the tokens,
    a wrong password and a second sign-up of the same email (errors)."""
    calls = Calls(email=f"Trace-{uuid.uuid4().hex[:10]}@Example.com")
    async with grpc.aio.insecure_channel(target) as channel:
        auth: Any = auth_pb2_grpc.AuthServiceStub(channel)
        up = await auth.SignUp(
            auth_pb2.SignUpRequest(email=calls.email, password=PASSWORD), timeout=10
        )
        signed = await auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=calls.email, password=PASSWORD),
            metadata=(("traceparent", traceparent), ("x-api-key", API_KEY)),
            timeout=10,
        )
        tokens = signed.result.tokens
        await auth.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=tokens.access_token), timeout=10
        )
        refreshed = await auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10
        )
        calls.tokens = [
            up.result.tokens.access_token,
            up.result.tokens.refresh_token,
            tokens.access_token,
            tokens.refresh_token,
            refreshed.tokens.access_token,
            refreshed.tokens.refresh_token,
        ]
        remember(*calls.tokens)
        for call in (
            auth.SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(email=calls.email, password=PASSWORD + "x"),
                timeout=10,
            ),
            auth.SignUp(auth_pb2.SignUpRequest(email=calls.email, password=PASSWORD), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError):
                await call
    return calls


def _assert_nothing_secret(text: str, calls: Calls) -> None:
    """No password, token, token hash, API key or email in ``text``."""
    for token in calls.tokens:
        if token.startswith("rt_"):
            remember_bytes(sha256(token))  # the refresh token's hash, as stored
    email = calls.email
    leaks = find_leaks(text, PASSWORD, API_KEY, email, email.lower(), email.split("@")[0])
    assert not leaks, f"the spans show {', '.join(leaks)}"


# -- the span tree of one sign-in ------------------------------------------------------


async def test_a_sign_in_is_a_span_tree_under_the_callers_span(
    receiver: Receiver, storage: dict[str, str], tmp_path: Path
) -> None:
    postgres = bool(storage)
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    if postgres:  # the service name and resource attributes from the environment
        otel["OTEL_SERVICE_NAME"] = "authsvc-eu"
        otel["OTEL_RESOURCE_ATTRIBUTES"] = "deployment.environment=test,service.namespace=auth"
    served = await Served.start(_serve_env(tmp_path, storage, **otel), tmp_path)
    try:
        trace_id, caller_span, traceparent = _traceparent()
        calls = await _sign_up_and_in(served.target, traceparent)

        def signed_in(spans: list[Span]) -> bool:
            return any(s.trace_id == trace_id and s.span.kind == SERVER for s in spans)

        await receiver.wait_for(signed_in, "the sign-in's server span")
    finally:
        assert await served.stop() == 0
    spans = receiver.spans()  # now with everything flushed at stop

    (rpc,) = [s for s in spans if s.trace_id == trace_id and s.parent_id == caller_span]
    assert rpc.span.kind == SERVER
    assert rpc.name == "/authsvc.v1.AuthService/SignInWithPassword"
    assert rpc.attributes["rpc.service"] == "authsvc.v1.AuthService"
    assert rpc.attributes["rpc.method"] == "SignInWithPassword"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    below = descendants(spans, rpc)
    assert {s.span_id for s in below} == {
        s.span_id for s in spans if s.trace_id == trace_id and s is not rpc
    }, "every other span of the trace hangs under the RPC's"
    statements = [s for s in below if s.attributes.get("db.system") != "redis"]
    system = "postgresql" if postgres else "sqlite"
    assert statements
    assert all(s.attributes["db.system"] == system for s in statements)
    assert all(s.span.kind == CLIENT for s in below)
    texts = [s.attributes["db.statement"] for s in statements]
    assert any(t.startswith("SELECT") and "FROM users" in t for t in texts), texts
    assert any(t.startswith("INSERT INTO sessions") for t in texts), texts
    commands = [s for s in below if s.attributes.get("db.system") == "redis"]
    if postgres:  # the rate limiter's script, per email and per IP
        assert commands, [s.name for s in below]
        for command in commands:  # "INCRBY ? ?\nEXPIRE ? ? ?\nTTL ?": names only
            for line in command.attributes["db.statement"].splitlines():
                name, *args = line.split()
                assert name.isupper()
                assert set(args) <= {"?"}, line
    else:
        assert not commands

    # Only RPCs make traces: the relay's polls and the key reloads make none.
    roots = [s for s in spans if not s.parent_id or s.parent_id == caller_span]
    assert roots
    assert all(s.span.kind == SERVER for s in roots), {s.name for s in roots}
    names = {s.name for s in roots}
    for method in ("SignUp", "SignInWithPassword", "Authenticate", "RefreshToken"):
        assert f"/authsvc.v1.AuthService/{method}" in names
    # The failed calls: their codes, an error status only for server faults
    # (none here), as the instrumentation does.
    codes = sorted(s.attributes["rpc.grpc.status_code"] for s in roots)
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] in codes
    assert grpc.StatusCode.ALREADY_EXISTS.value[0] in codes

    resource = rpc.resource
    if postgres:
        assert resource["service.name"] == "authsvc-eu"
        assert resource["deployment.environment"] == "test"
        assert resource["service.namespace"] == "auth"
    else:
        assert resource["service.name"] == "authsvc"

    # The RPC's log lines carry its trace and span ids; lines outside a span none.
    log = served.log()
    (line,) = [e for e in log if e.get("event") == "rpc" and e.get("trace_id") == trace_id]
    assert line["method"] == "/authsvc.v1.AuthService/SignInWithPassword"
    assert line["span_id"] == rpc.span_id
    assert [e for e in log if e.get("trace_id") == trace_id and e["event"] == "user.signed_in"]
    assert all(e.get("span_id") == rpc.span_id for e in log if e.get("trace_id") == trace_id)
    started = [e for e in log if e["event"] == "server.started"]
    assert started
    assert "trace_id" not in started[0]
    rpc_lines = [e for e in log if e["event"] == "rpc"]
    assert len(rpc_lines) >= 6
    assert all("trace_id" in e for e in rpc_lines)

    _assert_nothing_secret(receiver.text(), calls)


# -- off by default ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "authsvc"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_traces_are_on_only_when_an_otlp_endpoint_is_set(environ: dict[str, str], on: bool) -> None:
    assert enabled(environ) is on


def _otel_imports(stderr: str) -> list[str]:
    """The OpenTelemetry trace SDK, exporter and instrumentation modules that
    ``python -X importtime`` (PYTHONPROFILEIMPORTTIME) saw imported.

    Not the whole of ``opentelemetry.sdk``: redis-py 8 imports the metrics
    SDK for observability of its own, whatever authsvc does.
    """
    found = []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            module = line.rsplit("|", 1)[-1].strip()
            if module.startswith(
                (
                    "opentelemetry.sdk.trace",
                    "opentelemetry.instrumentation",
                    "opentelemetry.exporter",
                )
            ):
                found.append(module)
    return found


@pytest.mark.parametrize(
    "otel",
    [
        {},
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_SERVICE_NAME": "authsvc"},
    ],
    ids=["no-otel-env", "sdk-disabled", "exporter-none", "empty-endpoint"],
)
async def test_off_sends_nothing_and_imports_nothing(
    receiver: Receiver, otel: dict[str, str], tmp_path: Path
) -> None:
    if otel.get("OTEL_SDK_DISABLED") or otel.get("OTEL_TRACES_EXPORTER"):
        otel = {**otel, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    env = _serve_env(tmp_path, {}, **otel, PYTHONPROFILEIMPORTTIME="1")
    served = await Served.start(env, tmp_path)
    try:
        _, _, traceparent = _traceparent()
        calls = await _sign_up_and_in(served.target, traceparent)
        await asyncio.sleep(0.5)  # what a 100 ms batch delay would have sent by now
    finally:
        assert await served.stop() == 0
    assert receiver.requests == []
    assert _otel_imports(served.stderr) == []
    assert not [e for e in served.log() if "trace_id" in e]
    assert calls.tokens


async def test_the_server_imports_the_sdk_when_on(receiver: Receiver, tmp_path: Path) -> None:
    """The check above can fail: on, the same process imports the SDK."""
    env = _serve_env(
        tmp_path, {}, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, PYTHONPROFILEIMPORTTIME="1"
    )
    served = await Served.start(env, tmp_path)
    assert await served.stop() == 0
    imported = _otel_imports(served.stderr)
    assert "opentelemetry.sdk.trace" in imported
    assert "opentelemetry.instrumentation.grpc" in imported


def _interceptors_of_servers(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Records the interceptors every grpc.aio.server built from now on gets."""
    seen: list[list[Any]] = []
    real = grpc.aio.server

    def server(**kwargs: Any) -> grpc.aio.Server:
        seen.append(list(kwargs.get("interceptors") or ()))
        return real(**kwargs)

    monkeypatch.setattr(grpc.aio, "server", server)
    return seen


def _statement_hooks(engine: AsyncEngine) -> int:
    return len(engine.sync_engine.dispatch.before_cursor_execute)


@pytest.mark.parametrize("traced", [False, True], ids=["off", "on"])
async def test_build_server_instruments_only_when_given_tracing(
    backend_urls: Backend,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    traced: bool,
) -> None:
    seen = _interceptors_of_servers(monkeypatch)
    tracing = None
    if traced:
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)
        tracing = Tracing.exporting_to(exporter)
    server = await build_server(make_settings(tmp_path, **backend_urls.urls), tracing=tracing)
    await server.start()
    try:
        (interceptors,) = seen
        names = [type(i).__name__ for i in interceptors]
        assert names == (["RpcSpans", "EdgeInterceptor"] if traced else ["EdgeInterceptor"])
        assert _statement_hooks(server.core.db.engine) == (1 if traced else 0)
        if server.core.redis is not None:
            instrumented = getattr(server.core.redis, "_is_instrumented_by_opentelemetry", False)
            assert instrumented is traced
    finally:
        await server.stop(0)


# -- streams, health and reflection under the RPC interceptor -----------------------


async def test_streams_are_traced_and_still_stream(receiver: Receiver, tmp_path: Path) -> None:
    """The edge's WatchRevocations and grpc's Health.Watch write with
    context.write() (no async generator), reflection yields: all three
    still work under the RPC interceptor, and each gets its server span."""
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)
    server = await build_server(make_settings(tmp_path), tracing=Tracing.exporting_to(exporter))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            auth: Any = auth_pb2_grpc.AuthServiceStub(channel)
            watch = auth.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after=""), metadata=(("x-api-key", API_KEY),)
            )
            first = await asyncio.wait_for(watch.read(), 10)
            assert first.position
            watch.cancel()
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            status = await asyncio.wait_for(health.read(), 10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            health.cancel()
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await asyncio.wait_for(reflect.read(), 10)
            assert "authsvc.v1.AuthService" in {
                s.name for s in listed.list_services_response.service
            }
            await reflect.done_writing()
            # A refused stream: the edge aborts it (NOT_AUTHENTICATED), the span has the code.
            refused = auth.WatchRevocations(auth_pb2.WatchRevocationsRequest(after=""))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(refused.read(), 10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)
    methods = {
        "/authsvc.v1.AuthService/WatchRevocations",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
    spans = receiver.spans()
    assert methods <= {s.name for s in spans if s.span.kind == SERVER}
    codes = {
        s.attributes["rpc.grpc.status_code"]
        for s in spans
        if s.name == "/authsvc.v1.AuthService/WatchRevocations"
    }
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] in codes


# -- a collector that is down or hangs costs the RPCs nothing ---------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("collector", ["closed-port", "hanging"])
async def test_a_collector_down_or_hanging_does_not_fail_rpcs(
    receiver: Receiver, collector: str, tmp_path: Path
) -> None:
    if collector == "hanging":
        receiver.hang = True
        endpoint = receiver.endpoint
    else:
        endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = _serve_env(
        tmp_path,
        {},
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
    )
    served = await Served.start(env, tmp_path)
    try:
        for _ in range(3):
            _, _, traceparent = _traceparent()
            calls = await _sign_up_and_in(served.target, traceparent)
            assert len(calls.tokens) == 6
    finally:
        # It still stops by itself, within the exporter's timeout.
        assert await served.stop() == 0
    assert receiver.requests == []


# -- a failed statement's span says what failed, not the driver's message --------------


async def test_a_failed_statement_span_does_not_quote_the_driver(
    receiver: Receiver, postgres_dsn: str
) -> None:
    """asyncpg quotes the bad argument ("invalid input for query argument $1:
    '...'"), Postgres a bad value too; the span's status names the error's
    class and SQLSTATE only."""
    tracing = Tracing.exporting_to(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)
    )
    engine = create_engine(postgres_dsn, pool_size=1, pgbouncer=False)
    tracing.instrument_engine(engine)
    quoted = f"not-a-uuid-{uuid.uuid4().hex}"
    tracer = tracing.provider.get_tracer(__name__)
    try:
        # Inside a server span: the sampler keeps statements of RPCs only.
        with tracer.start_as_current_span("rpc", kind=SpanKind.SERVER):
            async with engine.connect() as conn:
                with pytest.raises(DBAPIError, match="uuid"):
                    await conn.execute(text("SELECT CAST(:v AS uuid)"), {"v": quoted})
    finally:
        await engine.dispose()
        await tracing.shutdown()
    (failed,) = [s for s in receiver.spans() if s.span.kind == CLIENT]
    assert failed.attributes["db.statement"] == "SELECT CAST($1 AS uuid)"
    assert failed.span.status.code == failed.span.status.STATUS_CODE_ERROR
    # The class SQLAlchemy gives it, and a data exception's SQLSTATE (asyncpg
    # refuses the argument itself: 22000, and quotes it).
    assert failed.span.status.message.startswith("DBAPIError SQLSTATE 22")
    assert quoted not in receiver.text()
