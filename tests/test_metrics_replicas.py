"""Metrics of real deployments: two ``authsvc serve`` processes, each with its
own /metrics, and the revocation bus's gauges through a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import port_for
import pytest
from pytest_redis import factories as redis_factories
from pytest_redis.executor import RedisExecutor

from authsvc.storage import migrate
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.app import (
    API_KEYS,
    PASSWORD,
    Backend,
    Storage,
    bearer,
    find_leaks,
    remember,
    start_api,
    stop_api,
)
from tests.processes import assert_no_secrets, clean_env, env_secrets, spawn_authsvc
from tests.scrape import Samples, get, parse, value
from tests.test_outbox import _serving


async def scrape(port: int) -> Samples:
    text = await asyncio.to_thread(get, port, timeout=5)
    assert not find_leaks(text)
    return parse(text)


async def until(
    port: int, check: Callable[[Samples], bool], what: str, within: float = 20.0
) -> Samples:
    deadline = time.monotonic() + within
    while True:
        try:
            samples = await scrape(port)
            if check(samples):
                return samples
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.1)


async def test_every_serve_process_serves_its_own_metrics(storage: Storage) -> None:
    urls = storage.backend.urls
    if "database_url" in urls:
        await asyncio.to_thread(migrate.upgrade, urls["database_url"])
    procs: list[Any] = []
    ports: list[tuple[int, int]] = []
    env_base = {
        **storage.env,
        "AUTHSVC_API_KEYS": API_KEYS,
        "AUTHSVC_ARGON2_MEMORY_KIB": "1024",
        "AUTHSVC_ARGON2_TIME_COST": "1",
    }
    if "redis_url" in urls:
        env_base["AUTHSVC_REDIS_URL"] = urls["redis_url"]
    try:
        for _ in range(2):
            grpc_port, metrics_port = port_for.select_random(), port_for.select_random()
            env = clean_env(
                **env_base,
                AUTHSVC_LISTEN=f"127.0.0.1:{grpc_port}",
                AUTHSVC_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
            )
            procs.append((await spawn_authsvc("serve", env=env), env))
            ports.append((grpc_port, metrics_port))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
            await _serving(channel)
            await channel.close()

        (a_grpc, a_metrics), (_, b_metrics) = ports
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{a_grpc}")
        stub: Any = auth_pb2_grpc.AuthServiceStub(channel)
        email = f"replica-{os.getpid()}-{time.monotonic_ns()}@example.com"
        signed = await stub.SignUp(auth_pb2.SignUpRequest(email=email, password=PASSWORD))
        remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
        await channel.close()

        sign_up = {("grpc_service", "authsvc.v1.AuthService"), ("grpc_method", "SignUp")}
        labels = frozenset({*sign_up, ("grpc_type", "unary"), ("grpc_code", "OK")})
        a = await until(
            a_metrics,
            lambda s: value(s, "authsvc_sign_ups_total", outcome="success") == 1,
            "A counted",
        )
        b = await until(b_metrics, lambda s: ("grpc_server_handled_total", labels) in s, "B up")
        assert a[("grpc_server_handled_total", labels)] == 1
        assert b[("grpc_server_handled_total", labels)] == 0
        assert value(b, "authsvc_sign_ups_total", outcome="success") == 0
        for port in (a_metrics, b_metrics):
            await until(port, lambda s: value(s, "authsvc_revocation_bus_healthy") == 1, "healthy")
    finally:
        for proc, env in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, err = await asyncio.wait_for(proc.communicate(), 30)
            except TimeoutError:
                proc.kill()
                _, err = await proc.communicate()
            assert_no_secrets(err.decode(errors="replace"), *env_secrets(env), proc=proc)
    for _, metrics_port in ports:
        with pytest.raises(urllib.error.URLError, match="refused"):
            get(metrics_port, timeout=5)


# -- the revocation bus through a Redis outage (PostgreSQL + a Redis of this module's own)

_metrics_redis_proc = redis_factories.redis_proc(host="127.0.0.1")


@pytest.fixture
def own_redis(request: pytest.FixtureRequest) -> Iterator[RedisExecutor]:
    executor: RedisExecutor = request.getfixturevalue("_metrics_redis_proc")
    if not executor.running():
        executor.start()
    yield executor
    if not executor.running():
        executor.start()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_redis_outage_moves_the_bus_to_the_database_and_back(
    make_postgres_db: Callable[..., str], own_redis: RedisExecutor, tmp_path: Path
) -> None:
    url = make_postgres_db()
    await asyncio.to_thread(migrate.upgrade, url)
    backend = Backend(
        "postgres",
        {"database_url": url, "redis_url": f"redis://{own_redis.host}:{own_redis.port}/0"},
    )
    api = await start_api(backend, tmp_path, metrics_listen="127.0.0.1:0")
    try:
        port = api.server.metrics_port
        assert port is not None
        on_redis = await until(
            port,
            lambda s: (
                value(s, "authsvc_revocation_bus_source", source="redis") == 1
                and value(s, "authsvc_revocation_bus_healthy") == 1
            ),
            "following redis",
        )
        assert value(on_redis, "authsvc_outbox_depth") == 0
        signed = await api.sign_up()

        await asyncio.to_thread(own_redis.stop)
        # The follower reads the database's log: still healthy, from the database.
        fallback = await until(
            port,
            lambda s: value(s, "authsvc_revocation_bus_source", source="database") == 1,
            "on the database",
        )
        assert value(fallback, "authsvc_revocation_bus_source", source="redis") == 0
        await until(port, lambda s: value(s, "authsvc_revocation_bus_healthy") == 1, "healthy")
        # A sign-out meanwhile: its event is positioned, and waits for Redis.
        await api.auth.SignOut(
            auth_pb2.SignOutRequest(), metadata=bearer(signed.tokens.access_token)
        )
        waiting = await until(port, lambda s: value(s, "authsvc_outbox_depth") >= 1, "outbox")
        assert value(waiting, "authsvc_outbox_oldest_age_seconds") >= 0

        await asyncio.to_thread(own_redis.start)
        back = await until(
            port,
            lambda s: (
                value(s, "authsvc_revocation_bus_source", source="redis") == 1
                and value(s, "authsvc_outbox_depth") == 0
            ),
            "back on redis, outbox copied",
            within=30.0,
        )
        assert value(back, "authsvc_revocation_bus_healthy") == 1
        assert value(back, "authsvc_outbox_oldest_age_seconds") == 0
    finally:
        with contextlib.suppress(Exception):
            if not own_redis.running():
                own_redis.start()
        await stop_api(api)
