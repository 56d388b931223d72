"""Prometheus metrics: the /metrics endpoint of a real server, scraped over HTTP
after real gRPC calls.

Each test has a server of its own (``own_server`` with a metrics port), so the
counters it reads move only by its own calls: every check is a delta of
exactly the calls made. Both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from authsvc.app import INFRA_SERVICES, SERVICES, MetricsListenError, build_server
from authsvc.config import Settings
from authsvc.domain.metrics import (
    CACHE_RESULTS,
    HASH_OPS,
    LIMIT_KINDS,
    OUTCOMES,
    REFRESH_RESULTS,
    NoMetrics,
)
from authsvc.metrics import CODES
from authsvc_client.v1 import auth_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    bearer,
    failure,
    find_leaks,
    remember,
    service,
    stop_api,
)
from tests.app import test_settings as settings_for
from tests.scrape import Samples, delta, get, parse, rpc, value

MetricsServer = Callable[..., Awaitable[Api]]

#: Every label any authsvc metric may carry, with every value it may take.
ALLOWED: dict[str, set[str]] = {
    "grpc_service": {s.full_name for s in (*SERVICES, *INFRA_SERVICES)},
    "grpc_method": {m.name for s in (*SERVICES, *INFRA_SERVICES) for m in s.methods},
    "grpc_type": {"unary", "client_stream", "server_stream", "bidi_stream"},
    "grpc_code": set(CODES),
    "outcome": set(OUTCOMES),
    "result": set(REFRESH_RESULTS) | set(CACHE_RESULTS),
    "limit": set(LIMIT_KINDS),
    "op": set(HASH_OPS),
    "source": {"redis", "database"},
}


@pytest.fixture
async def metered(own_server: MetricsServer) -> MetricsServer:
    """Starts a server of this test's own with metrics on a free port."""

    async def start(**overrides: Any) -> Api:
        api = await own_server(metrics_listen="127.0.0.1:0", **overrides)
        # With Redis the follower's first read clears the Authenticate cache:
        # counts of hits start once it has read.
        await until(api, lambda s: value(s, "authsvc_revocation_bus_healthy") == 1, "bus healthy")
        return api

    return start


async def scrape_text(api: Api) -> str:
    port = api.server.metrics_port
    assert port is not None
    return await asyncio.to_thread(get, port)


async def scrape(api: Api) -> Samples:
    return parse(await scrape_text(api))


async def until(
    api: Api, check: Callable[[Samples], bool], what: str, within: float = 10.0
) -> Samples:
    """Scrapes until ``check`` holds (the server counts a cancelled stream in
    its own task, a moment after the client has gone)."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(api)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


async def test_every_method_has_its_series_before_the_first_call(metered: MetricsServer) -> None:
    api = await metered()
    samples = await scrape(api)
    for svc in SERVICES:
        for m in svc.methods:
            kind = "server_stream" if m.server_streaming else "unary"
            labels = rpc(m.name, svc.full_name, kind)
            assert ("grpc_server_started_total", frozenset(labels.items())) in samples
            for code in ("OK", "UNAUTHENTICATED", "DEADLINE_EXCEEDED"):
                key = frozenset({**labels, "grpc_code": code}.items())
                assert samples[("grpc_server_handled_total", key)] == 0
    health = rpc("Check", "grpc.health.v1.Health")
    assert value(samples, "grpc_server_started_total", **health) == 0
    assert ("grpc_server_started_total", frozenset(health.items())) in samples
    for outcome in OUTCOMES:
        assert ("authsvc_sign_ins_total", frozenset({("outcome", outcome)})) in samples


async def test_calls_move_the_counters_by_exactly_the_calls_made(
    metered: MetricsServer,
) -> None:
    api = await metered(refresh_reuse_grace=0.0)
    before = await scrape(api)
    email = f"m-{uuid.uuid4().hex[:10]}@example.com"

    signed_up = await api.sign_up(email)
    wrong = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=email, password="wrong password!")
        )
    )
    assert wrong.reason == "INVALID_CREDENTIALS"
    bad = await failure(
        api.auth.SignInWithPassword(auth_pb2.SignInWithPasswordRequest(email="", password="x"))
    )
    assert bad.reason == "INVALID_ARGUMENT"
    signed_in = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD)
    )
    tokens = signed_in.result.tokens
    remember(tokens.access_token, tokens.refresh_token)

    # Authenticate: resolved (a miss), then from the cache (a hit); a garbage
    # token is a miss that fails.
    for _ in range(2):
        await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=tokens.access_token))
    garbage = await failure(
        api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token="not-a-token"))
    )
    assert garbage.reason == "TOKEN_INVALID"
    # No credential at all: refused at the edge.
    anonymous = await failure(api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest()))
    assert anonymous.reason == "NOT_AUTHENTICATED"

    refreshed = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=signed_up.tokens.refresh_token)
    )
    remember(refreshed.tokens.access_token, refreshed.tokens.refresh_token)
    reused = await failure(
        api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=signed_up.tokens.refresh_token)
        )
    )
    assert reused.reason == "REFRESH_TOKEN_REUSED"

    health: Any = health_pb2_grpc.HealthStub(api.channel)
    await health.Check(health_pb2.HealthCheckRequest())
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    after = await scrape(api)

    def handled(method: str, code: str, svc: str = "authsvc.v1.AuthService") -> float:
        return delta(before, after, "grpc_server_handled_total", **rpc(method, svc), grpc_code=code)

    def started(method: str, svc: str = "authsvc.v1.AuthService") -> float:
        return delta(before, after, "grpc_server_started_total", **rpc(method, svc))

    assert started("SignUp") == 1
    assert handled("SignUp", "OK") == 1
    assert started("SignInWithPassword") == 3
    assert handled("SignInWithPassword", "OK") == 1
    assert handled("SignInWithPassword", "UNAUTHENTICATED") == 1
    assert handled("SignInWithPassword", "INVALID_ARGUMENT") == 1
    assert started("Authenticate") == 3
    assert handled("Authenticate", "OK") == 2
    assert handled("Authenticate", "UNAUTHENTICATED") == 1
    assert handled("GetCurrentUser", "UNAUTHENTICATED", "authsvc.v1.UserService") == 1
    assert handled("RefreshToken", "OK") == 1
    assert handled("RefreshToken", "UNAUTHENTICATED") == 1
    assert handled("Check", "OK", "grpc.health.v1.Health") == 1
    assert handled("Check", "NOT_FOUND", "grpc.health.v1.Health") == 1
    # Unary: a message in for every call that got past the edge's parse, one
    # out for each that succeeded.
    auth = rpc("Authenticate")
    assert delta(before, after, "grpc_server_msg_received_total", **auth) == 3
    assert delta(before, after, "grpc_server_msg_sent_total", **auth) == 2
    assert delta(before, after, "grpc_server_handling_seconds_count", **auth) == 3
    assert delta(before, after, "grpc_server_handling_seconds_count", **rpc("SignUp")) == 1

    assert delta(before, after, "authsvc_sign_ups_total", outcome="success") == 1
    assert delta(before, after, "authsvc_sign_ins_total", outcome="success") == 1
    assert delta(before, after, "authsvc_sign_ins_total", outcome="invalid_credentials") == 1
    assert delta(before, after, "authsvc_sign_ins_total", outcome="invalid_argument") == 1
    assert delta(before, after, "authsvc_refresh_tokens_total", result="rotated") == 1
    assert delta(before, after, "authsvc_refresh_tokens_total", result="reused") == 1
    assert delta(before, after, "authsvc_refresh_tokens_total", result="grace") == 0
    assert delta(before, after, "authsvc_authenticate_cache_total", result="hit") == 1
    assert delta(before, after, "authsvc_authenticate_cache_total", result="miss") == 2
    # One hash (sign-up), two verifies (the wrong and the right password).
    assert delta(before, after, "authsvc_password_hash_seconds_count", op="hash") == 1
    assert delta(before, after, "authsvc_password_hash_seconds_count", op="verify") == 2
    assert delta(before, after, "authsvc_password_hash_wait_seconds_count", op="verify") == 2


async def test_a_refresh_within_the_grace_interval_counts_as_grace(
    metered: MetricsServer,
) -> None:
    api = await metered(refresh_reuse_grace=60.0)
    signed_up = await api.sign_up()
    before = await scrape(api)
    request = auth_pb2.RefreshTokenRequest(refresh_token=signed_up.tokens.refresh_token)
    first = await api.auth.RefreshToken(request)
    again = await api.auth.RefreshToken(request)
    assert again.tokens.refresh_token == first.tokens.refresh_token
    remember(first.tokens.access_token, first.tokens.refresh_token, again.tokens.access_token)
    after = await scrape(api)
    assert delta(before, after, "authsvc_refresh_tokens_total", result="rotated") == 1
    assert delta(before, after, "authsvc_refresh_tokens_total", result="grace") == 1


async def test_rate_limit_refusals_count_by_limit(metered: MetricsServer) -> None:
    api = await metered(signin_attempts_per_email=2, signin_attempts_per_ip=1_000)
    email = f"rl-{uuid.uuid4().hex[:10]}@example.com"
    before = await scrape(api)
    request = auth_pb2.SignInWithPasswordRequest(email=email, password="wrong password!")
    reasons = [(await failure(api.auth.SignInWithPassword(request))).reason for _ in range(3)]
    assert reasons == ["INVALID_CREDENTIALS", "INVALID_CREDENTIALS", "RATE_LIMITED"]
    after = await scrape(api)
    assert delta(before, after, "authsvc_rate_limited_total", limit="email") == 1
    assert delta(before, after, "authsvc_rate_limited_total", limit="ip") == 0
    assert delta(before, after, "authsvc_sign_ins_total", outcome="rate_limited") == 1
    labels = rpc("SignInWithPassword")
    assert (
        delta(before, after, "grpc_server_handled_total", **labels, grpc_code="RESOURCE_EXHAUSTED")
        == 1
    )


async def test_streams_cancellations_and_deadlines_end_with_their_own_code(
    metered: MetricsServer,
) -> None:
    api = await metered()
    watch = rpc("WatchRevocations", kind="server_stream")
    before = await scrape(api)
    assert value(before, "authsvc_revocation_watchers") == 0

    # Opened, read, then cancelled by the client.
    stream = api.auth.WatchRevocations(auth_pb2.WatchRevocationsRequest(), metadata=service())
    await asyncio.wait_for(stream.read(), 10)
    # The server counts a message once its write has returned, which may be
    # a moment after the client has read it.
    opened = await until(
        api,
        lambda s: delta(before, s, "grpc_server_msg_sent_total", **watch) >= 1,
        "the first message counted",
    )
    assert value(opened, "authsvc_revocation_watchers") == 1
    assert delta(before, opened, "grpc_server_started_total", **watch) == 1
    stream.cancel()
    cancelled = await until(
        api,
        lambda s: (
            delta(before, s, "grpc_server_handled_total", **watch, grpc_code="CANCELLED") == 1
        ),
        "the cancelled stream counted",
    )
    assert value(cancelled, "authsvc_revocation_watchers") == 0

    # Ended by its deadline: the caller sees DEADLINE_EXCEEDED, and so does the count.
    late = api.auth.WatchRevocations(
        auth_pb2.WatchRevocationsRequest(), metadata=service(), timeout=0.5
    )
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await _read_to_end(late)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    done = await until(
        api,
        lambda s: (
            delta(before, s, "grpc_server_handled_total", **watch, grpc_code="DEADLINE_EXCEEDED")
            == 1
        ),
        "the expired stream counted",
    )
    assert delta(before, done, "grpc_server_handled_total", **watch, grpc_code="CANCELLED") == 1
    assert delta(before, done, "grpc_server_handling_seconds_count", **watch) == 2
    # Without credentials: refused before it streams anything.
    refused = await failure(api.auth.WatchRevocations(auth_pb2.WatchRevocationsRequest()).read())
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    last = await until(
        api,
        lambda s: (
            delta(before, s, "grpc_server_handled_total", **watch, grpc_code="UNAUTHENTICATED") == 1
        ),
        "the refused stream counted",
    )
    assert value(last, "authsvc_revocation_watchers") == 0


async def _read_to_end(stream: Any) -> None:
    while await stream.read() is not grpc.aio.EOF:
        pass


async def test_a_cancelled_unary_call_counts_as_cancelled(metered: MetricsServer) -> None:
    # Sign-up waits for the one hasher thread, held busy here: the call is
    # in the server when it is cancelled.
    api = await metered(hash_workers=1)
    before = await scrape(api)
    held = threading.Event()
    busy = api.server.core.executor.submit(held.wait, 30)
    labels = rpc("SignUp")
    try:
        call = api.auth.SignUp(
            auth_pb2.SignUpRequest(email=f"c-{uuid.uuid4().hex[:8]}@example.com", password=PASSWORD)
        )
        await until(
            api,
            lambda s: delta(before, s, "grpc_server_started_total", **labels) == 1,
            "the sign-up started",
        )
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        after = await until(
            api,
            lambda s: (
                delta(before, s, "grpc_server_handled_total", **labels, grpc_code="CANCELLED") == 1
            ),
            "the cancelled sign-up counted",
        )
        assert delta(before, after, "grpc_server_handled_total", **labels, grpc_code="OK") == 0
    finally:
        held.set()
        await asyncio.wrap_future(busy)


async def test_unknown_methods_make_no_series_and_labels_stay_bounded(
    metered: MetricsServer,
) -> None:
    api = await metered()
    email = f"leak-{uuid.uuid4().hex[:10]}@example.com"
    signed = await api.sign_up(email)
    await api.auth.Authenticate(
        auth_pb2.AuthenticateRequest(access_token=signed.tokens.access_token)
    )
    await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(signed.tokens.access_token)
    )
    # Method names a client makes up, one carrying the user's email and token.
    for path in (
        "/authsvc.v1.AuthService/NoSuchMethod",
        f"/{email}/{signed.tokens.access_token[:40]}",
        f"/authsvc.v1.{signed.user.id}/Get",
    ):
        call: Any = api.channel.unary_unary(path)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(b"")
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = await scrape_text(api)
    seen = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, got in sample.labels.items():
                if label == "le":
                    float(got)  # a histogram bucket's bound
                    continue
                assert label in ALLOWED, f"{sample.name} has an unexpected label {label}"
                assert got in ALLOWED[label], f"{sample.name}{{{label}={got!r}}}"
                seen += 1
    assert seen > 1000
    for secret in (
        email,
        str(signed.user.id),
        signed.tokens.access_token,
        signed.tokens.refresh_token,
        PASSWORD,
    ):
        assert secret not in text
    assert not find_leaks(text)


async def test_gauges_of_the_pool_the_bus_and_the_outbox(metered: MetricsServer) -> None:
    api = await metered()
    signed = await api.sign_up()
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(signed.tokens.access_token))
    await api.settled()
    samples = await scrape(api)
    assert value(samples, "authsvc_revocation_bus_healthy") == 1
    assert (
        0 <= value(samples, "authsvc_revocation_bus_lag_seconds") < api.settings.revocation_max_lag
    )
    source = "redis" if api.backend == "postgres" else "database"
    assert value(samples, "authsvc_revocation_bus_source", source=source) == 1
    other = "database" if source == "redis" else "redis"
    assert value(samples, "authsvc_revocation_bus_source", source=other) == 0
    # Settled: every event positioned (and, with Redis, copied).
    assert ("authsvc_outbox_depth", frozenset()) in samples
    assert value(samples, "authsvc_outbox_depth") == 0
    assert value(samples, "authsvc_outbox_oldest_age_seconds") == 0
    assert ("authsvc_db_pool_in_use", frozenset()) in samples
    assert value(samples, "authsvc_db_pool_in_use") >= 0
    assert value(samples, "authsvc_db_pool_waiting") == 0


async def test_a_database_transaction_in_progress_shows_in_the_pool(
    metered: MetricsServer,
) -> None:
    api = await metered()
    db = api.server.core.db
    # The server's background work (the relay's poll, the key reload) checks
    # connections out too, now and then: at least ours is in use, and once it
    # is back (and theirs) none is.
    async with db.transaction():
        busy = await scrape(api)
    assert value(busy, "authsvc_db_pool_in_use") >= 1
    await until(api, lambda s: value(s, "authsvc_db_pool_in_use") == 0, "every connection back")


async def test_metrics_are_off_when_the_setting_is_empty(api: Api, tmp_path: Any) -> None:
    assert Settings.model_fields["metrics_listen"].default == ""
    assert api.settings.metrics_listen == ""
    assert api.server.metrics is None
    assert api.server.metrics_port is None
    # Nothing counted by the services either.
    assert isinstance(api.server.core.auth._metrics, NoMetrics)


async def test_the_endpoint_closes_with_the_server(metered: MetricsServer, tmp_path: Any) -> None:
    api = await metered()
    port = api.server.metrics_port
    assert port is not None
    assert port > 0
    await scrape(api)
    await stop_api(api)
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def _send_raw(port: int, data: bytes, hang_up_early: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        if not hang_up_early:
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass


async def test_odd_http_requests_leave_the_endpoint_and_the_server_serving(
    metered: MetricsServer,
) -> None:
    """Garbage, a request line of a megabyte, a huge header, a POST, a path
    that is not /metrics, a client that hangs up mid-request: the endpoint
    keeps serving scrapes and the gRPC server keeps answering."""
    api = await metered()
    port = api.server.metrics_port
    assert port is not None
    odd = [
        b"\x00\xff garbage \r\n\r\n",
        b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for data in odd:
        await asyncio.to_thread(_send_raw, port, data)
    await asyncio.to_thread(_send_raw, port, b"GET /metr", True)
    assert ("grpc_server_started_total", frozenset(rpc("SignUp").items())) in await scrape(api)
    signed = await api.sign_up()
    assert signed.tokens.access_token


@pytest.mark.parametrize(
    "listen", ["9464", "127.0.0.1", "127.0.0.1:99999", ":9464", "host:port", "127.0.0.1:1/x"]
)
def test_a_bad_metrics_listen_is_refused_at_startup(listen: str, tmp_path: Any) -> None:
    with pytest.raises(ValidationError) as error:
        settings_for(tmp_path, metrics_listen=listen)
    assert "metrics_listen" in str(error.value)


async def test_a_metrics_address_in_use_is_a_clear_startup_error(tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError) as error:
            await build_server(settings_for(tmp_path, metrics_listen=f"127.0.0.1:{port}"))
    assert f"AUTHSVC_METRICS_LISTEN=127.0.0.1:{port}" in str(error.value)
