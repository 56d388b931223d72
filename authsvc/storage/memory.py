"""In-process event bus and rate limiter: the embedded default (one process)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from authsvc.domain.events import Event, Replay, position_key
from authsvc.domain.ports import EventHandler


class MemoryEventBus:
    """Delivers events to this process's handlers and keeps them in a log
    for ``retention`` seconds; never misses one while the process lives.

    Positions are "<ms>-<seq>", like Redis stream ids. The log does not
    survive a restart: a watcher resuming from a position this process never
    issued is told there may be a gap.
    """

    def __init__(self, *, retention: float) -> None:
        self.retention = retention
        self._handlers: list[EventHandler] = []
        self._listeners: list[EventHandler] = []
        self._log: deque[Event] = deque()
        self._last = (0, 0)
        self._started_ms = int(time.time() * 1000)

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None:
        self._handlers.append(handler)

    def listen(self, listener: EventHandler) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _next_position(self) -> str:
        ms = max(int(time.time() * 1000), self._last[0])
        self._last = (ms, self._last[1] + 1) if ms == self._last[0] else (ms, 0)
        return f"{self._last[0]}-{self._last[1]}"

    async def publish(self, *events: Event) -> None:
        horizon = (time.time() - self.retention) * 1000
        while self._log and position_key(self._log[0].position)[0] < horizon:
            self._log.popleft()
        for event in events:
            logged = event.at_position(self._next_position())
            self._log.append(logged)
            for handler in self._handlers:
                handler(logged)
            for listener in list(self._listeners):
                listener(logged)

    async def replay(self, after: str) -> Replay:
        newest = self._log[-1].position if self._log else f"{self._started_ms}-0"
        if not after:
            return Replay([], newest, gap=False)
        key = position_key(after)
        known = key == (self._started_ms, 0) or any(e.position == after for e in self._log)
        horizon = (time.time() - self.retention) * 1000
        # Unknown and recent: lost in a restart, or another server's. Unknown,
        # older than this process, while this process is younger than the
        # retention: the events between that position and our start were
        # never in this log, and may still concern live tokens.
        recent = key[0] >= horizon
        before_us = key < (self._started_ms, 0) and self._started_ms >= horizon
        if not known and (recent or before_us):
            # Not a position this process issued (a restart, another server):
            # hand over everything kept, and say events may be missing.
            return Replay(list(self._log), newest, gap=True)
        return Replay([e for e in self._log if position_key(e.position) > key], newest, gap=False)

    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryRateLimiter:
    """Fixed windows in a dict, pruned as windows end."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}

    async def hit(self, key: str, limit: int, window: int) -> float | None:
        now = time.monotonic()
        if len(self._windows) > 100_000:
            self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
        ends, count = self._windows.get(key, (0.0, 0))
        if ends <= now:
            ends, count = now + window, 0
        count += 1
        self._windows[key] = (ends, count)
        return ends - now if count > limit else None

    async def close(self) -> None:
        return None
