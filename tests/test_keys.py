"""Signing keys: the JWKS, rotation while servers run, and sealing at rest.

Rotation is driven the way an operator does it: ``authsvc keys rotate`` in a
subprocess against the database a server is using (a SQLite file shared
between processes on the embedded backend, a fresh PostgreSQL database on
the postgres one). A second server started afterwards stands in for a replica
that already has the new key.
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from google.protobuf.json_format import MessageToDict
from sqlalchemy import select

from authsvc.security.secrets import Secrets
from authsvc.storage import migrate
from authsvc.storage.tables import signing_keys
from authsvc_client.v1 import auth_pb2
from tests.app import (
    PASSWORD,
    SECRET_KEY,
    Api,
    Storage,
    failure,
    remember,
)
from tests.processes import assert_no_secrets, clean_env, run_authsvc

JWK_FIELDS = {"kty", "crv", "x", "kid", "use", "alg"}

# --------------------------------------------------------------------------- helpers


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def b64url_decode(text: str) -> bytes:
    assert "=" not in text, "JWK members are unpadded base64url (RFC 7515 section 2)"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def jwks(api: Api) -> dict[str, dict[str, str]]:
    reply = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
    keys = [MessageToDict(k, preserving_proto_field_name=True) for k in reply.keys]
    by_kid = {k["kid"]: k for k in keys}
    assert len(by_kid) == len(keys), "duplicate kid in the JWKS"
    return by_kid


async def sign_in(api: Api, email: str) -> Any:
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return signed.result


async def authenticates(api: Api, token: str) -> str:
    who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    return str(who.session.user_id)


def verify_with_jwks(token: str, keys: dict[str, dict[str, str]], api: Api) -> dict[str, Any]:
    """Verifies like a third party: the JWK named by the token's kid, through PyJWK."""
    jwk = jwt.PyJWK(keys[kid_of(token)])
    assert jwk.key_type == "OKP"
    assert jwk.algorithm_name == "EdDSA"
    claims: dict[str, Any] = jwt.decode(
        token,
        jwk.key,
        algorithms=["EdDSA"],
        audience=api.settings.audience,
        issuer=api.settings.issuer,
    )
    return claims


@pytest.fixture
def storage(storage: Storage) -> Storage:
    """This module's store, migrated up front (on the embedded default the
    first server migrates it anyway)."""
    url = storage.env.get("AUTHSVC_DATABASE_URL")
    if url is not None:
        with ThreadPoolExecutor(1) as pool:  # Alembic's env runs its own event loop
            pool.submit(migrate.upgrade, url).result()
    return storage


async def cli_rotate(storage: Storage) -> str:
    """``authsvc keys rotate`` as a subprocess; returns the new kid."""
    result = await run_authsvc("keys", "rotate", env=clean_env(**storage.env))
    assert_no_secrets(result.stdout)
    assert result.code == 0, result.stderr
    match = re.match(r"new signing key ([0-9a-f]{32}) is active; ", result.stdout)
    assert match, result.stdout
    return match.group(1)


# --------------------------------------------------------------------------- JWKS


async def test_jwks_is_an_okp_ed25519_key_that_verifies_access_tokens(api: Api) -> None:
    created = await api.sign_up()
    token = created.tokens.access_token
    keys = await jwks(api)
    assert keys, "empty JWKS"
    for kid, key in keys.items():
        # RFC 8037 section 2: kty OKP, crv Ed25519, x the 32-byte public key.
        assert set(key) == JWK_FIELDS, sorted(key)
        assert key["kty"] == "OKP"
        assert key["crv"] == "Ed25519"
        assert len(b64url_decode(key["x"])) == 32
        assert key["use"] == "sig"
        assert key["alg"] == "EdDSA"
        assert key["kid"] == kid
        assert "d" not in key  # never the private part

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] in keys
    assert header["kid"] == api.server.core.keys.active.kid

    claims = verify_with_jwks(token, keys, api)
    assert claims["sub"] == created.user.id
    assert claims["sid"] == created.tokens.session_id
    assert claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == api.settings.access_token_ttl

    # The JWK is the key the server holds: a token it did not sign fails.
    forged_key = Ed25519PrivateKey.generate()
    forged = jwt.encode(
        {**claims, "role": "admin"}, forged_key, algorithm="EdDSA", headers={"kid": header["kid"]}
    )
    with pytest.raises(jwt.InvalidSignatureError):
        verify_with_jwks(forged, keys, api)
    error = await failure(api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=forged)))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_token_naming_an_unknown_key_is_rejected(api: Api) -> None:
    created = await api.sign_up()
    claims = verify_with_jwks(created.tokens.access_token, await jwks(api), api)
    foreign = jwt.encode(
        claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": uuid.uuid4().hex}
    )
    error = await failure(api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=foreign)))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_private_key_is_sealed_at_rest(api: Api) -> None:
    active = api.server.core.keys.active
    assert active.private is not None
    raw_private = active.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = active.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    async with api.server.core.db.reader() as tx:
        rows = (await tx.conn.execute(select(signing_keys))).mappings().all()
    row = next(r for r in rows if r["kid"] == active.kid)
    sealed = bytes(row["private_key_sealed"])

    # Not the raw key, nor a common encoding of it.
    encodings = (
        raw_private,
        raw_private.hex().encode(),
        base64.b64encode(raw_private),
        base64.urlsafe_b64encode(raw_private).rstrip(b"="),
    )
    assert not any(e in sealed for e in encodings), "the private key is stored in the clear"
    assert bytes(row["public_key"]) == raw_public
    # AES-GCM: 12-byte nonce, 32 bytes of ciphertext, 16-byte tag.
    assert len(sealed) == 12 + 32 + 16
    # It is the key, sealed under AUTHSVC_SECRET_KEY and bound to its kid...
    opened = Secrets(SECRET_KEY.encode()).unseal(sealed, active.kid.encode())
    assert opened == raw_private
    # ...which nothing else opens.
    with pytest.raises(InvalidTag):
        Secrets(b"another-secret-key-0123456789-abcdefghij").unseal(sealed, active.kid.encode())
    with pytest.raises(InvalidTag):
        Secrets(SECRET_KEY.encode()).unseal(sealed, uuid.uuid4().hex.encode())


# --------------------------------------------------------------------------- rotation


async def test_cli_rotation_while_a_server_runs(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    # No periodic reload during the test: only an unknown kid makes it reload.
    first = await servers(key_reload_interval=3600)
    old_kid = first.server.core.keys.active.kid
    created = await first.sign_up()
    email = created.user.email
    before = created.tokens.access_token
    assert kid_of(before) == old_kid

    new_kid = await cli_rotate(storage)
    assert new_kid != old_kid

    # Tokens minted before the rotation keep working.
    assert await authenticates(first, before) == created.user.id

    # A replica that starts now (or has reloaded) signs with the new key...
    second = await servers(key_reload_interval=3600)
    assert second.server.core.keys.active.kid == new_kid
    assert set(await jwks(second)) == {old_kid, new_kid}
    after = (await sign_in(second, email)).tokens.access_token
    assert kid_of(after) == new_kid

    # ...and the first server, which has not seen that key yet, reloads on it.
    assert new_kid not in first.server.core.keys.verification_keys
    assert await authenticates(first, after) == created.user.id
    assert first.server.core.keys.active.kid == new_kid
    first_jwks = await jwks(first)
    assert set(first_jwks) == {old_kid, new_kid}

    # After reloading it signs with the new key too; every token still works
    # on both servers and verifies against the published JWKS.
    fresh = (await sign_in(first, email)).tokens.access_token
    assert kid_of(fresh) == new_kid
    for token in (before, after, fresh):
        for api in (first, second):
            assert await authenticates(api, token) == created.user.id
        verify_with_jwks(token, first_jwks, first)

    # The store: one active key, the old one retired.
    async with first.server.core.db.reader() as tx:
        rows = {r.kid: r for r in await tx.keys.all()}
    assert set(rows) == {old_kid, new_kid}
    assert rows[new_kid].retired_at is None
    retired_at = rows[old_kid].retired_at
    assert retired_at is not None
    assert datetime.now(UTC) - retired_at < timedelta(minutes=5)


async def test_running_server_picks_up_a_rotation_by_itself(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    """The periodic reload: no token with the new kid needed."""
    api = await servers(key_reload_interval=0.2)
    created = await api.sign_up()
    old_kid = api.server.core.keys.active.kid
    new_kid = await cli_rotate(storage)

    for _ in range(200):  # 10 s
        if api.server.core.keys.active.kid == new_kid:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the server did not reload its keys within 10 s")
    assert set(await jwks(api)) == {old_kid, new_kid}
    token = (await sign_in(api, created.user.email)).tokens.access_token
    assert kid_of(token) == new_kid
    assert await authenticates(api, created.tokens.access_token) == created.user.id
    assert await authenticates(api, token) == created.user.id


async def test_in_process_rotation_by_a_second_server_instance(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    """The same through ``core.keys.rotate()`` on another server, then ``keys.load()``."""
    first = await servers(key_reload_interval=3600)
    second = await servers(key_reload_interval=3600)
    created = await first.sign_up()
    old_kid = first.server.core.keys.active.kid
    assert second.server.core.keys.active.kid == old_kid

    new_kid = await second.server.core.keys.rotate()
    minted = (await sign_in(second, created.user.email)).tokens.access_token
    assert kid_of(minted) == new_kid
    assert await authenticates(first, created.tokens.access_token) == created.user.id

    await first.server.core.keys.load()
    assert first.server.core.keys.active.kid == new_kid
    assert await authenticates(first, minted) == created.user.id
    assert set(await jwks(first)) == {old_kid, new_kid}
