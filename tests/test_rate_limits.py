"""Rate limits on SignUp and SignInWithPassword, with real limits.

The suite's servers run with limits of 1,000,000; every test here starts
servers of its own with small ones (``limited``) on the backend's store, and
makes accounts through a server on the same store with no limits (``open``),
so that making them does not spend the budget under test. On the postgres
backend the counters live in the session's Redis, emptied before each test;
the outage test has a redis-server of its own, which it kills and restarts.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from pytest_redis import factories as redis_factories
from pytest_redis.executor import RedisExecutor

from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import auth_pb2, sessions_pb2
from tests.app import PASSWORD, Api, Backend, refused, remember, service, start_api, stop_api

Start = Callable[..., Awaitable[Api]]

LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
WINDOW = 60  # long enough never to end within a test, except where it should
NO_LIMITS = {"signin_attempts_per_ip": 0, "signin_attempts_per_email": 0}

WRONG = f"wrong password {uuid.uuid4().hex[:8]}"
remember(WRONG)


@pytest.fixture
async def start(backend_urls: Backend, tmp_path: Path, log_file: Path) -> AsyncIterator[Start]:
    """``await start(**settings)``: a server on this test's store, with no rate
    limits unless the settings set them (the suite's defaults are 1,000,000)."""
    redis_url = backend_urls.urls.get("redis_url")
    if redis_url is not None:
        # The session's Redis: counters other servers left in it would count here.
        client = aioredis.from_url(redis_url)
        try:
            keys = [k async for k in client.scan_iter("authsvc:rl:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        api = await start_api(backend_urls, tmp_path, **{**NO_LIMITS, **overrides})
        started.append(api)
        # Stopping a server whose event follower has not made its first read
        # yet can hang (see test_time_rules); wait for that read.
        await _until(api.server.core.bus.healthy, 5.0, "following the event stream")
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not {what} after {within} s")
        await asyncio.sleep(0.01)


def _email(prefix: str = "limit") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def _sign_in(
    api: Api, email: str, password: str = PASSWORD, metadata: Any = None, **fields: Any
) -> Any:
    return api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=password, **fields),
        metadata=metadata,
    )


def _sign_up(api: Api, email: str, metadata: Any = None, **fields: Any) -> Any:
    return api.auth.SignUp(
        auth_pb2.SignUpRequest(email=email, password=PASSWORD, **fields), metadata=metadata
    )


async def _outcome(call: Awaitable[Any]) -> tuple[Any, AuthsvcError | None]:
    """The SignInResult of a sign-up or sign-in, or its error."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return None, from_rpc_error(error)
    remember(response.result.tokens.access_token, response.result.tokens.refresh_token)
    return response.result, None


async def _reason(call: Awaitable[Any]) -> str:
    """OK, or the failure's reason."""
    _, error = await _outcome(call)
    return "OK" if error is None else error.reason


def _retry_delay(error: AuthsvcError) -> float:
    retry = error.detail(error_details_pb2.RetryInfo)
    assert retry is not None, "a rate-limited call without a google.rpc.RetryInfo detail"
    return float(retry.retry_delay.ToTimedelta().total_seconds())


def _assert_limited(error: AuthsvcError, window: int, window_started: float) -> float:
    """RATE_LIMITED, with a RetryInfo delay no shorter than the rest of the
    window (rounded to whole seconds) and no longer than the window."""
    assert (error.code, error.reason) == LIMITED, error.message
    delay = _retry_delay(error)
    left = window - (time.monotonic() - window_started)
    assert 1 <= delay <= window, delay
    assert delay >= left - 1.0, f"retry in {delay} s, but the window has {left:.1f} s left"
    return delay


async def _session_ip(api: Api, signed: Any) -> str:
    """The client address the session of a sign-in response recorded."""
    reply = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(user_id=signed.user.id), metadata=service()
    )
    return next(s.ip_address for s in reply.sessions if s.id == signed.tokens.session_id)


# --------------------------------------------------------------------------- per IP

LIMIT = 3


@pytest.mark.parametrize("spent_by", ["SignInWithPassword", "SignUp"])
async def test_the_per_ip_limit_counts_sign_ins_and_sign_ups_alike(
    start: Start, spent_by: str
) -> None:
    """``AUTHSVC_SIGNIN_ATTEMPTS_PER_IP``: sign-up and sign-in attempts per
    client IP per window, successful or not; once spent, both are refused."""
    open_ = await start()
    api = await start(signin_attempts_per_ip=LIMIT, rate_limit_window=WINDOW)
    known = (await open_.sign_up(_email("known"))).user.email

    window_started = time.monotonic()
    if spent_by == "SignInWithPassword":
        attempts = [
            _sign_in(api, known),  # a success counts
            _sign_in(api, known, WRONG),
            _sign_in(api, _email("ghost")),
        ]
        expected = ["OK", "INVALID_CREDENTIALS", "INVALID_CREDENTIALS"]
    else:
        attempts = [_sign_up(api, _email("new")) for _ in range(LIMIT)]
        expected = ["OK"] * LIMIT
    assert [await _reason(call) for call in attempts] == expected

    # The budget is spent: the right password, or a new account, is refused
    # and nothing is written.
    for call in (lambda: _sign_in(api, known), lambda: _sign_up(api, _email("new"))):
        error = await refused(api, call, *LIMITED)
        _assert_limited(error, WINDOW, window_started)

    # The limit is this server's (the open one has none) and per IP: a
    # gateway's end user at another address is not affected.
    signed, failed = await _outcome(
        _sign_in(api, known, metadata=service(), client_info={"ip_address": "198.51.100.7"})
    )
    assert failed is None, failed
    assert await _session_ip(api, signed) == "198.51.100.7"


async def test_the_per_ip_limit_holds_against_a_spoofed_client_info(start: Start) -> None:
    """``ClientInfo`` is honoured only with an API key: a caller without one
    cannot name a fresh IP on every attempt to dodge the limit."""
    open_ = await start()
    api = await start(signin_attempts_per_ip=2, rate_limit_window=WINDOW)
    known = (await open_.sign_up(_email("known"))).user.email

    def spoofed(n: int) -> dict[str, Any]:
        return {"client_info": {"ip_address": f"203.0.113.{n}", "user_agent": "spoofer"}}

    window_started = time.monotonic()
    signed, error = await _outcome(_sign_in(api, known, **spoofed(1)))
    assert error is None, error
    # The session records the real peer, not the claimed address.
    assert await _session_ip(api, signed) == "127.0.0.1"
    assert await _reason(_sign_up(api, _email("new"), **spoofed(2))) == "OK"
    for n in (3, 4):
        error = await refused(api, partial(_sign_in, api, known, **spoofed(n)), *LIMITED)
        _assert_limited(error, WINDOW, window_started)
    error = await refused(api, lambda: _sign_up(api, _email("new"), **spoofed(5)), *LIMITED)
    _assert_limited(error, WINDOW, window_started)

    # With the API key (a gateway), the end user's IP counts, not the
    # gateway's exhausted one: each end user has a budget of their own...
    def gateway(ip: str) -> dict[str, Any]:
        return {"metadata": service(), "client_info": {"ip_address": ip}}

    first = "198.51.100.1"
    assert [await _reason(_sign_in(api, known, **gateway(first))) for _ in range(2)] == ["OK"] * 2
    error = await refused(api, lambda: _sign_in(api, known, **gateway(first)), *LIMITED)
    _assert_limited(error, WINDOW, window_started)
    signed, error = await _outcome(_sign_in(api, known, **gateway("198.51.100.2")))
    assert error is None, error
    assert await _session_ip(api, signed) == "198.51.100.2"
    # ...and without ClientInfo the gateway is its own peer, whose budget is spent.
    await refused(api, lambda: _sign_in(api, known, metadata=service()), *LIMITED)


# --------------------------------------------------------------------------- per email


async def test_the_per_email_limit_treats_known_and_unknown_emails_alike(start: Start) -> None:
    """``AUTHSVC_SIGNIN_ATTEMPTS_PER_EMAIL``: the same number of attempts, the
    same refusal, whether the account exists or not (the limit does not tell
    which addresses have accounts), in any spelling of the address."""
    open_ = await start()
    api = await start(signin_attempts_per_email=LIMIT, rate_limit_window=WINDOW)
    known = (await open_.sign_up(_email("known"))).user.email
    bystander = (await open_.sign_up(_email("bystander"))).user.email
    ghost = _email("ghost")

    outcomes: dict[str, list[tuple[str, float | None]]] = {}
    window_started = time.monotonic()
    for email in (known, ghost):
        seen: list[tuple[str, float | None]] = []
        for attempt in range(LIMIT + 2):
            spelling = email.upper() if attempt % 2 else email
            # Wrong passwords, then the right one (for the known account).
            password = WRONG if attempt < LIMIT else PASSWORD
            _, error = await _outcome(_sign_in(api, spelling, password))
            assert error is not None, f"attempt {attempt + 1} for {email} succeeded"
            delay = None
            if error.reason == "RATE_LIMITED":
                delay = _assert_limited(error, WINDOW, window_started)
            seen.append((error.reason, delay))
        outcomes[email] = seen
    expected_reasons = ["INVALID_CREDENTIALS"] * LIMIT + ["RATE_LIMITED"] * 2
    assert [r for r, _ in outcomes[known]] == expected_reasons
    assert [r for r, _ in outcomes[ghost]] == expected_reasons
    # Nothing to tell them apart by, not even the retry delay (whole seconds,
    # both windows a few milliseconds apart).
    known_delays = [d for _, d in outcomes[known] if d is not None]
    ghost_delays = [d for _, d in outcomes[ghost] if d is not None]
    assert max(known_delays + ghost_delays) - min(known_delays + ghost_delays) <= 1

    # Refused without a write; another address from the same client is not limited.
    await refused(api, lambda: _sign_in(api, known), *LIMITED)
    assert await _reason(_sign_in(api, bystander)) == "OK"
    # Sign-up has no per-email limit.
    assert await _reason(_sign_up(api, ghost)) == "OK"


# --------------------------------------------------------------------------- the window

SHORT_WINDOW = 2


async def test_attempts_are_allowed_again_when_the_window_ends(start: Start) -> None:
    open_ = await start()
    api = await start(signin_attempts_per_ip=2, rate_limit_window=SHORT_WINDOW)
    known = (await open_.sign_up(_email("known"))).user.email

    window_started = time.monotonic()  # no later than the window's first attempt
    assert [await _reason(_sign_in(api, known)) for _ in range(2)] == ["OK", "OK"]
    first_returned = time.monotonic()

    # Refused until the window ends, then allowed. Refused attempts do not
    # extend the window (it is fixed, from its first attempt).
    refusals: list[float] = []
    while True:
        called = time.monotonic()
        assert called - first_returned < SHORT_WINDOW + 2.0, "still limited 2 s after the window"
        _, error = await _outcome(_sign_in(api, known))
        if error is None:
            break
        _assert_limited(error, SHORT_WINDOW, window_started)
        refusals.append(called)
        await asyncio.sleep(0.05)
    assert refusals, "the third attempt within the window was allowed"
    assert refusals[-1] >= window_started + SHORT_WINDOW - 0.5, (
        f"allowed again {called - window_started:.2f} s into a {SHORT_WINDOW} s window"
    )
    assert called < first_returned + SHORT_WINDOW + 0.5

    # A new window with the whole budget: that attempt was its first, one more
    # is allowed, the next refused.
    assert await _reason(_sign_in(api, known)) == "OK"
    await refused(api, lambda: _sign_in(api, known), *LIMITED)


# --------------------------------------------------------------------------- Redis down

# A redis-server of this module's own, which the outage test kills and restarts
# (the session's `redis_url` server is shared and must stay up).
_outage_redis_proc = redis_factories.redis_proc(host="127.0.0.1")


@pytest.fixture
def outage_redis(request: pytest.FixtureRequest) -> RedisExecutor:
    executor: RedisExecutor = request.getfixturevalue("_outage_redis_proc")
    if executor.process is None or not executor.running():
        pytest.fail("the module's own redis-server is not running")
    return executor


@pytest.mark.postgres
@pytest.mark.redis
async def test_rate_limited_calls_fail_closed_while_redis_is_down(
    migrated_postgres: str, outage_redis: RedisExecutor, tmp_path: Path, log_file: Path
) -> None:
    """Rate limits live in Redis and fail closed: SignInWithPassword and SignUp
    answer UNAVAILABLE / BACKEND_UNAVAILABLE, write nothing, and work again
    once Redis is back, without restarting authsvc."""
    redis_proc = outage_redis
    backend = Backend(
        "postgres",
        {
            "database_url": migrated_postgres,
            "redis_url": f"redis://{redis_proc.host}:{redis_proc.port}/0",
        },
    )
    api = await start_api(
        backend,
        tmp_path,
        signin_attempts_per_ip=100,
        signin_attempts_per_email=10,
        rate_limit_window=WINDOW,
    )
    try:
        await _until(api.server.core.bus.healthy, 5.0, "following the event stream")
        created = await api.sign_up(_email("known"))
        known = created.user.email
        assert await _reason(_sign_in(api, known)) == "OK"

        await asyncio.to_thread(redis_proc.kill, True, signal.SIGKILL)
        assert not redis_proc.running()
        newcomer = _email("newcomer")
        # The right password, a wrong one, an unknown email, a new account:
        # all refused alike, before any password is checked or row written.
        for call in (
            lambda: _sign_in(api, known),
            lambda: _sign_in(api, known, WRONG),
            lambda: _sign_in(api, _email("ghost")),
            lambda: _sign_up(api, newcomer),
        ):
            await refused(api, call, *UNAVAILABLE)
        # Calls that need no rate limit still work without Redis.
        who = await api.auth.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=created.tokens.access_token)
        )
        assert who.session.user_id == created.user.id

        await asyncio.to_thread(redis_proc.start)
        # Back without restarting authsvc; until its connections recover,
        # nothing but BACKEND_UNAVAILABLE.
        deadline = time.monotonic() + 10.0
        while (reason := await _reason(_sign_in(api, known))) != "OK":
            assert reason == "BACKEND_UNAVAILABLE", reason
            assert time.monotonic() < deadline, "still unavailable 10 s after Redis returned"
            await asyncio.sleep(0.1)
        signed_up, error = await _outcome(_sign_up(api, newcomer))
        assert error is None, error
        assert signed_up.user.email == newcomer
    finally:
        await stop_api(api)
        if not redis_proc.running():
            await asyncio.to_thread(redis_proc.start)  # leave the fixture as it was
