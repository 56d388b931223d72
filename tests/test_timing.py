"""Password work: the same for unknown emails, and never on the event loop.

Structural checks with generous bounds, not speed tests. The server uses the
default (OWASP) Argon2id parameters: m=19456 KiB, t=2, p=1.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from tests.app import PASSWORD, Api, Backend, failure, remember, start_api, stop_api

EMBEDDED = Backend("embedded", {})
OWASP: dict[str, Any] = {"argon2_memory_kib": 19456, "argon2_time_cost": 2, "argon2_parallelism": 1}
ROUNDS = 9
WRONG = "this is not the password"


@pytest.fixture
async def owasp_api(tmp_path: Path, log_file: Path) -> AsyncIterator[Api]:
    api = await start_api(EMBEDDED, tmp_path, **OWASP)
    yield api
    await stop_api(api)


async def _known_user(api: Api) -> str:
    email = f"timing-{uuid.uuid4().hex[:8]}@example.com"
    await api.sign_up(email)
    rows = (await api.snapshot())["users"]
    (password_hash,) = [r[3] for r in rows if r[1] == email]
    params = "$".join(password_hash.split("$")[:4])
    assert params == "$argon2id$v=19$m=19456,t=2,p=1", "the server is not on the OWASP parameters"
    return email


async def _failed_sign_in(api: Api, email: str) -> float:
    started = time.perf_counter()
    error = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=email, password=WRONG), timeout=30
        )
    )
    took = time.perf_counter() - started
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    return took


async def _sign_in(api: Api, email: str) -> float:
    started = time.perf_counter()
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD), timeout=30
    )
    took = time.perf_counter() - started
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return took


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


async def _compare(api: Api, known: str) -> tuple[float, str]:
    """~9 of each, interleaved; returns (unknown median / wrong median, description)."""

    def unknown() -> str:
        return f"nobody-{uuid.uuid4().hex[:8]}@example.com"

    wrong_password: list[float] = []
    unknown_email: list[float] = []
    for i in range(ROUNDS):
        # Alternating which goes first, so drift in the host's load hits both alike.
        if i % 2:
            wrong_password.append(await _failed_sign_in(api, known))
            unknown_email.append(await _failed_sign_in(api, unknown()))
        else:
            unknown_email.append(await _failed_sign_in(api, unknown()))
            wrong_password.append(await _failed_sign_in(api, known))
    wrong_median = statistics.median(wrong_password)
    unknown_median = statistics.median(unknown_email)
    ratio = unknown_median / wrong_median
    return ratio, (
        f"wrong password (ms): {_ms(wrong_password)}; median {wrong_median * 1000:.1f}\n"
        f"unknown email  (ms): {_ms(unknown_email)}; median {unknown_median * 1000:.1f}\n"
        f"unknown / wrong = {ratio:.2f}"
    )


async def test_unknown_email_costs_what_a_wrong_password_costs(owasp_api: Api) -> None:
    """Both cost one Argon2 verify (the unknown email one against a dummy hash).

    Without the dummy verify an unknown email is ~25-50x cheaper (checked by
    stubbing it out: ratio 0.04). The host's load can skew a median of nine,
    so up to three rounds are measured and one inside the bounds suffices;
    a missing dummy verify fails every round.
    """
    remember(WRONG)
    known = await _known_user(owasp_api)
    # Warm-up (connections, code paths), not measured.
    await _failed_sign_in(owasp_api, known)
    await _failed_sign_in(owasp_api, f"warm-{uuid.uuid4().hex[:8]}@example.com")

    rounds: list[str] = []
    for _ in range(3):
        ratio, described = await _compare(owasp_api, known)
        rounds.append(described)
        if 0.5 <= ratio <= 2.0:
            break
    print("\n" + "\n".join(rounds))
    assert 0.5 <= ratio <= 2.0, (
        "an unknown email does not cost what a wrong password costs:\n" + "\n".join(rounds)
    )


@dataclass
class Window:
    solo: float  # median of sign-ins one at a time: one Argon2 verify plus the rest
    concurrent: list[float]  # the sign-ins in flight together
    jwks: list[float]  # GetJwks latencies meanwhile

    def describe(self) -> str:
        return (
            f"sign-in alone: median {self.solo * 1000:.1f} ms; {len(self.concurrent)} at once: "
            f"{_ms(self.concurrent)} ms (median {statistics.median(self.concurrent) * 1000:.1f}); "
            f"GetJwks meanwhile: {len(self.jwks)} calls, median "
            f"{statistics.median(self.jwks) * 1000:.1f} ms, max {max(self.jwks) * 1000:.1f} ms"
        )


async def _window(api: Api, email: str) -> Window:
    solo = statistics.median([await _sign_in(api, email) for _ in range(5)])
    sign_ins = [asyncio.create_task(_sign_in(api, email)) for _ in range(4)]
    jwks: list[float] = []
    try:
        await asyncio.sleep(0)  # let the sign-ins go out first
        while not all(task.done() for task in sign_ins):
            started = time.perf_counter()
            reply = await api.auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
            jwks.append(time.perf_counter() - started)
            assert reply.keys
    finally:
        concurrent = await asyncio.gather(*sign_ins)
    return Window(solo, list(concurrent), jwks)


@pytest.fixture
async def owasp_api_spare_core(tmp_path: Path, log_file: Path) -> AsyncIterator[Api]:
    """OWASP parameters; one core left to the event loop (on a 2-core host the
    default pool of cpu_count workers would have it compete with two hashes)."""
    workers = max(1, (os.cpu_count() or 2) - 1)
    api = await start_api(EMBEDDED, tmp_path, **OWASP, hash_workers=workers)
    yield api
    await stop_api(api)


async def test_argon2_runs_off_the_event_loop(owasp_api_spare_core: Api) -> None:
    """GetJwks keeps answering while four sign-ins hash.

    Were Argon2 run on the event loop (which this test shares with the
    server), every GetJwks issued during a hash would wait for the whole hash,
    usually two back to back. Checked against that negative control: max
    GetJwks latency then was 1.7-3x a lone sign-in. Off the loop it is a
    small fraction of one, except when the host itself stalls the process:
    so up to three windows are measured and one clean window suffices for
    the strict check (a hash on the loop would spoil every window).
    """
    api = owasp_api_spare_core
    known = await _known_user(api)
    windows: list[Window] = []
    for _ in range(3):
        window = await _window(api, known)
        windows.append(window)
        # The check as specified: GetJwks stays well under the in-flight
        # sign-ins (weak on its own: it also holds with a hash on the loop).
        assert max(window.jwks) < statistics.median(window.concurrent), window.describe()
        assert len(window.jwks) >= 3, window.describe()
        # The strict one: under one lone sign-in, i.e. about one Argon2 run.
        if max(window.jwks) < window.solo:
            break
    print("\n" + "\n".join(w.describe() for w in windows))
    assert max(windows[-1].jwks) < windows[-1].solo, (
        "in every window a GetJwks took longer than a whole sign-in:\n"
        + "\n".join(w.describe() for w in windows)
    )
