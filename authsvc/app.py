"""The composition root: the one place that builds and wires everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import redis.asyncio as aioredis
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authsvc.api.access import access_table, errors_table
from authsvc.api.edge import ApiKeys, EdgeInterceptor
from authsvc.api.servicers import AuthServicer, OrgServicer, SessionServicer, UserServicer
from authsvc.config import Settings
from authsvc.domain.metrics import Metrics
from authsvc.domain.ports import RateLimiter
from authsvc.metrics import (
    GrpcServerMetrics,
    MetricsEndpoint,
    Sample,
    SampledCollector,
    ServiceMetrics,
)
from authsvc.security.jwt_tokens import AccessTokenCodec
from authsvc.security.page_tokens import PageTokens
from authsvc.security.passwords import Argon2Hasher
from authsvc.security.refresh import RefreshTokens
from authsvc.security.secrets import Secrets, load_or_create_secret
from authsvc.services.auth import AuthPolicy, AuthService
from authsvc.services.auth_cache import AuthCache
from authsvc.services.keys import KeyStore
from authsvc.services.orgs import OrgService
from authsvc.services.revocations import RevocationFeed
from authsvc.services.sessions import SessionService
from authsvc.services.users import UserService
from authsvc.storage import migrate
from authsvc.storage.database import SqlDatabase, create_engine
from authsvc.storage.event_log import EventLog, LocalEventBus, stop_task
from authsvc.storage.memory import MemoryRateLimiter
from authsvc.storage.redis_store import RedisEventBus, RedisRateLimiter
from authsvc.tracing import Tracing
from authsvc.tracing import enabled as tracing_enabled
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    orgs_pb2,
    orgs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

log = structlog.get_logger("authsvc.app")

SERVICES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    users_pb2.DESCRIPTOR.services_by_name["UserService"],
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
    orgs_pb2.DESCRIPTOR.services_by_name["OrgService"],
)


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class Core:
    """Everything below the gRPC layer; also what the CLI uses."""

    settings: Settings
    db: SqlDatabase
    secrets: Secrets
    keys: KeyStore
    auth: AuthService
    users: UserService
    sessions: SessionService
    orgs: OrgService
    feed: RevocationFeed
    cache: AuthCache
    event_log: EventLog
    bus: LocalEventBus | RedisEventBus
    limiter: RateLimiter
    executor: ThreadPoolExecutor
    redis: aioredis.Redis | None
    clock: SystemClock

    async def close(self) -> None:
        await self.bus.close()
        await self.limiter.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def build_core(
    settings: Settings,
    *,
    create_keys: bool = True,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Core:
    """Connects storage and builds the services. Migrates the embedded default.

    ``metrics``: what the services report to (None: nothing is counted).
    ``tracing``: spans for the engine's statements and the Redis client's commands.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if not settings.uses_postgres:
        await asyncio.to_thread(migrate.upgrade, url)
    secrets = Secrets(
        load_or_create_secret(
            settings.secret_key.get_secret_value() if settings.secret_key else None,
            settings.data_dir,
        )
    )
    db = SqlDatabase(
        create_engine(
            url, pool_size=settings.database_pool_size, pgbouncer=settings.database_pgbouncer
        ),
        pgbouncer=settings.database_pgbouncer,
    )
    if tracing is not None:
        tracing.instrument_engine(db.engine)
    await migrate.require_head(db.engine)
    clock = SystemClock()
    # Events are kept as long as the tokens they concern can live.
    retention = settings.access_token_ttl + 60.0
    redis_client: aioredis.Redis | None = None
    bus: LocalEventBus | RedisEventBus
    limiter: RateLimiter
    event_log = EventLog(db, retention=retention)
    # The relay's poll, and the follower's reads of the database's log while
    # Redis is down: well within the max lag.
    poll = min(0.25, settings.revocation_max_lag / 4)
    if settings.redis_url is not None:
        url = settings.redis_url.get_secret_value()
        redis_client = aioredis.from_url(
            url,
            # Calls wait on these: a Redis that hangs must answer
            # BACKEND_UNAVAILABLE soon, not hold the call.
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            # Servers and proxies drop idle connections: check one that sat
            # idle before using it, and retry a call whose connection broke.
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        if tracing is not None:
            # Not the follower: its blocking XREAD is background work.
            tracing.instrument_redis(redis_client)
        # The follower's blocking XREAD needs a connection (and a timeout
        # longer than its block) of its own; it handles failures itself.
        follower = aioredis.from_url(
            url,
            socket_timeout=settings.revocation_max_lag / 2 + 1.0,
            socket_connect_timeout=1.0,
            health_check_interval=10,
        )
        bus = RedisEventBus(
            redis_client, follower, event_log, max_lag=settings.revocation_max_lag, poll=poll
        )
        limiter = RedisRateLimiter(redis_client)
    else:
        bus = LocalEventBus(event_log, poll=poll)
        limiter = MemoryRateLimiter()
    db.on_commit = bus.committed
    access_ttl = timedelta(seconds=settings.access_token_ttl)
    keys = KeyStore(
        db,
        secrets,
        clock,
        access_ttl=access_ttl,
        retire_margin=timedelta(seconds=settings.key_retire_margin),
    )
    await keys.load(create=create_keys)
    executor = ThreadPoolExecutor(settings.hash_workers, thread_name_prefix="argon2")
    hasher = Argon2Hasher(
        time_cost=settings.argon2_time_cost,
        memory_kib=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
        executor=executor,
        metrics=metrics,
    )
    cache = AuthCache(max_entries=settings.auth_cache_size, ttl=settings.auth_cache_ttl)
    bus.subscribe(lambda event: cache.mark(event.key), cache.clear)
    pages = PageTokens(secrets.subkey("page-token"))
    auth = AuthService(
        db=db,
        hasher=hasher,
        keys=keys,
        codec=AccessTokenCodec(issuer=settings.issuer, audience=settings.audience, ttl=access_ttl),
        refresh_tokens=RefreshTokens(secrets.subkey("refresh-token")),
        cache=cache,
        bus=bus,
        limiter=limiter,
        clock=clock,
        policy=AuthPolicy(
            access_ttl=access_ttl,
            session_ttl=timedelta(seconds=settings.session_ttl),
            reuse_grace=timedelta(seconds=settings.refresh_reuse_grace),
            reuse_grace_count=settings.refresh_reuse_grace_count,
            password_min_length=settings.password_min_length,
            password_max_length=settings.password_max_length,
            signup_enabled=settings.signup_enabled,
            signin_attempts_per_email=settings.signin_attempts_per_email,
            signin_attempts_per_ip=settings.signin_attempts_per_ip,
            rate_limit_window=settings.rate_limit_window,
        ),
        metrics=metrics,
    )
    return Core(
        settings=settings,
        db=db,
        secrets=secrets,
        keys=keys,
        auth=auth,
        users=UserService(db=db, auth=auth, pages=pages, clock=clock),
        sessions=SessionService(db=db, auth=auth, pages=pages, clock=clock),
        orgs=OrgService(db=db, auth=auth, pages=pages, clock=clock),
        feed=RevocationFeed(bus, heartbeat=settings.revocation_heartbeat),
        cache=cache,
        event_log=event_log,
        bus=bus,
        limiter=limiter,
        executor=executor,
        redis=redis_client,
        clock=clock,
    )


@dataclass
class Server:
    core: Core
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    #: The /metrics endpoint (None: AUTHSVC_METRICS_LISTEN is empty).
    metrics: MetricsEndpoint | None = None
    #: Owned by the server: flushed and shut down last in ``stop``.
    tracing: Tracing | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (None: metrics are off)."""
        return self.metrics.port if self.metrics is not None else None

    async def start(self) -> None:
        await self.core.bus.start()
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for service in SERVICES:
            await self.health.set(service.full_name, health_pb2.HealthCheckResponse.SERVING)
        settings = self.core.settings
        self._tasks = [
            asyncio.create_task(_every(settings.key_reload_interval, self.core.keys.load)),
            asyncio.create_task(_every(max(settings.auth_cache_ttl, 1.0), _prune(self.core))),
        ]
        log.info(
            "server.started", listen=settings.listen, port=self.port, metrics=self.metrics_port
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within ``grace``."""
        grace = self.core.settings.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.core.feed.close()
        # Let health checkers and load balancers see NOT_SERVING before the
        # listener closes; in-flight calls carry on meanwhile.
        await asyncio.sleep(min(0.5, grace))
        for task in self._tasks:
            await stop_task(task)
        await self.server.stop(grace)
        await self.core.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        await _shutdown(self.tracing)
        log.info("server.stopped")


def _prune(core: Core) -> Callable[[], Awaitable[None]]:
    async def prune() -> None:
        core.cache.prune()

    return prune


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("background.failed")


async def _shutdown(tracing: Tracing | None) -> None:
    if tracing is not None:
        await tracing.shutdown()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    # Settings has already refused half a pair, and a client CA without one.
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def build_server(
    settings: Settings,
    *,
    extra: Callable[[grpc.aio.Server], None] | None = None,
    tracing: Tracing | None = None,
) -> Server:
    """Builds the gRPC server (not started). ``extra`` may register more services.

    ``tracing`` (off when None): RPC, statement and Redis spans; the server
    owns it from here on, and shuts it down in ``stop`` (or if building fails).
    """
    # Before build_core: a bad TLS setting must not leave a database engine,
    # thread pool and Redis client behind, nor a metrics address in use.
    endpoint: MetricsEndpoint | None = None
    try:
        credentials = _credentials(settings)
        registry = CollectorRegistry(auto_describe=True) if settings.metrics_listen else None
        endpoint = _metrics_endpoint(registry, settings.metrics_listen)
        core = await build_core(
            settings,
            metrics=ServiceMetrics(registry) if registry is not None else None,
            tracing=tracing,
        )
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        await _shutdown(tracing)
        raise
    try:
        grpc_metrics = None
        if registry is not None:
            grpc_metrics = GrpcServerMetrics(registry)
            grpc_metrics.add_services((*SERVICES, *INFRA_SERVICES))
            registry.register(SampledCollector(asyncio.get_running_loop(), _sampler(core)))
        interceptor = EdgeInterceptor(
            access_table(SERVICES),
            core.auth.authenticate,
            ApiKeys(settings.api_keys),
            reasons=errors_table(SERVICES),
            metrics=grpc_metrics,
        )
        # The RPC span first: the edge's log line and every statement run in it.
        spans = [tracing.server_interceptor()] if tracing is not None else []
        server = grpc.aio.server(
            interceptors=[*spans, interceptor],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                # Request metadata up to 256 KiB: far above any real credential,
                # so an oversized one reaches the edge and is refused with an
                # ErrorInfo; soft equal to hard, so nothing below it is
                # rejected at random.
                ("grpc.max_metadata_size", 256 * 1024),
                ("grpc.absolute_max_metadata_size", 256 * 1024),
            ],
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(core.auth, core.keys, core.feed), server
        )
        users_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(core.users), server)
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(core.sessions), server
        )
        orgs_pb2_grpc.add_OrgServiceServicer_to_server(OrgServicer(core.orgs), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if extra is not None:
            extra(server)
        if settings.reflection:
            names = [s.full_name for s in SERVICES]
            names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
            names += [reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, server)
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except BaseException:
        # Whatever fails after build_core (add_secure_port refusing the
        # certificate or key it was given, a bad ``extra``) must not leave
        # the database engine, thread pool and Redis client behind.
        await core.close()
        if endpoint is not None:
            endpoint.stop()
        await _shutdown(tracing)
        raise
    return Server(
        core=core, server=server, health=health, port=port, metrics=endpoint, tracing=tracing
    )


#: Health and reflection: counted like authsvc's own services.
INFRA_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)


class MetricsListenError(Exception):
    """AUTHSVC_METRICS_LISTEN cannot be served (the address is in use, say)."""


def _metrics_endpoint(registry: CollectorRegistry | None, listen: str) -> MetricsEndpoint | None:
    if registry is None:
        return None
    endpoint = MetricsEndpoint(registry, listen)
    try:
        endpoint.start()
    except OSError as error:
        raise MetricsListenError(
            f"cannot serve metrics on AUTHSVC_METRICS_LISTEN={listen}: {error.strerror or error}"
        ) from None
    return endpoint


def _sampler(core: Core) -> Callable[[], Awaitable[Sample]]:
    """The gauges Prometheus reads at a scrape, read on the server's loop."""

    async def sample() -> Sample:
        try:
            outbox: tuple[int, float] | None = await asyncio.wait_for(core.bus.backlog(), 1.5)
        except Exception:  # the database is down or slow: left out of this scrape
            outbox = None
        return Sample(
            bus_healthy=core.bus.healthy(),
            bus_lag=core.bus.lag(),
            bus_source=core.bus.source,
            watchers=core.feed.watchers,
            pool_in_use=core.db.pool_in_use(),
            pool_waiting=core.db.waiting,
            outbox=outbox,
        )

    return sample


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight calls.

    Traces when the ``OTEL_*`` environment configures an OTLP endpoint.
    """
    tracing = Tracing.from_environment() if tracing_enabled(os.environ) else None
    server = await build_server(settings, tracing=tracing)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("server.stopping")
    with contextlib.suppress(asyncio.CancelledError):
        await server.stop()
