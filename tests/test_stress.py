"""Clients that go away cannot take the server down.

``authsvc serve`` runs as a subprocess (so a crash fails the test instead of
killing pytest) on the embedded default, with an admin and an API key. Two
thousand WatchRevocations streams, and as many unary calls, are opened and
abandoned in every way a client can: cancelled before the first message or
after it, cut by a deadline, or by closing the channel under them, with every
kind of ``after`` and with both admin credentials. Afterwards the process is
alive, its stderr holds no "Fatal Python error" and no traceback, and it still
answers a real RPC, a new stream and a health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc, resources_pb2, users_pb2, users_pb2_grpc
from tests.app import API_KEY, API_KEYS, PASSWORD, SECRET_KEY, remember
from tests.processes import assert_no_secrets, clean_env, run_authsvc, spawn_authsvc

STREAMS = 2000
UNARY = 2000
PARALLEL = 64  # calls in flight at once
CHANNELS = 8

Metadata = tuple[tuple[str, str], ...]
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
# What the client side saw that it should not have (checked after the server's
# liveness, so that a crash is reported as one).
UNEXPECTED: list[str] = []


@dataclass
class Served:
    """``authsvc serve`` in a subprocess; its stderr is collected as it comes."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    port: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "server.started":
                    self.port = int(event["port"])
                    self.started.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Served, str]]:
    """A server on a fresh embedded store, and an admin's access token."""
    env = clean_env(
        AUTHSVC_DATA_DIR=str(tmp_path / "data"),
        AUTHSVC_SECRET_KEY=SECRET_KEY,
        AUTHSVC_API_KEYS=API_KEYS,
        AUTHSVC_LISTEN="127.0.0.1:0",
        AUTHSVC_ARGON2_MEMORY_KIB="1024",
        AUTHSVC_ARGON2_TIME_COST="1",
        AUTHSVC_LOG_FORMAT="json",
        AUTHSVC_LOG_LEVEL="info",
        AUTHSVC_SHUTDOWN_GRACE="1",
        # Heartbeats every 50 ms, so a stream that is not cancelled at once
        # has messages in flight when it is.
        AUTHSVC_REVOCATION_HEARTBEAT="0.05",
    )
    email = f"admin-{uuid.uuid4().hex[:12]}@example.com"
    created = await run_authsvc(
        "create-admin", "--email", email, "--password-stdin", env=env, stdin=PASSWORD + "\n"
    )
    assert created.code == 0, created.stderr
    server = Served(await spawn_authsvc("serve", env=env, cwd=tmp_path))
    server.reader = asyncio.create_task(server.read())
    try:
        waiter = asyncio.create_task(server.started.wait())
        done, _ = await asyncio.wait(
            {waiter, asyncio.create_task(server.proc.wait())},
            timeout=60,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if waiter not in done:
            waiter.cancel()
            pytest.fail(f"authsvc serve did not start:\n{server.stderr}")
        async with grpc.aio.insecure_channel(server.target) as channel:
            signed = await auth_pb2_grpc.AuthServiceStub(channel).SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD), timeout=30
            )
        remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
        yield server, signed.result.tokens.access_token
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(server.reader, 10)
        assert_no_secrets(server.stderr, proc=server.proc)


# -- the ways a client walks away ----------------------------------------------


def _after(rng: random.Random, position: str) -> str:
    return rng.choice(["", "0-0", position, "9999999999999-0", "1-1", "not-a-position"])


async def _watch(
    channel: grpc.aio.Channel, how: str, after: str, metadata: Metadata, rng: random.Random
) -> None:
    stub: Any = auth_pb2_grpc.AuthServiceStub(channel)
    request = auth_pb2.WatchRevocationsRequest(after=after)
    if how == "deadline":
        # Long enough to reach the server on a loaded machine, short enough
        # to cut the stream before its first heartbeat.
        call = stub.WatchRevocations(request, metadata=metadata, timeout=rng.uniform(0.2, 0.6))
    else:
        call = stub.WatchRevocations(request, metadata=metadata)
    try:
        if how == "cancel-at-once":
            pass
        elif how == "cancel-soon":
            # Once the request is out, mostly before the first message is.
            await call.wait_for_connection()
            await asyncio.sleep(rng.uniform(0, 0.002))
        elif how == "cancel-after-first":
            await call.read()
        elif how == "cancel-after-some":
            for _ in range(rng.randint(2, 4)):
                await call.read()
        elif how == "deadline":
            while await call.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as error:
        # A bad `after` is INVALID_ARGUMENT; a deadline ends the stream.
        if error.code() not in EXPECTED:
            UNEXPECTED.append(f"WatchRevocations {how}: {error.code().name} {error.details()}")
    finally:
        call.cancel()


async def _watch_and_close_channel(
    target: str, after: str, metadata: Metadata, rng: random.Random
) -> None:
    """A stream whose channel is closed under it, after 0 to 2 messages."""
    channel = grpc.aio.insecure_channel(target)
    stub: Any = auth_pb2_grpc.AuthServiceStub(channel)
    call = stub.WatchRevocations(auth_pb2.WatchRevocationsRequest(after=after), metadata=metadata)
    with contextlib.suppress(grpc.aio.AioRpcError):
        for _ in range(rng.randint(0, 2)):
            await call.read()
    await channel.close(grace=None)


async def _unary(
    channel: grpc.aio.Channel, how: str, metadata: Metadata, rng: random.Random, token: str
) -> None:
    users: Any = users_pb2_grpc.UserServiceStub(channel)
    auth: Any = auth_pb2_grpc.AuthServiceStub(channel)
    calls: list[Callable[..., Any]] = [
        lambda **kw: users.ListUsers(users_pb2.ListUsersRequest(page_size=5), **kw),
        lambda **kw: users.CountUsers(users_pb2.CountUsersRequest(), **kw),
        lambda **kw: auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token), **kw),
    ]
    if metadata[0][0] == "authorization":
        calls.append(lambda **kw: users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), **kw))
    make = rng.choice(calls)
    kwargs: dict[str, Any] = {"metadata": metadata}
    if how == "deadline":
        kwargs["timeout"] = rng.uniform(0.0005, 0.01)
    call = make(**kwargs)
    try:
        if how == "cancel-at-once":
            call.cancel()
        elif how == "cancel-soon":
            await asyncio.sleep(rng.uniform(0, 0.005))
            call.cancel()
        await call
    except asyncio.CancelledError:
        pass
    except grpc.aio.AioRpcError as error:
        if error.code() not in EXPECTED:
            UNEXPECTED.append(f"unary {how}: {error.code().name} {error.details()}")


async def _in_parallel(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    gate = asyncio.Semaphore(PARALLEL)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(run(job) for job in jobs))


async def _still_serving(server: Served, token: str) -> None:
    assert server.proc.returncode is None, f"authsvc died:\n{server.stderr[-5000:]}"
    async with grpc.aio.insecure_channel(server.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub: Any = users_pb2_grpc.UserServiceStub(channel)
        me = await stub.GetCurrentUser(
            users_pb2.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
        assert me.user.role == resources_pb2.ROLE_ADMIN
        listed = await stub.ListUsers(
            users_pb2.ListUsersRequest(), metadata=(("x-api-key", API_KEY),)
        )
        assert [u.id for u in listed.users] == [me.user.id]
        watch: Any = auth_pb2_grpc.AuthServiceStub(channel).WatchRevocations(
            auth_pb2.WatchRevocationsRequest(after="0-0"), metadata=(("x-api-key", API_KEY),)
        )
        first = await watch.read()
        assert first is not grpc.aio.EOF
        assert first.position
        watch.cancel()


async def test_abandoned_calls_do_not_crash_the_server(served: tuple[Served, str]) -> None:
    server, token = served
    UNEXPECTED.clear()
    rng = random.Random(0x5EED)
    creds: list[Metadata] = [
        (("x-api-key", API_KEY),),
        (("authorization", f"Bearer {token}"),),
    ]
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(CHANNELS)]
    try:
        stub: Any = auth_pb2_grpc.AuthServiceStub(channels[0])
        opening = stub.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(after="0-0"), metadata=creds[0]
        )
        position = (await opening.read()).position
        opening.cancel()
        ways = ["cancel-at-once", "cancel-soon", "cancel-after-first", "cancel-after-some"]
        ways += ["deadline", "close-channel"]
        jobs: list[Callable[[], Awaitable[None]]] = []
        for i in range(STREAMS):
            how = ways[i % len(ways)]
            after = _after(rng, position)
            metadata = (*creds[i % 2], ("x-request-id", f"stress-{i}"))
            if how == "close-channel":
                jobs.append(partial(_watch_and_close_channel, server.target, after, metadata, rng))
            else:
                jobs.append(partial(_watch, channels[i % CHANNELS], how, after, metadata, rng))
        unary_ways = ["cancel-at-once", "cancel-soon", "deadline"]
        for i in range(UNARY):
            ch, how, metadata = channels[i % CHANNELS], unary_ways[i % 3], creds[(i // 3) % 2]
            jobs.append(partial(_unary, ch, how, metadata, rng, token))
        rng.shuffle(jobs)
        await _in_parallel(jobs)
    finally:
        for channel in channels:
            await channel.close()

    await _still_serving(server, token)
    assert not UNEXPECTED, UNEXPECTED[:10]
    assert "Fatal Python error" not in server.stderr, server.stderr[-5000:]
    assert "Traceback" not in server.stderr, server.stderr[-5000:]
    watched = [
        e
        for e in server.events()
        if e.get("event") == "rpc" and e.get("method", "").endswith("/WatchRevocations")
    ]
    reached: dict[str, int] = {}
    for e in watched:
        if e["request_id"].startswith("stress-"):
            how = ways[int(e["request_id"].removeprefix("stress-")) % len(ways)]
            reached[how] = reached.get(how, 0) + 1
    # Every way of walking away but the one that cancels before sending
    # reached a running handler, many times.
    later = [how for how in ways if how != "cancel-at-once"]
    # A deadline may pass before a loaded server takes the call: that way
    # needs only to have reached it often enough to count.
    least = {"deadline": 10}
    assert all(reached.get(how, 0) >= least.get(how, STREAMS // len(ways) // 4) for how in later), (
        reached
    )
    # Each stream that reached the server was logged once (not later, when
    # the garbage collector gets round to it).
    assert len(watched) > STREAMS // 2, len(watched)
    assert len({e["request_id"] for e in watched}) == len(watched)
    # The peer as captured when the call started ("" if the client was gone by then).
    peers = {e["peer"] for e in watched}
    assert all(p == "" or p.startswith("ipv4:127.0.0.1:") for p in peers), sorted(peers)[:5]
    assert any(peers)
    assert {e["code"] for e in watched} <= {"OK", "CANCELLED", "INVALID_ARGUMENT"}
    assert "CANCELLED" in {e["code"] for e in watched}
