"""Application fixtures: real authsvc servers on real channels.

``api`` is the workhorse: a running server on each backend (``embedded``:
SQLite file + in-process store; ``postgres``: PostgreSQL + Redis), reached over
a real ``grpc.aio`` channel through the generated stubs, with its tables
emptied before each test.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
import jwt
import pytest
from sqlalchemy import delete, select

from authsvc import logs
from authsvc.app import Server, build_server
from authsvc.config import Settings
from authsvc.storage import migrate
from authsvc.storage.tables import (
    events,
    memberships,
    orgs,
    refresh_tokens,
    sessions,
    signing_keys,
    users,
)
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    orgs_pb2,
    orgs_pb2_grpc,
    sessions_pb2_grpc,
    users_pb2_grpc,
)

SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
API_KEY = "ak_test_service_key_0123456789abcdef"
API_KEYS = f"test-service:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
PASSWORD = "correct horse battery staple"

# Everything secret the suite sends or receives; the log check looks for each.
SECRETS: set[str] = {SECRET_KEY, API_KEY, PASSWORD}


def remember(*values: str) -> None:
    SECRETS.update(v for v in values if v)


@dataclass
class Api:
    """A running server and stubs on one channel to it."""

    server: Server
    backend: str
    target: str
    channel: grpc.aio.Channel
    auth: auth_pb2_grpc.AuthServiceAsyncStub = field(init=False)
    users: users_pb2_grpc.UserServiceAsyncStub = field(init=False)
    sessions: sessions_pb2_grpc.SessionServiceAsyncStub = field(init=False)
    orgs: orgs_pb2_grpc.OrgServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        # The stubs' __new__ overloads pick the sync type for an aio channel
        # under types-grpcio; these are the asyncio stubs.
        self.auth = cast(Any, auth_pb2_grpc.AuthServiceStub(self.channel))
        self.users = cast(Any, users_pb2_grpc.UserServiceStub(self.channel))
        self.sessions = cast(Any, sessions_pb2_grpc.SessionServiceStub(self.channel))
        self.orgs = cast(Any, orgs_pb2_grpc.OrgServiceStub(self.channel))

    @property
    def settings(self) -> Settings:
        return self.server.core.settings

    async def sign_up(self, email: str | None = None, password: str = PASSWORD) -> Any:
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        response = await self.auth.SignUp(auth_pb2.SignUpRequest(email=email, password=password))
        remember(password, response.tokens.access_token, response.tokens.refresh_token)
        return response

    async def admin_token(self) -> str:
        """Signs up a user, makes it admin through the API key, signs it in."""
        created = await self.sign_up()
        await self.server.core.auth.create_admin(email=created.user.email, password=PASSWORD)
        signed = await self.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
        remember(signed.tokens.access_token, signed.tokens.refresh_token)
        return str(signed.tokens.access_token)

    async def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, to prove a failed call changed nothing."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        async with self.server.core.db.reader() as tx:
            for table in (users, sessions, refresh_tokens, signing_keys, orgs, memberships):
                rows = await tx.conn.execute(select(table))
                out[table.name] = sorted(tuple(r) for r in rows)
        return out


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def service() -> tuple[tuple[str, str], ...]:
    return (("x-api-key", API_KEY),)


async def failure(call: Awaitable[Any]) -> AuthsvcError:
    """Awaits a call that must fail; returns its typed error."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return from_rpc_error(error)
    raise AssertionError("the call succeeded")


async def all_pages(
    fetch: Callable[[str], Awaitable[Any]], field: str
) -> tuple[list[Any], list[int]]:
    """Follows ``next_page_token`` from the first page to the last.

    Returns every item (the response's ``field``) and the size of each page.
    """
    items: list[Any] = []
    sizes: list[int] = []
    token = ""
    for _ in range(1000):
        page = await fetch(token)
        items.extend(getattr(page, field))
        sizes.append(len(getattr(page, field)))
        token = page.next_page_token
        if not token:
            return items, sizes
    raise AssertionError(f"paging {field} never ended")


def test_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "data_dir": tmp,
        "secret_key": SECRET_KEY,
        "api_keys": API_KEYS,
        "argon2_memory_kib": 1024,
        "argon2_time_cost": 1,
        "refresh_reuse_grace": 1.0,
        "signin_attempts_per_ip": 1_000_000,
        "signin_attempts_per_email": 1_000_000,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The whole suite logs JSON here; at the end no secret may appear in it."""
    path = tmp_path_factory.mktemp("logs") / "authsvc.log"
    with path.open("w") as stream:
        logs.configure("json", "debug", stream)
        yield path
    text = path.read_text()
    assert json.loads(text.splitlines()[0]), "the suite logged nothing"
    leaked = sorted(s for s in SECRETS if s in text)
    assert not leaked, f"{len(leaked)} secrets appear in the logs"
    assert "$argon2" not in text, "a password hash appears in the logs"
    assert not re.search(r"\brt_[A-Za-z0-9_-]{43}\b", text), "a refresh token appears in the logs"


@pytest.fixture(scope="session", params=["embedded", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_api(backend: Backend, tmp: Path, **overrides: Any) -> Api:
    """Starts another server on the backend (tests that need their own settings)."""
    server = await build_server(test_settings(tmp, **{**backend.urls, **overrides}))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    return Api(server, backend.name, target, grpc.aio.insecure_channel(target))


async def stop_api(api: Api) -> None:
    await api.channel.close()
    await api.server.stop(0)


@pytest.fixture(scope="session")
def migrated_postgres(postgres_dsn: str) -> str:
    """The session's Postgres database with the Alembic chain applied."""
    migrate.upgrade(postgres_dsn)
    return postgres_dsn


@dataclass(frozen=True)
class Backend:
    name: str
    urls: dict[str, str]


@pytest.fixture(scope="session")
def backend_urls(backend: str, request: pytest.FixtureRequest) -> Backend:
    """Settings that put a server on this backend (resolved outside the event loop)."""
    if backend == "postgres":
        return Backend(
            backend,
            {
                "database_url": request.getfixturevalue("migrated_postgres"),
                "redis_url": request.getfixturevalue("redis_url"),
            },
        )
    return Backend(backend, {})


@pytest.fixture(scope="session")
async def _api_server(
    backend_urls: Backend, log_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    api = await start_api(backend_urls, tmp_path_factory.mktemp(f"api-{backend_urls.name}"))
    yield api
    await stop_api(api)


@pytest.fixture
async def api(_api_server: Api) -> Api:
    """The shared server of this backend, with empty tables (signing keys kept)."""
    core = _api_server.server.core
    async with core.db.transaction() as tx:
        for table in (memberships, orgs, refresh_tokens, sessions, users, events):
            await tx.conn.execute(delete(table))
    core.cache.clear()
    if core.redis is not None:
        await core.redis.delete(*[k async for k in core.redis.scan_iter("authsvc:rl:*")] or ["_"])
    return _api_server


@dataclass
class Storage:
    """A store of one test's own, shared by its in-process servers and CLI runs."""

    backend: Backend
    data_dir: Path
    env: dict[str, str]  # the AUTHSVC_* a CLI on the same store needs


@pytest.fixture
def storage(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    """An empty store on this backend: a data dir, and on postgres a fresh,
    unmigrated database (servers on it share the session's Redis)."""
    data_dir = tmp_path / "data"
    env = {"AUTHSVC_DATA_DIR": str(data_dir), "AUTHSVC_SECRET_KEY": SECRET_KEY}
    if backend == "postgres":
        url = request.getfixturevalue("make_postgres_db")()
        env["AUTHSVC_DATABASE_URL"] = url
        urls = {"database_url": url, "redis_url": request.getfixturevalue("redis_url")}
        return Storage(Backend(backend, urls), data_dir, env)
    return Storage(Backend(backend, {}), data_dir, env)


@pytest.fixture
async def servers(storage: Storage, log_file: Path) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Starts in-process servers on the test's store; stops them afterwards.

    ``log_file`` routes their logs to the suite's log, which is checked for secrets.
    """
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        api = await start_api(storage.backend, storage.data_dir, **overrides)
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


# -- organizations -------------------------------------------------------------


OrgRole: TypeAlias = orgs_pb2.OrgRole.ValueType


def new_slug(prefix: str = "org") -> str:
    """A slug no other org of the test has."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class OrgUser:
    """A user and the token pair of one session of theirs (its active org, if
    any, is the one it was made for)."""

    user: Any  # users_pb2.User
    tokens: Any  # auth_pb2.TokenPair

    @property
    def id(self) -> str:
        return str(self.user.id)

    @property
    def token(self) -> str:
        return str(self.tokens.access_token)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


async def set_active_org(api: Api, refresh_token: str, org_id: str) -> Any:
    """SetActiveOrg on the session of ``refresh_token``; returns the new TokenPair."""
    response = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=refresh_token, org_id=org_id)
    )
    remember(response.tokens.access_token, response.tokens.refresh_token)
    return response.tokens


async def org_with_owner(
    api: Api, slug: str | None = None, name: str = "Acme"
) -> tuple[Any, OrgUser]:
    """A new user creates an org (becoming its owner) and makes it the active
    org of their session. Returns the org and the owner."""
    created = await api.sign_up()
    response = await api.orgs.CreateOrg(
        orgs_pb2.CreateOrgRequest(slug=slug or new_slug(), name=name),
        metadata=bearer(created.tokens.access_token),
    )
    tokens = await set_active_org(api, created.tokens.refresh_token, response.org.id)
    return response.org, OrgUser(created.user, tokens)


async def org_member(api: Api, org_id: str, role: OrgRole = orgs_pb2.ORG_ROLE_MEMBER) -> OrgUser:
    """A new user, added to the org with ``role`` (by the API key), whose
    session has the org active."""
    created = await api.sign_up()
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org_id, user_id=created.user.id, role=role),
        metadata=service(),
    )
    tokens = await set_active_org(api, created.tokens.refresh_token, org_id)
    return OrgUser(created.user, tokens)


async def refused(
    api: Api, call: Callable[[], Awaitable[Any]], code: grpc.StatusCode, reason: str
) -> AuthsvcError:
    """Makes a call that must fail with ``code``/``reason`` and change nothing.

    ``call`` starts the call when called (a grpc.aio call is under way as soon
    as it is made), so the snapshot is taken before it.
    """
    before = await api.snapshot()
    error = await failure(call())
    assert (error.code, error.reason) == (code, reason), error.message
    assert await api.snapshot() == before, "a failed call changed stored data"
    return error


def claims(access_token: str) -> dict[str, Any]:
    """The payload of an access token, read without verifying it."""
    return dict(jwt.decode(access_token, options={"verify_signature": False}))


async def who(api: Api, access_token: str) -> Any:
    """Authenticate: the SessionInfo of an access token."""
    response = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=access_token))
    return response.session


async def refreshed(api: Api, refresh_token: str) -> Any:
    """RefreshToken; returns the new TokenPair."""
    response = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=refresh_token)
    )
    remember(response.tokens.access_token, response.tokens.refresh_token)
    return response.tokens


async def members_of(api: Api, org_id: str) -> dict[str, OrgRole]:
    """Every member of an org and their role, read with the API key."""
    members, _ = await all_pages(
        lambda token: api.orgs.ListMembers(
            orgs_pb2.ListMembersRequest(org_id=org_id, page_token=token), metadata=service()
        ),
        "members",
    )
    return {m.user_id: m.role for m in members}
