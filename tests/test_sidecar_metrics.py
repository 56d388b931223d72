"""The sidecar's counters, on a registry its host passes in, against a real
authsvc (through a TCP proxy that can go down, for the reconnect)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest

from authsvc_client.errors import AuthsvcError
from authsvc_client.sidecar import Sidecar
from authsvc_client.v1 import auth_pb2
from tests.app import API_KEY, Api, bearer, find_leaks, remember, until_tokens_are_covered
from tests.scrape import Samples, parse, value
from tests.test_sidecar import Proxy


def read(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    assert not find_leaks(text)
    return parse(text)


async def refused(sidecar: Sidecar, token: str) -> str:
    try:
        await sidecar.authenticate(token)
    except AuthsvcError as error:
        return error.reason
    raise AssertionError("the token was accepted")


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


async def test_the_sidecar_counts_on_the_registry_it_is_given(api: Api) -> None:
    proxy = Proxy(api.target)
    await proxy.up()
    registry = CollectorRegistry()
    sidecar = Sidecar(
        proxy.target,
        api_key=API_KEY,
        metrics_registry=registry,
        reconnect_backoff=0.05,
        max_reconnect_backoff=0.2,
        jwks_refresh_floor=0.0,
    )
    try:
        await sidecar.start()
        await until_tokens_are_covered(sidecar)
        start = read(registry)
        assert value(start, "authsvc_sidecar_jwks_fetches_total", cause="start") == 1
        assert value(start, "authsvc_sidecar_verified_total") == 0
        assert value(start, "authsvc_sidecar_deny_set_size") == 0
        assert value(start, "authsvc_sidecar_stream_reconnects_total") == 0

        signed = await api.sign_up()
        token = signed.tokens.access_token
        for _ in range(3):  # verified once, then from its cache: each counts
            await sidecar.authenticate(token)
        assert await refused(sidecar, "not-a-token") == "TOKEN_INVALID"

        # A key the sidecar does not hold: one JWKS fetch, then refused.
        claims = jwt.decode(token, options={"verify_signature": False})
        stranger = jwt.encode(
            claims,
            Ed25519PrivateKey.generate(),
            algorithm="EdDSA",
            headers={"kid": uuid.uuid4().hex},
        )
        remember(stranger)
        assert await refused(sidecar, stranger) == "TOKEN_INVALID"

        # A revocation: into the deny set, then refused.
        await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        await until(lambda: value(read(registry), "authsvc_sidecar_deny_set_size") == 1, "deny set")
        assert await refused(sidecar, token) == "SESSION_REVOKED"

        after = read(registry)
        assert value(after, "authsvc_sidecar_verified_total") == 3
        assert value(after, "authsvc_sidecar_refused_total", reason="TOKEN_INVALID") == 2
        assert value(after, "authsvc_sidecar_refused_total", reason="SESSION_REVOKED") == 1
        assert value(after, "authsvc_sidecar_refused_total", reason="TOKEN_EXPIRED") == 0
        assert value(after, "authsvc_sidecar_jwks_fetches_total", cause="unknown_kid") == 1
        assert value(after, "authsvc_sidecar_jwks_fetches_total", cause="start") == 1

        # The stream drops and comes back: one reconnect.
        await proxy.down()
        await until(lambda: not sidecar.watching, "disconnected")
        await proxy.up()
        await until(lambda: sidecar.watching, "reconnected")
        back = read(registry)
        assert value(back, "authsvc_sidecar_stream_reconnects_total") >= 1
        text = generate_latest(registry).decode()
        for secret in (token, signed.user.email, signed.user.id, stranger):
            assert secret not in text
    finally:
        await sidecar.close()
        await proxy.down()


def test_without_a_registry_the_client_never_imports_prometheus_client() -> None:
    code = (
        "import sys\n"
        "from authsvc_client.sidecar import Sidecar, AuthInterceptor\n"
        "s = Sidecar('127.0.0.1:1', mode='online')\n"
        "AuthInterceptor(s)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
