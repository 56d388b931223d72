"""Application fixtures: real authsvc servers on real channels.

``api`` is the workhorse: a running server on each backend (``embedded``:
SQLite file + in-process store; ``postgres``: PostgreSQL + Redis), reached over
a real ``grpc.aio`` channel through the generated stubs, with its tables
emptied before each test.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from google.protobuf.message import Message
from sqlalchemy import delete, select

from authsvc import logs
from authsvc.app import Server, build_server
from authsvc.config import Settings
from authsvc.security.secrets import Secrets
from authsvc.storage import migrate
from authsvc.storage.redis_store import STREAM_PREFIX, RedisEventBus
from authsvc.storage.tables import (
    events,
    memberships,
    metadata,
    orgs,
    refresh_tokens,
    sessions,
    users,
)
from authsvc.tracing import Tracing
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.sidecar import Sidecar
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    orgs_pb2,
    orgs_pb2_grpc,
    resources_pb2,
    sessions_pb2_grpc,
    users_pb2_grpc,
)

SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
API_KEY = "ak_test_service_key_0123456789abcdef"
API_KEYS = f"test-service:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
PASSWORD = "correct horse battery staple"

# -- secrets in logs -------------------------------------------------------------
#
# Everything the servers of the suite log (in-process: the ``log_file``; as
# subprocesses: their stderr, see tests/processes.py) is searched for
#
# * every value in SECRETS: what tests ``remember()``, and every token any
#   test channel received (an interceptor on every grpc.aio channel), with
#   the parts of a token that identify it on their own;
# * every secret byte string in the forms a log could show it (hex, base64,
#   base64url, Python's bytes repr, PEM/PKCS#8 for private keys): the master
#   secrets, every subkey derived from them, every signing key sealed or
#   unsealed (recorded from authsvc.security.secrets.Secrets as it runs);
# * anything shaped like a secret whoever made it: a JWT, a refresh token, an
#   API key, an Argon2 hash, a PEM private key, a JWK "d".

SECRETS: set[str] = {SECRET_KEY, API_KEY, PASSWORD}
SECRET_BYTES: set[bytes] = set()
# Every Secrets.subkey purpose: those of today, and any other an in-process
# server derives (recorded), so subprocesses' subkeys are known even when no
# in-process server ran before them.
_PURPOSES: set[str] = {"key-seal", "page-token", "refresh-token"}
_MASTERS: set[bytes] = {SECRET_KEY.encode()}

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_SHAPES = {
    "a JWT": _JWT,
    "a refresh token": re.compile(r"\brt_[A-Za-z0-9_-]{20,}"),
    "an API key": re.compile(r"\bak_[A-Za-z0-9_-]{20,}"),
    "a password hash": re.compile(r"\$argon2"),
    "a PEM private key": re.compile(r"PRIVATE KEY-----"),
    'a JWK "d"': re.compile(r"""["']d["']\s*:\s*["'][A-Za-z0-9_-]{43}["']"""),
}


def remember(*values: str) -> None:
    """Adds values the logs must never show; tokens with their telling parts."""
    for value in values:
        if not value:
            continue
        SECRETS.add(value)
        if _JWT.fullmatch(value):
            SECRETS.add(value.rsplit(".", 1)[1])  # the signature alone
        elif value.startswith(("rt_", "ak_")) and len(value) > 20:
            SECRETS.add(value[3:])


def remember_master(secret: str) -> None:
    """A master secret (AUTHSVC_SECRET_KEY, a secret.key file): it and every
    subkey derived from it (for each purpose the servers used) are searched."""
    remember(secret)
    _MASTERS.add(secret.encode())


def remember_bytes(*values: bytes) -> None:
    SECRET_BYTES.update(v for v in values if len(v) >= 16)


def _remember_private_key(raw: bytes) -> None:
    remember_bytes(raw)
    if len(raw) == 32:  # an Ed25519 private key: also as PKCS#8 (PEM, DER)
        der = Ed25519PrivateKey.from_private_bytes(raw).private_bytes(
            Encoding.DER, PrivateFormat.PKCS8, NoEncryption()
        )
        remember_bytes(der)


def _forms(raw: bytes) -> set[str]:
    """The spellings of ``raw`` a log line could carry."""
    hexed = binascii.hexlify(raw).decode()
    forms = {hexed, hexed.upper(), repr(raw)[2:-1]}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw).decode()
        forms |= {text, text.rstrip("=")}
    return forms


def _all_secret_strings() -> set[str]:
    derived = {
        Secrets(master).subkey(purpose) for master in _MASTERS for purpose in sorted(_PURPOSES)
    }
    strings = set(SECRETS)
    for raw in SECRET_BYTES | derived | _MASTERS:
        strings |= _forms(raw)
    return strings


_RUN_CHARS = re.compile(r"[A-Za-z0-9_+/=.-]+")
_MIN_RUN = 16
_RUNS = re.compile(rf"[A-Za-z0-9_+/=.-]{{{_MIN_RUN},}}")


def _occurring(text: str, needles: set[str]) -> int:
    """How many of ``needles`` occur in ``text``.

    The suite's log is megabytes and the needles thousands (mostly tokens and
    base64/hex spellings), so those are looked up by their lengths in the runs
    of such characters the text holds, not searched for one by one.
    """
    needles = {n for n in needles if n}
    indexed = {n for n in needles if len(n) >= _MIN_RUN and _RUN_CHARS.fullmatch(n)}
    found = {n for n in needles - indexed if n in text}
    lengths = sorted({len(n) for n in indexed})
    for match in _RUNS.finditer(text):
        run = match.group()
        for length in lengths:
            if length > len(run):
                break
            for i in range(len(run) - length + 1):
                if run[i : i + length] in indexed:
                    found.add(run[i : i + length])
    return len(found)


def find_leaks(text: str, *extra: str) -> list[str]:
    """What secret-looking things ``text`` holds, described (never quoted)."""
    leaked = _occurring(text, _all_secret_strings() | set(extra))
    found = [f"{leaked} remembered secret(s)"] if leaked else []
    found += [f"{what} ({len(pattern.findall(text))}x)" for what, pattern in _SHAPES.items()]
    return [f for f in found if not f.endswith("(0x)")]


def _remember_message(message: Message) -> None:
    """Remembers every token-shaped string anywhere in a response."""
    for _, value in message.ListFields():
        items: list[Any]
        if isinstance(value, Mapping):
            items = list(value.values())
        elif isinstance(value, str | bytes | Message) or not isinstance(value, Iterable):
            items = [value]
        else:
            items = list(value)  # a repeated field
        for item in items:
            if isinstance(item, Message):
                _remember_message(item)
            elif isinstance(item, str) and (
                _JWT.fullmatch(item) or item.startswith(("rt_", "ak_"))
            ):
                remember(item)


class _RememberTokens(grpc.aio.UnaryUnaryClientInterceptor):
    """On every test channel: every token a response carries is remembered."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        call = await continuation(details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError:
            return call
        if isinstance(response, Message):
            _remember_message(response)
        return call


def _with_interceptor(make: Callable[..., grpc.aio.Channel]) -> Callable[..., grpc.aio.Channel]:
    def channel(*args: Any, interceptors: Any = None, **kwargs: Any) -> grpc.aio.Channel:
        return make(*args, interceptors=[*(interceptors or []), _RememberTokens()], **kwargs)

    return channel


class _JsonLines(logging.Handler):
    """Records of the standard library's loggers (grpc, asyncio, the client
    library), as JSON lines in the suite's log beside structlog's."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        line: dict[str, Any] = {"event": record.getMessage(), "logger": record.name}
        if record.exc_info:
            line["exception"] = logging.Formatter().formatException(record.exc_info)
        self.acquire()
        try:
            self.stream.write(json.dumps(line, default=str) + "\n")
            self.stream.flush()
        finally:
            self.release()


_SERVERS_STARTED: list[int] = [0]
#: authsvc subprocesses whose output was not yet checked (tests/processes.py)
UNCHECKED_PROCESSES: dict[int, str] = {}


def _record_secrets(mp: pytest.MonkeyPatch) -> None:
    """Wraps Secrets and Server.start to see what the servers hold and do."""
    init, subkey, seal, unseal = Secrets.__init__, Secrets.subkey, Secrets.seal, Secrets.unseal

    def recording_init(self: Secrets, master: bytes) -> None:
        _MASTERS.add(master)
        init(self, master)

    def recording_subkey(self: Secrets, purpose: str) -> bytes:
        _PURPOSES.add(purpose)
        derived = subkey(self, purpose)
        remember_bytes(derived)
        return derived

    def recording_seal(self: Secrets, plaintext: bytes, aad: bytes) -> bytes:
        _remember_private_key(plaintext)
        return seal(self, plaintext, aad)

    def recording_unseal(self: Secrets, sealed: bytes, aad: bytes) -> bytes:
        plaintext = unseal(self, sealed, aad)
        _remember_private_key(plaintext)
        return plaintext

    start = Server.start

    async def counted_start(self: Server) -> None:
        await start(self)
        _SERVERS_STARTED[0] += 1

    mp.setattr(Secrets, "__init__", recording_init)
    mp.setattr(Secrets, "subkey", recording_subkey)
    mp.setattr(Secrets, "seal", recording_seal)
    mp.setattr(Secrets, "unseal", recording_unseal)
    mp.setattr(Server, "start", counted_start)
    mp.setattr(grpc.aio, "insecure_channel", _with_interceptor(grpc.aio.insecure_channel))
    mp.setattr(grpc.aio, "secure_channel", _with_interceptor(grpc.aio.secure_channel))


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

    async def sign_up(
        self, email: str | None = None, password: str = PASSWORD
    ) -> resources_pb2.SignInResult:
        """Signs a new user up; the SignInResult (``.user``, ``.tokens``)."""
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        response = await self.auth.SignUp(auth_pb2.SignUpRequest(email=email, password=password))
        remember(
            password, response.result.tokens.access_token, response.result.tokens.refresh_token
        )
        return response.result

    async def admin_token(self) -> str:
        """Signs up a user, makes it admin through the API key, signs it in."""
        created = await self.sign_up()
        await self.server.core.auth.create_admin(email=created.user.email, password=PASSWORD)
        signed = await self.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
        remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
        return str(signed.result.tokens.access_token)

    async def settled(self) -> None:
        """Waits until every committed event has its position and, with
        Redis, is in the stream: the relay runs after a call returns, so a
        snapshot taken right after one would otherwise catch it moving."""
        await _settled(self)

    async def snapshot(self) -> dict[str, Any]:
        """Every row of every table in the schema and, on postgres, every Redis
        key with its content: to prove a failed call changed nothing."""
        await self.settled()
        out: dict[str, Any] = {}
        async with self.server.core.db.reader() as tx:
            for table in metadata.sorted_tables:
                rows = await tx.conn.execute(select(table))
                out[table.name] = sorted((tuple(r) for r in rows), key=repr)
        if self.server.core.redis is not None:
            try:
                out["redis"] = await redis_contents(self.server.core.redis)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                out["redis"] = "unreachable"  # a test that stopped it
        return out


async def _settled(api: Api, within: float = 5.0) -> None:
    core = api.server.core
    deadline = time.monotonic() + within
    while True:
        _, pending = await core.event_log.head()
        synced = True
        if not pending and isinstance(core.bus, RedisEventBus) and core.redis is not None:
            # The newest event the table holds (the head may be newer: the
            # api fixture deletes the events of earlier tests).
            async with core.db.reader() as tx:
                newest = (
                    await tx.conn.execute(
                        select(events.c.log_ms, events.c.log_seq)
                        .where(events.c.log_ms.is_not(None))
                        .order_by(events.c.log_ms.desc(), events.c.log_seq.desc())
                        .limit(1)
                    )
                ).first()
            if newest is not None:
                position = (int(newest[0]), int(newest[1]))
                synced = await _stream_caught_up(core.redis, core.bus.stream, position)
        if not pending and synced:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the event log did not settle within {within}s")
        await asyncio.sleep(0.005)


async def _stream_caught_up(client: aioredis.Redis, stream: str, head: tuple[int, int]) -> bool:
    """Whether the stream holds the log up to ``head`` (or Redis is down: a
    test that stopped it; the events wait in the database)."""
    try:
        if not await client.exists(stream):
            return False
        info: Any = await client.xinfo_stream(stream)
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
        return True
    top = tuple(int(x) for x in _text(info["last-generated-id"]).split("-"))
    return top >= head


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: Keys whose change a refused call may legitimately cause: the sign-in rate
#: limiter counts failed attempts (that is its job; a refused SignIn must count).
RATE_LIMIT_KEYS = "authsvc:rl:"


async def redis_contents(client: aioredis.Redis) -> dict[str, Any]:
    """Every key (but the rate limiter's) and its value: strings by value,
    streams by entries, and so on; TTLs are left out, they tick."""
    out: dict[str, Any] = {}
    async for raw in client.scan_iter(count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        if key.startswith(RATE_LIMIT_KEYS):
            continue
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "stream":
            # What the entries say, not when: without their ids and publication
            # times, as a set (announcing an announced event again changes
            # nothing a reader acts on).
            entries: list[Any] = list(await client.xrange(key) or [])
            value = sorted(
                {
                    tuple(sorted((k, v) for k, v in (fields or {}).items() if k != b"at"))
                    for _, fields in entries
                }
            )
        elif kind == "hash":
            value = sorted((await client.hgetall(key)).items())
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        out[key] = (kind, value)
    return out


async def reset_redis(client: aioredis.Redis) -> None:
    """Puts back what tests change in the session's Redis: no rate-limit
    counters, and revocation streams holding only their newest entry (so a
    snapshot reads little more than this test's events; trimming keeps a
    stream's last id, so the relay never appends an old event again)."""
    await client.delete(*[k async for k in client.scan_iter(RATE_LIMIT_KEYS + "*")] or ["_"])
    async for stream in client.scan_iter(STREAM_PREFIX + "*"):
        await client.xtrim(stream, maxlen=1, approximate=False)


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


@pytest.fixture(scope="session", autouse=True)
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The whole suite logs JSON here; at the end no secret may appear in it.

    Autouse, so it is set up before any server of any test: every in-process
    server logs here (checked at the end: one ``server.started`` line per
    Server.start), and so do the standard library's loggers.
    """
    path = tmp_path_factory.mktemp("logs") / "authsvc.log"
    with path.open("w") as stream, pytest.MonkeyPatch.context() as mp:
        logs.configure("json", "debug", stream)
        handler = _JsonLines(stream)
        logging.getLogger().addHandler(handler)
        _record_secrets(mp)
        try:
            yield path
        finally:
            logging.getLogger().removeHandler(handler)
    text = path.read_text()
    started = text.count('"event": "server.started"')
    assert started >= _SERVERS_STARTED[0], (
        f"{_SERVERS_STARTED[0]} servers started, {started} logged it here: some log elsewhere"
    )
    leaks = find_leaks(text)
    assert not leaks, f"the suite's log ({path}) shows {', '.join(leaks)}"
    assert not UNCHECKED_PROCESSES, (
        f"output of {len(UNCHECKED_PROCESSES)} authsvc subprocess(es) never checked for "
        f"secrets: {sorted(set(UNCHECKED_PROCESSES.values()))}"
    )


@pytest.fixture(scope="session", params=["embedded", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_api(
    backend: Backend, tmp: Path, *, tracing: Tracing | None = None, **overrides: Any
) -> Api:
    """Starts another server on the backend (tests that need their own settings)."""
    server = await build_server(
        test_settings(tmp, **{**backend.urls, **overrides}), tracing=tracing
    )
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
        await reset_redis(core.redis)
    return _api_server


@pytest.fixture
async def own_server(
    api: Api, backend_urls: Backend, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Starts servers with other settings on this test's backend.

    Requesting ``api`` empties the tables first. On Postgres the extra server
    shares the database (and Redis) with the shared one, so the rows it made
    are removed when the test ends.
    """
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        other = await start_api(backend_urls, tmp_path / f"own-{len(started)}", **overrides)
        started.append(other)
        return other

    yield start
    for other in started:
        await stop_api(other)
    async with api.server.core.db.transaction() as tx:
        for table in (memberships, orgs, refresh_tokens, sessions, users):
            await tx.conn.execute(delete(table))


#: What a server needs for a spent refresh token to count as reused at once:
#: no grace interval to wait out.
NO_GRACE = {"refresh_reuse_grace": 0.0}


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
async def _storage_redis(storage: Storage) -> None:
    """The session's Redis as a test on ``storage`` expects to find it."""
    url = storage.backend.urls.get("redis_url")
    if url is not None:
        client = aioredis.from_url(url)
        try:
            await reset_redis(client)
        finally:
            await client.aclose()


@pytest.fixture
async def servers(
    storage: Storage, _storage_redis: None, log_file: Path
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Starts in-process servers on the test's store; stops them afterwards.

    Their logs go to the suite's log (``log_file``), which is checked for secrets.
    """
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        api = await start_api(storage.backend, storage.data_dir, **overrides)
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


# -- sidecars ------------------------------------------------------------------


async def until_tokens_are_covered(sidecar: Sidecar, bound: float = 2.0) -> None:
    """Waits until a token minted now needs no online check in watch mode.

    After a gap in the revocation log (authsvc's log is younger than a token
    lifetime, as in this suite, so the first answer reports one) tokens issued
    before the stream's first answer are checked online; ``iat`` is whole
    seconds, so that is until the second after it has begun. The condition is
    the sidecar's own (its watcher's ``needs_online``), polled.
    """
    watcher = sidecar._watcher
    assert watcher is not None, "not a started watch-mode sidecar"
    deadline = time.monotonic() + bound
    while watcher.needs_online(int(time.time())):
        assert time.monotonic() < deadline, "tokens minted now are still checked online"
        await asyncio.sleep(0.005)


# -- organizations -------------------------------------------------------------


OrgRole: TypeAlias = resources_pb2.OrgRole.ValueType


def new_slug(prefix: str = "org") -> str:
    """A slug no other org of the test has."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class OrgUser:
    """A user and the token pair of one session of theirs (its active org, if
    any, is the one it was made for)."""

    user: Any  # resources_pb2.User
    tokens: Any  # resources_pb2.TokenPair

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


async def org_member(
    api: Api, org_id: str, role: OrgRole = resources_pb2.ORG_ROLE_MEMBER
) -> OrgUser:
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


async def bounded_teardown(step: Awaitable[Any], what: str, seconds: float = 15.0) -> None:
    """A teardown step that may not hang the suite.

    grpc.aio objects of a test's own (a channel, a server behind the sidecar)
    have been seen, rarely and only on a loaded machine, never finishing
    ``close()``/``stop()``. A hung step is abandoned after ``seconds``, with
    every task's stack written to stderr and a warning, so the next steps
    (closing the sidecar) still run and the suite goes on.
    """
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        print(f"\n--- teardown step hung: {what}; tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            try:
                task.print_stack(file=sys.stderr)
            except Exception as error:  # a frame without a line number (3.11's linecache)
                print(f"{task!r}: no stack ({error!r})", file=sys.stderr)
        warnings.warn(f"teardown step hung and was abandoned: {what}", stacklevel=2)
