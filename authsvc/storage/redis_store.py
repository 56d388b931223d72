"""Redis event bus and rate limiter, for several replicas.

Events go to one Redis stream. Every replica follows it with a blocking
XREAD from the last id it saw, so after a dropped connection it resumes where
it stopped instead of losing what was published meanwhile. While the follower
is not keeping up (no successful read within ``max_lag`` seconds) the bus
reports itself unhealthy, and the Authenticate cache is bypassed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from authsvc.domain.ports import EventHandler
from authsvc.errors import BackendUnavailable

log = structlog.get_logger("authsvc.events")

STREAM = "authsvc:events"
_STREAM_MAXLEN = 100_000
_BLOCK_MS = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEventBus:
    def __init__(self, client: aioredis.Redis, *, max_lag: float) -> None:
        self._redis = client
        self._max_lag = max_lag
        # An idle XREAD must return (and refresh _last_read) well within
        # max_lag, or a healthy but quiet stream would look stale.
        self._block_ms = max(10, min(_BLOCK_MS, int(max_lag * 1000 / 2)))
        self._handlers: list[EventHandler] = []
        self._resets: list[Callable[[], None]] = []
        self._last_read = 0.0
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None:
        self._handlers.append(handler)
        self._resets.append(on_reset)

    def _deliver(self, kind: str, key: str) -> None:
        for handler in self._handlers:
            handler(kind, key)

    async def publish(self, kind: str, key: str) -> None:
        # Local first: this replica must honour its own revocation at once,
        # even if Redis is down.
        self._deliver(kind, key)
        await self._redis.xadd(
            STREAM, {"kind": kind, "key": key}, maxlen=_STREAM_MAXLEN, approximate=True
        )

    def healthy(self) -> bool:
        return time.monotonic() - self._last_read < self._max_lag

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="authsvc-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        last_id: str | None = None
        backoff = 0.1
        while True:
            try:
                if last_id is None:
                    newest = await self._redis.xrevrange(STREAM, count=1)
                    last_id = _text(newest[0][0]) if newest else "0-0"
                    # Nothing was cached before this point could have been
                    # invalidated unseen: start clean.
                    for reset in self._resets:
                        reset()
                replies: Any = await self._redis.xread(
                    {STREAM: last_id}, block=self._block_ms, count=1000
                )
                self._last_read = time.monotonic()
                backoff = 0.1
                for _stream, entries in replies or []:
                    for entry_id, fields in entries:
                        last_id = _text(entry_id)
                        self._deliver(_text(fields[b"kind"]), _text(fields[b"key"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                log.warning("events.follow_failed", error=type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


class RedisRateLimiter:
    """Fixed windows: INCR plus EXPIRE NX in one round trip.

    Raises BackendUnavailable when Redis cannot be reached.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def hit(self, key: str, limit: int, window: int) -> float | None:
        name = "authsvc:rl:" + key
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, window, nx=True)
                pipe.ttl(name)
                count, _, ttl = await pipe.execute()
        except (RedisError, OSError) as error:
            # Fail closed: no sign-in without the brute-force limit.
            raise BackendUnavailable() from error
        return float(max(ttl, 1)) if int(count) > limit else None

    async def close(self) -> None:
        return None
