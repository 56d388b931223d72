"""TLS and mutual TLS: certificates made on the fly, real channels.

A throwaway CA signs a server certificate (SAN 127.0.0.1 and localhost) and a
client certificate; a second, unrelated CA stands for "anyone else".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authsvc.app import Server, build_server
from authsvc.storage import migrate
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.app import Api, Backend, Storage, remember, start_api, stop_api
from tests.app import test_settings as make_settings
from tests.infra import asyncpg_dsn
from tests.processes import assert_no_secrets, spawn_authsvc

EMBEDDED = Backend("embedded", {})
TIMEOUT = 5.0


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed server and client
    server: Pair
    client: Pair
    rogue_ca: Path  # an unrelated CA
    rogue_client: Pair  # a client certificate the rogue CA signed


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(directory / f"{name}.pem", cert)
    return cert, key


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> Pair:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _write_cert(pair.cert, cert)
    _write_key(pair.key, key)
    return pair


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = _make_ca(directory, "test-ca")
    rogue = _make_ca(directory, "rogue-ca")
    return Pki(
        ca=directory / "test-ca.pem",
        server=_issue(directory, "server", ca, server=True),
        client=_issue(directory, "client", ca, server=False),
        rogue_ca=directory / "rogue-ca.pem",
        rogue_client=_issue(directory, "rogue-client", rogue, server=False),
    )


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def tls_api(pki: Pki, tmp_path: Path, log_file: Path) -> AsyncIterator[Api]:
    api = await start_api(
        EMBEDDED, tmp_path / "data", tls_cert_file=pki.server.cert, tls_key_file=pki.server.key
    )
    yield api
    await stop_api(api)


@pytest.fixture
async def mtls_api(pki: Pki, tmp_path: Path, log_file: Path) -> AsyncIterator[Api]:
    api = await start_api(
        EMBEDDED,
        tmp_path / "data",
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca,
    )
    yield api
    await stop_api(api)


def _secure(
    target: str, ca: Path, client: Pair | None = None, *, server_name: str | None = None
) -> grpc.aio.Channel:
    key, chain = client.read() if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key, certificate_chain=chain
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(target, credentials, options=options)


async def _jwks(channel: grpc.aio.Channel) -> auth_pb2.GetJwksResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    return await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=TIMEOUT)


async def _refused(channel: grpc.aio.Channel) -> None:
    """A call on ``channel`` must fail at the transport: UNAVAILABLE."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _jwks(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value


# --------------------------------------------------------------------------- TLS


async def test_tls_server_answers_a_client_that_trusts_its_ca(tls_api: Api, pki: Pki) -> None:
    async with _secure(tls_api.target, pki.ca) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=TIMEOUT)
        assert jwks.keys
        password = "tls tls tls tls tls"
        remember(password)
        created = await stub.SignUp(
            auth_pb2.SignUpRequest(email="tls@example.com", password=password), timeout=TIMEOUT
        )
        remember(created.result.tokens.access_token, created.result.tokens.refresh_token)
        who = await stub.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=created.result.tokens.access_token),
            timeout=TIMEOUT,
        )
        assert who.session.user_id == created.result.user.id


async def test_tls_server_certificate_names_localhost(tls_api: Api, pki: Pki) -> None:
    # Same socket, but verify the certificate against the DNS name in its SAN.
    async with _secure(tls_api.target, pki.ca, server_name="localhost") as channel:
        assert (await _jwks(channel)).keys


async def test_tls_server_is_not_trusted_by_a_client_of_another_ca(tls_api: Api, pki: Pki) -> None:
    await _refused(_secure(tls_api.target, pki.rogue_ca))


async def test_tls_server_refuses_plaintext(tls_api: Api) -> None:
    await _refused(grpc.aio.insecure_channel(tls_api.target))


async def test_tls_server_does_not_ask_for_client_certificates(tls_api: Api, pki: Pki) -> None:
    # Without tls_client_ca_file, a client certificate is neither needed nor harmful.
    async with _secure(tls_api.target, pki.ca, pki.client) as channel:
        assert (await _jwks(channel)).keys


# --------------------------------------------------------------------------- mutual TLS


async def test_mtls_refuses_a_client_without_a_certificate(mtls_api: Api, pki: Pki) -> None:
    await _refused(_secure(mtls_api.target, pki.ca))


async def test_mtls_refuses_a_client_certificate_of_another_ca(mtls_api: Api, pki: Pki) -> None:
    await _refused(_secure(mtls_api.target, pki.ca, pki.rogue_client))


async def test_mtls_refuses_plaintext(mtls_api: Api) -> None:
    await _refused(grpc.aio.insecure_channel(mtls_api.target))


async def test_mtls_accepts_a_client_certificate_signed_by_the_ca(mtls_api: Api, pki: Pki) -> None:
    async with _secure(mtls_api.target, pki.ca, pki.client) as channel:
        assert (await _jwks(channel)).keys
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        password = "mutual tls password"
        remember(password)
        created = await stub.SignUp(
            auth_pb2.SignUpRequest(email="mtls@example.com", password=password), timeout=TIMEOUT
        )
        remember(created.result.tokens.access_token, created.result.tokens.refresh_token)
        assert created.result.user.email == "mtls@example.com"


# --------------------------------------------------------------------------- misconfiguration


@dataclass(frozen=True)
class Resources:
    """What a built core holds open, as seen from outside it."""

    threads: frozenset[int]  # idents, but not the process-wide ones
    postgres_connections: int  # to the test's database, besides our probe
    redis_clients: int  # connected to the session's Redis, besides our probe


def _process_wide(thread: threading.Thread) -> bool:
    """Threads made once per process: asyncio's default executor, grpc.aio's poller."""
    return thread.name.startswith("asyncio_") or "_poll_wrapper" in thread.name


async def _resources(storage: Storage) -> Resources:
    threads = frozenset(t.ident for t in threading.enumerate() if t.ident and not _process_wide(t))
    pg = redis_clients = 0
    if storage.backend.name == "postgres":
        conn = await asyncpg.connect(asyncpg_dsn(storage.backend.urls["database_url"]))
        try:
            pg = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        client = aioredis.from_url(storage.backend.urls["redis_url"])
        try:
            redis_clients = len(await client.client_list()) - 1
        finally:
            await client.aclose()
    return Resources(threads, pg, redis_clients)


async def _nothing_left(storage: Storage, before: Resources) -> None:
    """The resources are back to ``before`` (a closed engine's threads and
    connections take a moment to go)."""
    deadline = time.monotonic() + 5.0
    while (now := await _resources(storage)) != before:
        if time.monotonic() > deadline:
            threads = [
                t.name for t in threading.enumerate() if t.ident in now.threads - before.threads
            ]
            raise AssertionError(f"left behind: {now} (new threads {threads}), before: {before}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def tls_storage(storage: Storage) -> Storage:
    """The test's store, migrated (so build_core gets as far as it can)."""
    if storage.backend.name == "postgres":
        await asyncio.to_thread(migrate.upgrade, storage.backend.urls["database_url"])
    return storage


@pytest.mark.parametrize("broken", ["cert", "key"])
async def test_unusable_certificate_content_fails_to_start_and_leaves_nothing(
    broken: str, pki: Pki, tls_storage: Storage, log_file: Path
) -> None:
    """Files that exist but hold no certificate or key: the port cannot be
    opened, build_server raises, and the core it built is closed (no database
    connection, connection thread or Redis client is left behind)."""
    garbage = tls_storage.data_dir.parent / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    files = {"tls_cert_file": pki.server.cert, "tls_key_file": pki.server.key}
    files[f"tls_{broken}_file"] = garbage
    settings = make_settings(tls_storage.data_dir, **tls_storage.backend.urls, **files)
    before = await _resources(tls_storage)
    # A good build on the store, closed again, gives back everything (and
    # makes what stays for good, e.g. asyncio's default executor, exist).
    server = await build_server(make_settings(tls_storage.data_dir, **tls_storage.backend.urls))
    await server.server.stop(0)
    await server.core.close()
    await _nothing_left(tls_storage, before)

    with pytest.raises(RuntimeError, match="Failed to bind"):
        await build_server(settings)
    await _nothing_left(tls_storage, before)


@pytest.mark.parametrize("given", ["cert", "key"])
async def test_half_a_key_pair_fails_to_start(
    given: str, pki: Pki, tmp_path: Path, log_file: Path
) -> None:
    only = (
        {"tls_cert_file": pki.server.cert} if given == "cert" else {"tls_key_file": pki.server.key}
    )
    # A ValueError from Settings validation (pydantic's ValidationError is one)
    # or from build_server: either way the server never listens.
    with pytest.raises(ValueError, match=r"AUTHSVC_TLS_CERT_FILE.*AUTHSVC_TLS_KEY_FILE"):
        await build_server(make_settings(tmp_path, **only))


@pytest.mark.parametrize("given", ["CERT", "KEY"])
async def test_half_a_key_pair_stops_the_cli_with_a_clear_message(
    given: str, pki: Pki, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    env.update(
        AUTHSVC_DATA_DIR=str(tmp_path / "data"),
        AUTHSVC_LISTEN="127.0.0.1:0",
        AUTHSVC_LOG_FORMAT="json",
    )
    env[f"AUTHSVC_TLS_{given}_FILE"] = str(pki.server.cert if given == "CERT" else pki.server.key)
    proc = await spawn_authsvc("serve", env=env, console_script=False)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert_no_secrets(err.decode(errors="replace"), proc=proc)
    assert proc.returncode != 0
    assert b"set both AUTHSVC_TLS_CERT_FILE and AUTHSVC_TLS_KEY_FILE" in out + err


async def test_client_ca_without_a_server_certificate_fails_to_start(
    pki: Pki, tmp_path: Path, log_file: Path
) -> None:
    """Asking for client certificates but serving plaintext is a misconfiguration.

    Silently serving plaintext without client authentication would drop the
    protection the operator asked for; the server must refuse to start.
    """
    built: list[Server] = []

    async def build() -> None:
        built.append(await build_server(make_settings(tmp_path, tls_client_ca_file=pki.ca)))

    try:
        with pytest.raises(ValueError, match="TLS"):
            await build()
    finally:
        for server in built:  # only if it wrongly started
            await server.server.stop(0)
            await server.core.close()
