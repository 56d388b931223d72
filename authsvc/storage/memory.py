"""In-process rate limiter: the embedded default (one process).

The embedded default's event bus is ``authsvc.storage.event_log.LocalEventBus``.
"""

from __future__ import annotations

import time


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
