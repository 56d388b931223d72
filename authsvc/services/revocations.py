"""The revocation feed behind WatchRevocations.

A watcher (a sidecar verifying tokens locally) gets, in log order, every
session revocation and every claims change, from every replica: first what
the log holds after its position, then new events as this replica's bus
delivers them, and a heartbeat when nothing happens. It listens before it
replays, and skips live events at or before the replay's end, so nothing
falls between the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from authsvc.domain.events import CLAIMS_CHANGED, SESSION_REVOKED, Event, position_key
from authsvc.domain.ports import EventBus
from authsvc.errors import BackendUnavailable

log = structlog.get_logger("authsvc.revocations")

_FORWARDED = frozenset({SESSION_REVOKED, CLAIMS_CHANGED})
_QUEUE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class FeedBatch:
    events: list[Event]
    position: str
    gap: bool = False


class _Overflow:
    """The watcher fell too far behind; it must reconnect and replay."""


class _Closing:
    """The server is stopping; watchers reconnect to another replica."""


class RevocationFeed:
    def __init__(self, bus: EventBus, *, heartbeat: float) -> None:
        self._bus = bus
        self._heartbeat = heartbeat
        self._queues: set[asyncio.Queue[Event | _Overflow | _Closing]] = set()
        self._closing = False

    def close(self) -> None:
        """Ends every stream now (UNAVAILABLE), rather than at the end of the
        shutdown grace: watchers resume from their position elsewhere."""
        self._closing = True
        for queue in self._queues:
            queue.put_nowait(_Closing())

    @property
    def watchers(self) -> int:
        """Streams open now."""
        return len(self._queues)

    @property
    def retention(self) -> float:
        return self._bus.retention

    async def watch(self, after: str) -> AsyncIterator[FeedBatch]:
        """Raises: InvalidArgument (malformed ``after``), BackendUnavailable."""
        if after:
            position_key(after)  # validate before anything is set up
        if self._closing:
            raise BackendUnavailable("the server is stopping; reconnect")
        queue: asyncio.Queue[Event | _Overflow | _Closing] = asyncio.Queue()

        def deliver(event: Event) -> None:
            if queue.qsize() >= _QUEUE_LIMIT:
                queue.put_nowait(_Overflow())
            else:
                queue.put_nowait(event)

        unlisten = self._bus.listen(deliver)
        self._queues.add(queue)
        try:
            replay = await self._bus.replay(after)
            position = replay.position
            yield FeedBatch(_forwarded(replay.events), position, replay.gap)
            while replay.more:
                # A long log comes in parts; live events queue meanwhile.
                replay = await self._bus.replay(position)
                position = replay.position
                yield FeedBatch(_forwarded(replay.events), position)
            while True:
                try:
                    first = await asyncio.wait_for(queue.get(), self._heartbeat)
                except TimeoutError:
                    yield FeedBatch([], position)
                    continue
                batch = [first]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if any(isinstance(item, _Closing) for item in batch):
                    raise BackendUnavailable("the server is stopping; reconnect")
                if any(isinstance(item, _Overflow) for item in batch):
                    # Ending the stream is safe: the watcher resumes from its
                    # last position and the log replays what it missed.
                    log.warning("revocations.watcher_overflow")
                    raise BackendUnavailable("the watcher fell behind; reconnect")
                current = position_key(position)
                fresh = [
                    e for e in batch if isinstance(e, Event) and position_key(e.position) > current
                ]
                if fresh:
                    position = fresh[-1].position
                    yield FeedBatch(_forwarded(fresh), position)
        finally:
            self._queues.discard(queue)
            unlisten()


def _forwarded(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind in _FORWARDED]
