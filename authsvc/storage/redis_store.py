"""Redis event bus and rate limiter, for several replicas.

The Redis stream is a fan-out of the database's event log
(``authsvc.storage.event_log``), never its source of truth. Every replica
runs a relay that positions committed events in the database and copies
every positioned event the stream lacks to it, under the same position
(idempotent: an entry at or below the stream's last id is skipped). The same
copy refills a stream that lost its data (a restart without persistence,
FLUSHALL, a failover to an empty replica) from the database, for the
retention window.

Every replica follows the stream with a blocking XREAD from the last
position it saw. While Redis cannot be read the follower reads the
database's log instead, so no event is missed either way; entries cached
before a failure are dropped when the follower resumes. While neither can
be read (no successful read within ``max_lag`` seconds) the bus reports
itself unhealthy, and the Authenticate cache is bypassed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from authsvc.domain.events import Event, position_key
from authsvc.errors import AuthError, BackendUnavailable
from authsvc.storage.event_log import (
    EventLog,
    LoggedBus,
    newest_position,
    position_text,
    stop_task,
)

log = structlog.get_logger("authsvc.events")

#: The stream's key is this plus the log's id (``event_log_head.log_id``).
STREAM_PREFIX = "authsvc:events:"
_BLOCK_MS = 500

# Appends events at their log positions, skipping any at or below the
# stream's last id (already there, or trimmed), in one atomic step, so two
# relays copying the same events append each once. ARGV: the MINID trim
# bound, then per event: id, kind, key, version, at.
_APPEND = """
local appended = 0
for i = 2, #ARGV, 5 do
  local ok = redis.pcall('XADD', KEYS[1], 'MINID', '~', ARGV[1], ARGV[i],
    'kind', ARGV[i + 1], 'key', ARGV[i + 2], 'version', ARGV[i + 3], 'at', ARGV[i + 4])
  if type(ok) == 'table' and ok.err then
    if not string.find(ok.err, 'equal or smaller') then
      return redis.error_reply(ok.err)
    end
  else
    appended = appended + 1
  end
end
return appended
"""


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


class RedisEventBus(LoggedBus):
    """Args:
    client: for the relay's appends and reads.
    follower: a client of its own for the blocking XREAD (its socket
        timeout must exceed the block time).
    log_: the database's event log.
    max_lag: seconds without a successful read before the bus is unhealthy.
    poll: seconds between relay passes when nothing wakes it, and between
        reads of the database's log while Redis is down.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        follower: aioredis.Redis,
        log_: EventLog,
        *,
        max_lag: float,
        poll: float,
    ) -> None:
        super().__init__(log_, poll=poll)
        self._redis = client
        self._follower = follower
        self._max_lag = max_lag
        self._poll = poll
        # An idle XREAD must return (and refresh _last_read) well within
        # max_lag, or a healthy but quiet stream would look stale.
        self._block_ms = max(10, min(_BLOCK_MS, int(max_lag * 1000 / 2)))
        self._append = client.register_script(_APPEND)
        self._last_read = 0.0
        self._task: asyncio.Task[None] | None = None
        self.stream = ""
        self.source = "redis"
        # The newest position known to be in the stream (None until the
        # relay's first copy): the outbox is what lies beyond it.
        self._copied: tuple[int, int] | None = None

    def healthy(self) -> bool:
        return time.monotonic() - self._last_read < self._max_lag

    def lag(self) -> float:
        """Seconds since the follower last read the log (Redis, or the database)."""
        return time.monotonic() - self._last_read

    async def backlog(self) -> tuple[int, float]:
        """Raises: BackendUnavailable."""
        return await self._log.backlog(self._copied)

    async def start(self) -> None:
        """Raises: BackendUnavailable (the database's log cannot be read)."""
        head, _ = await self._log.head()
        self.stream = STREAM_PREFIX + head.log_id
        self._relay.start("authsvc-relay")
        self._task = asyncio.create_task(self._follow(), name="authsvc-events")

    async def close(self) -> None:
        await self._relay.close()
        if self._task is not None:
            await stop_task(self._task)
        try:
            await asyncio.wait_for(self._follower.aclose(), 2.0)
        except (TimeoutError, RedisError, OSError):
            log.warning("events.follower_close_failed")

    # -- the relay ------------------------------------------------------------------

    async def _relay_step(self, woken: bool) -> None:
        positioned = await self._log.assign() if woken else []
        if positioned:
            top = position_key(positioned[-1].position)
        else:
            head, pending = await self._log.head()
            if pending:
                positioned = await self._log.assign()
            top = position_key(positioned[-1].position) if positioned else head.position
        await self._sync(top)

    async def _stream_top(self) -> tuple[int, int]:
        try:
            info: Any = await self._redis.xinfo_stream(self.stream)
        except ResponseError as error:
            if "no such key" in str(error).lower():
                return (0, 0)
            raise
        return position_key(_text(info["last-generated-id"]))

    async def _sync(self, top: tuple[int, int]) -> None:
        """Copies every positioned event the stream lacks, up to ``top``."""
        stream_top = await self._stream_top()
        while stream_top < top:
            events = await self._log.after(stream_top)
            if not events:
                break
            min_id = int((time.time() - self.retention) * 1000)
            args: list[Any] = [min_id]
            for e in events:
                args += [e.position, e.kind, e.key, e.version, repr(e.at)]
            await self._append(keys=[self.stream], args=args)
            stream_top = position_key(events[-1].position)
        self._copied = stream_top

    # -- the follower ---------------------------------------------------------------

    async def _follow(self) -> None:
        last: tuple[int, int] | None = None
        failing = True  # nothing cached before the first read is trusted
        while True:
            try:
                if last is None:
                    head, _ = await self._log.head()
                    last = newest_position(head)
                replies: Any = await self._follower.xread(
                    {self.stream: position_text(last)}, block=self._block_ms, count=BATCH_READ
                )
                self._read(reset=failing)
                self.source = "redis"
                failing = False
                for _stream, entries in replies or []:
                    events = [_event(entry_id, fields) for entry_id, fields in entries]
                    if events:
                        last = position_key(events[-1].position)
                        self._fanout.deliver(events)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, AuthError) as error:
                if not failing:
                    log.warning("events.follow_failed", error=type(error).__name__)
                    failing = True
                if last is not None:
                    last = await self._from_database(last)

    def _read(self, *, reset: bool) -> None:
        self._last_read = time.monotonic()
        if reset:
            # Resuming after a failure: whatever was cached before it was
            # built while events could be missed. Start clean.
            self._fanout.reset()

    async def _from_database(self, last: tuple[int, int]) -> tuple[int, int]:
        """Follows the database's log for a while, Redis being unreadable.

        Returns the last position read; Redis is tried again afterwards.
        """
        fresh = True
        until = time.monotonic() + _REDIS_RETRY
        while True:
            try:
                events = await self._log.after(last)
            except BackendUnavailable:
                events = None
            if events is not None:
                self._read(reset=fresh)
                self.source = "database"
                fresh = False
                if events:
                    self._fanout.deliver(events)
                    last = position_key(events[-1].position)
            if time.monotonic() >= until:
                return last
            await asyncio.sleep(self._poll)


#: Seconds the follower reads the database's log before trying Redis again.
_REDIS_RETRY = 1.0
BATCH_READ = 1000


#: Seconds a rate-limit check may take before the call fails closed.
LIMIT_TIMEOUT = 2.0


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class RedisRateLimiter:
    """Fixed windows: INCR plus EXPIRE NX in one round trip.

    Raises BackendUnavailable when Redis cannot be reached.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def hit(self, key: str, limit: int, window: int) -> float | None:
        # Bounded as a whole: redis-py's retries (reconnects within each try)
        # can add up to several seconds against a Redis that hangs. The call
        # runs as a task of its own, left to end by itself when it overruns,
        # so a driver call slow to honour cancellation cannot hold this one.
        counting = asyncio.ensure_future(self._count("authsvc:rl:" + key, window))
        done, _ = await asyncio.wait({counting}, timeout=LIMIT_TIMEOUT)
        if not done:
            counting.cancel()
            counting.add_done_callback(_consume)
            # Fail closed: no sign-in without the brute-force limit.
            raise BackendUnavailable()
        try:
            count, ttl = counting.result()
        except (RedisError, OSError) as error:
            raise BackendUnavailable() from error
        return float(max(ttl, 1)) if count > limit else None

    async def _count(self, name: str, window: int) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(name)
            pipe.expire(name, window, nx=True)
            pipe.ttl(name)
            count, _, ttl = await pipe.execute()
        return int(count), int(ttl)

    async def close(self) -> None:
        return None
