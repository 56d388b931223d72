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

from authsvc.domain.events import Event, Replay, position_key
from authsvc.domain.ports import EventHandler
from authsvc.errors import BackendUnavailable

log = structlog.get_logger("authsvc.events")

STREAM = "authsvc:events"
EPOCH = "authsvc:events:epoch"
_BLOCK_MS = 500
_REPLAY_BATCH = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(entry_id: Any, fields: Any) -> Event:
    get = fields.get
    return Event(
        kind=_text(get(b"kind", b"")),
        key=_text(get(b"key", b"")),
        version=int(get(b"version", 0) or 0),
        at=float(get(b"at", 0) or 0),
        position=_text(entry_id),
    )


class RedisEventBus:
    def __init__(self, client: aioredis.Redis, *, max_lag: float, retention: float) -> None:
        self._redis = client
        self._max_lag = max_lag
        self.retention = retention
        # An idle XREAD must return (and refresh _last_read) well within
        # max_lag, or a healthy but quiet stream would look stale.
        self._block_ms = max(10, min(_BLOCK_MS, int(max_lag * 1000 / 2)))
        self._handlers: list[EventHandler] = []
        self._resets: list[Callable[[], None]] = []
        self._listeners: list[EventHandler] = []
        self._last_read = 0.0
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None:
        self._handlers.append(handler)
        self._resets.append(on_reset)

    def listen(self, listener: EventHandler) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def publish(self, *events: Event) -> None:
        # Local first: this replica must honour its own revocation at once,
        # even if Redis is down.
        for event in events:
            for handler in self._handlers:
                handler(event)
        # Trim by age, not length: a watcher resuming from any position
        # younger than the retention (the longest a token lives) must find
        # everything after it.
        min_id = int((time.time() - self.retention) * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(
                    STREAM,
                    {
                        "kind": event.kind,
                        "key": event.key,
                        "version": event.version,
                        "at": repr(event.at),
                    },
                    minid=min_id,
                    approximate=True,
                )
            await pipe.execute()

    async def replay(self, after: str) -> Replay:
        """Raises: InvalidArgument, BackendUnavailable."""
        key = position_key(after) if after else (0, 0)
        try:
            return await self._replay(after, key)
        except (RedisError, OSError) as error:
            raise BackendUnavailable() from error

    async def _replay(self, after: str, key: tuple[int, int]) -> Replay:
        if not after:
            newest = await self._redis.xrevrange(STREAM, count=1)
            return Replay([], _text(newest[0][0]) if newest else "0-0", gap=False)
        horizon = (time.time() - self.retention) * 1000
        # When the stream began: a Redis that lost its data (a restart
        # without persistence) loses this key with it, and the first replay
        # afterwards starts a new epoch.
        await self._redis.set(EPOCH, str(int(time.time() * 1000)), nx=True)
        epoch = int(await self._redis.get(EPOCH) or 0)
        gap = False
        if key[0] >= horizon or (key[0] < epoch and epoch >= horizon):
            # A position the stream does not hold, which is recent (lost, or
            # another server's) or older than a stream that is itself younger
            # than the retention (events between the two were never in it).
            gap = not await self._redis.xrange(STREAM, min=after, max=after, count=1)
        events: list[Event] = []
        start = "-" if gap else "(" + after
        while True:
            entries: Any = await self._redis.xrange(STREAM, min=start, count=_REPLAY_BATCH)
            events.extend(_event(entry_id, fields) for entry_id, fields in entries)
            if len(entries) < _REPLAY_BATCH:
                break
            start = "(" + _text(entries[-1][0])
        if events:
            return Replay(events, events[-1].position, gap)
        if gap:
            newest = await self._redis.xrevrange(STREAM, count=1)
            return Replay([], _text(newest[0][0]) if newest else "0-0", gap)
        return Replay([], after, gap)

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
                        event = _event(entry_id, fields)
                        for handler in self._handlers:
                            handler(event)
                        for listener in list(self._listeners):
                            listener(event)
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
