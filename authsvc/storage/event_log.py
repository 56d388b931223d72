"""The event log in the database, and the event bus of one process over it.

Every revocation and claims change is written to the ``events`` table in the
transaction of the change it announces (``tx.events.add``), so an event
exists exactly when its change was committed, whatever happens to the
process or to Redis afterwards. A relay, running in every server, gives
committed events their log positions (``<ms>-<seq>``, in commit order, one
relay at a time under the lock of the log's head row) and hands them on: on
the embedded default straight to this process's handlers and watchers
(:class:`LocalEventBus`), with Redis to the stream every replica follows
(``authsvc.storage.redis_store``). The relay wakes when a transaction of this
process commits events, and also polls, so events written by another
process (the CLI, a replica killed between its commit and its relay) go out
too.

Replays (WatchRevocations) are read from this log, never from Redis: it is
the source of truth, and it outlives restarts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from authsvc.domain.events import Event, LogHead, Replay, position_key
from authsvc.domain.ports import EventHandler
from authsvc.storage.database import SqlDatabase

log = structlog.get_logger("authsvc.events")

#: Positions given out, or events read, per statement.
BATCH = 1000
#: The most events one replay returns before the watcher must resume.
REPLAY_LIMIT = 50_000
#: Seconds between prunes of events older than the retention.
PRUNE_EVERY = 60.0


async def stop_task(task: asyncio.Task[None], within: float = 2.0) -> None:
    """Cancels a background task and waits for it, but not forever: a driver
    call that ignores its cancellation (a Redis read on a dead connection)
    must not hold up the server's shutdown."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        log.warning("background.stop_timed_out", task=task.get_name())
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("background.failed_at_stop", task=task.get_name())


def position_text(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


def newest_position(head: LogHead) -> tuple[int, int]:
    """Where a watcher that wants only new events starts: the head, or the
    start of the log when it has given out no position yet."""
    if head.position == (0, 0):
        return (head.started_ms, 0)
    return head.position


class EventLog:
    """The ``events`` table: positions, replays and their gaps, pruning."""

    def __init__(self, db: SqlDatabase, *, retention: float) -> None:
        self._db = db
        self.retention = retention

    async def head(self) -> tuple[LogHead, bool]:
        """The head, and whether committed events wait for a position.

        Raises: BackendUnavailable.
        """
        async with self._db.reader() as reader:
            return await reader.events.head()

    async def assign(self) -> list[Event]:
        """Positions every committed event still waiting; returns them in order.

        Raises: BackendUnavailable.
        """
        out: list[Event] = []
        while True:
            async with self._db.transaction() as tx:
                batch = await tx.events.assign_positions(int(time.time() * 1000), BATCH)
            out.extend(batch)
            if len(batch) < BATCH:
                return out

    async def after(self, key: tuple[int, int], limit: int = BATCH) -> list[Event]:
        """Positioned events after ``key`` and younger than the retention.

        Raises: BackendUnavailable.
        """
        horizon = (int((time.time() - self.retention) * 1000), -1)
        async with self._db.reader() as reader:
            return await reader.events.after(max(key, horizon), limit)

    async def replay(self, after: str) -> Replay:
        """What the log holds after a position, and whether it may miss some.

        ``after=""``: nothing, and the newest position. A gap is reported only
        when events after ``after`` that may still concern a live token might
        not be in the log: the position is older than the log itself while
        the log is younger than the retention, or it is a recent position
        this log never gave out (another deployment's; a restored database).
        Then everything the log holds comes back.

        Raises: InvalidArgument (a malformed position), BackendUnavailable.
        """
        key = position_key(after) if after else None
        now_ms = int(time.time() * 1000)
        horizon = now_ms - int(self.retention * 1000)
        async with self._db.reader() as reader:
            head, _ = await reader.events.head()
            newest = newest_position(head)
            if key is None:
                return Replay([], position_text(newest), gap=False)
            if key < (head.started_ms, 0):
                gap = head.started_ms > horizon
            elif key[0] < horizon or key in (head.position, newest):
                gap = False
            else:
                gap = key > newest or not await reader.events.has(key)
            start = (0, 0) if gap else key
            events: list[Event] = []
            floor = (horizon, -1)
            while len(events) < REPLAY_LIMIT:
                want = min(BATCH, REPLAY_LIMIT - len(events))
                batch = await reader.events.after(max(start, floor), want)
                events.extend(batch)
                if len(batch) < want:
                    break
                start = position_key(batch[-1].position)
        if events:
            return Replay(events, events[-1].position, gap, more=len(events) >= REPLAY_LIMIT)
        return Replay([], position_text(newest) if gap else after, gap)

    async def backlog(self, copied: tuple[int, int] | None) -> tuple[int, float]:
        """The outbox: how many committed events wait for a position or (past
        ``copied``, the newest position known to be in Redis) for their copy,
        and the oldest one's age in seconds (0 when none waits).

        Raises: BackendUnavailable.
        """
        async with self._db.reader() as reader:
            depth, oldest_ms = await reader.events.backlog(copied)
        age = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        return depth, age

    async def prune(self) -> None:
        """Raises: BackendUnavailable."""
        before = int((time.time() - self.retention) * 1000)
        async with self._db.transaction() as tx:
            await tx.events.prune(before)


class Fanout:
    """This process's handlers (cache invalidation) and listeners (watchers)."""

    def __init__(self) -> None:
        self._handlers: list[EventHandler] = []
        self._resets: list[Callable[[], None]] = []
        self._listeners: list[EventHandler] = []

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None:
        self._handlers.append(handler)
        self._resets.append(on_reset)

    def listen(self, listener: EventHandler) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def handle(self, events: Sequence[Event]) -> None:
        for event in events:
            for handler in self._handlers:
                handler(event)

    def deliver(self, events: Sequence[Event]) -> None:
        """Logged events (with positions), in log order."""
        for event in events:
            for handler in self._handlers:
                handler(event)
            for listener in list(self._listeners):
                listener(event)

    def reset(self) -> None:
        for reset in self._resets:
            reset()


class Relay:
    """Runs ``step`` when woken (a local commit) or every ``poll`` seconds,
    and prunes the log now and then. Failures are logged and retried."""

    def __init__(
        self, log_: EventLog, step: Callable[[bool], Awaitable[None]], *, poll: float
    ) -> None:
        self._log = log_
        self._step = step
        self._poll = poll
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failing = False
        #: monotonic time of the last pass that succeeded
        self.last_pass = time.monotonic()

    def wake(self) -> None:
        self._wake.set()

    def start(self, name: str) -> None:
        self._task = asyncio.create_task(self._run(), name=name)

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    async def _run(self) -> None:
        pruned = time.monotonic()
        woken = True  # a first pass at start: events left by an earlier process
        while True:
            self._wake.clear()
            try:
                await self._step(woken)
                if time.monotonic() - pruned > PRUNE_EVERY:
                    await self._log.prune()
                    pruned = time.monotonic()
                if self.failing:
                    log.info("events.relay_resumed")
                self.failing = False
                self.last_pass = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis or the database; retried
                if not self.failing:
                    log.warning("events.relay_failed", error=type(error).__name__)
                self.failing = True
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll)
                woken = True
            except TimeoutError:
                woken = False


class LoggedBus:
    """What every bus over the log does: this process's handlers and
    listeners, a relay, and replays from the log. Subclasses give the relay's
    step (``_relay_step``) and how to follow the other processes' events."""

    def __init__(self, log_: EventLog, *, poll: float) -> None:
        self._log = log_
        self.retention = log_.retention
        self._fanout = Fanout()
        self._relay = Relay(log_, self._relay_step, poll=poll)

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None:
        self._fanout.subscribe(handler, on_reset)

    def listen(self, listener: EventHandler) -> Callable[[], None]:
        return self._fanout.listen(listener)

    def committed(self, events: Sequence[Event]) -> None:
        # Local first: this process honours its own revocation at once; the
        # relay carries it to the others (and to this process's watchers).
        self._fanout.handle(events)
        self._relay.wake()

    async def replay(self, after: str) -> Replay:
        return await self._log.replay(after)

    async def _relay_step(self, woken: bool) -> None:
        raise NotImplementedError

    #: Where this process reads the other processes' events ("redis" or "database").
    source = "database"

    def lag(self) -> float:
        """Seconds since this process last read the log (here: the relay's
        last successful pass over the database's log)."""
        return time.monotonic() - self._relay.last_pass

    async def backlog(self) -> tuple[int, float]:
        """The outbox's depth and oldest age (``EventLog.backlog``).

        Raises: BackendUnavailable.
        """
        return await self._log.backlog(None)


class LocalEventBus(LoggedBus):
    """The embedded default's bus: one process, its log in SQLite.

    Committed events reach this process's caches at once (``committed``);
    once positioned they reach its watchers. The log survives restarts, so
    a watcher resuming after one misses nothing.
    """

    async def _relay_step(self, woken: bool) -> None:
        if not woken:
            _, pending = await self._log.head()
            if not pending:
                return
        self._fanout.deliver(await self._log.assign())

    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        self._relay.start("authsvc-relay")

    async def close(self) -> None:
        await self._relay.close()
