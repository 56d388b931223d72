"""The SQL database: engine set-up, transactions, driver error translation."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import structlog
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from authsvc.domain.events import Event
from authsvc.errors import AuthError, BackendUnavailable, TransientConflict
from authsvc.storage.sql import SqlTransaction

log = structlog.get_logger("authsvc.db")

#: How often a transaction that lost a deadlock or a serialization race is
#: run again before the caller gets UNAVAILABLE.
TRANSIENT_ATTEMPTS = 4

# SQLSTATEs that say "the database, not the request, is the problem": the
# call may succeed if retried later (or elsewhere). By class: 08 connection
# exception, 53 insufficient resources (too many connections, disk full, out
# of memory), 57P0x the server shutting down, crashing or starting up, 58
# system (I/O) errors, 25006 a read-only transaction (the pool is on a
# standby after a failover), 57014 a statement cancelled (timeout), 55P03 a
# lock that could not be had in time.
_UNAVAILABLE_CLASSES = ("08", "53", "58", "57P")
_UNAVAILABLE_STATES = frozenset({"25006", "57014", "55P03", "55006"})
# A deadlock or a serialization failure: the transaction lost a race with
# another one and is worth running again at once.
_TRANSIENT_STATES = frozenset({"40001", "40P01"})
# After these the connection is useless (or on the wrong server): drop it
# rather than hand it to the next transaction.
_DISCARD_STATES = frozenset({"25006"})
#: Seconds a SQLite write waits for another connection's lock (a CLI run on
#: the same file) before the call gets UNAVAILABLE.
SQLITE_BUSY_TIMEOUT = 5.0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; foreign keys are off by
    # default in SQLite and the schema relies on ON DELETE CASCADE.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
    cursor.close()


def create_engine(url: str, *, pool_size: int, pgbouncer: bool) -> AsyncEngine:
    """Builds the engine for a SQLAlchemy URL (SQLite or Postgres)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}, hide_parameters=True
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if pgbouncer:
        # PgBouncer in transaction mode hands each transaction to any server
        # connection, so named prepared statements from an earlier transaction
        # may be missing (or clash). Turn off both statement caches and give
        # every prepared statement a unique name.
        connect_args = {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        }
    # A server that does not answer must not hold a call for asyncpg's
    # default of 60 s.
    connect_args["timeout"] = 5
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        pool_timeout=5,
        connect_args=connect_args,
        # Parameters include password hashes: keep them out of errors and logs.
        hide_parameters=True,
    )


class SqlDatabase:
    """Units of work over one engine.

    On SQLite every write transaction takes a process-wide lock first: SQLite
    has one writer at a time anyway, and serializing here turns its
    "database is locked" errors into waiting, and makes the read-then-write
    transactions (refresh rotation) as safe as Postgres row locks make them.
    """

    def __init__(self, engine: AsyncEngine, *, pgbouncer: bool = False) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # Reads run outside a transaction (autocommit): no BEGIN and COMMIT
        # round trips. Not behind PgBouncer in transaction mode: SQLAlchemy's
        # asyncpg dialect prepares each statement as a named prepared
        # statement in one round trip and executes it in the next; outside a
        # transaction PgBouncer may give the server connection to another
        # client in between, and the execution fails with 'prepared statement
        # "..." does not exist'. Inside one, both run on the same connection.
        self._reads = (
            engine if pgbouncer else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        #: Units of work waiting for a pooled connection (checkout or connect).
        self.waiting = 0
        #: Called with the events a transaction wrote, once it has committed
        #: (the event bus applies them locally and wakes its relay).
        self.on_commit: Callable[[Sequence[Event]], None] | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        """One transaction: commits on normal exit, rolls back on an error.

        Raises BackendUnavailable (TransientConflict for a deadlock or a
        serialization failure, which ``attempts`` runs again).
        """
        lock = self._write_lock if self._write_lock is not None else contextlib.nullcontext()
        async with lock, _translated(), self._connect(self.engine) as conn:
            tx = SqlTransaction(conn)
            try:
                async with conn.begin():
                    yield tx
            except exc.DBAPIError as error:
                await _discard_if_useless(conn, error)
                raise
        written = tx.events.written
        if written and self.on_commit is not None:
            self.on_commit(written)

    def attempts(self, tries: int = TRANSIENT_ATTEMPTS) -> Attempts:
        """Transactions that are run again when they lose a deadlock or a
        serialization race::

            async for attempt in db.attempts():
                async with attempt as tx:
                    ...  # nothing after this block inside the loop

        The block must be safe to run again from the start: nothing it did
        was committed. After ``tries`` losses the caller gets
        BackendUnavailable (UNAVAILABLE, retry later).
        """
        return Attempts(self, tries)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[SqlTransaction]:
        async with _translated(), self._connect(self._reads) as conn:
            yield SqlTransaction(conn)

    @asynccontextmanager
    async def _connect(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        """``engine.connect()``, counted in ``waiting`` until it has a connection."""
        self.waiting += 1
        counted = True
        try:
            async with engine.connect() as conn:
                self.waiting -= 1
                counted = False
                yield conn
        finally:
            if counted:
                self.waiting -= 1

    def pool_in_use(self) -> int:
        """Connections checked out of the pool now."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if checkedout is not None else 0

    async def ping(self) -> None:
        async with self.reader() as tx:
            await tx.ping()

    async def close(self) -> None:
        await self.engine.dispose()


class Attempts:
    """The iterator behind ``SqlDatabase.attempts``."""

    def __init__(self, db: SqlDatabase, tries: int) -> None:
        self._db = db
        self._left = tries
        self._done = False
        self._lost: TransientConflict | None = None

    def __aiter__(self) -> Attempts:
        return self

    async def __anext__(self) -> _Attempt:
        if self._done:
            raise StopAsyncIteration
        if self._left <= 0:
            assert self._lost is not None
            log.warning("db.transient_conflict_exhausted")
            raise BackendUnavailable(retry_after=1.0) from self._lost
        self._left -= 1
        return _Attempt(self)


class _Attempt:
    def __init__(self, attempts: Attempts) -> None:
        self._attempts = attempts
        self._cm: contextlib.AbstractAsyncContextManager[SqlTransaction] | None = None

    async def __aenter__(self) -> SqlTransaction:
        self._cm = self._attempts._db.transaction()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._cm is not None
        try:
            await self._cm.__aexit__(kind, error, tb)
        except TransientConflict as lost:
            # Lost at commit (or while rolling back the body's loss).
            self._attempts._lost = lost
            return True
        if kind is None:
            self._attempts._done = True
            return False
        if isinstance(error, TransientConflict):
            self._attempts._lost = error
            return True
        self._attempts._done = True
        return False


def _sqlstate(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return ""


async def _discard_if_useless(conn: AsyncConnection, error: exc.DBAPIError) -> None:
    if _sqlstate(error) in _DISCARD_STATES:
        with contextlib.suppress(Exception):
            await conn.invalidate()


def backend_fault(error: BaseException) -> AuthError | None:
    """The caller-facing error for a failure of the database itself, or None
    for anything else (a bug, or a constraint the repositories translate)."""
    if isinstance(error, exc.DBAPIError):
        state = _sqlstate(error)
        if state in _TRANSIENT_STATES:
            return TransientConflict()
        if state in _UNAVAILABLE_STATES or state.startswith(_UNAVAILABLE_CLASSES):
            return BackendUnavailable()
        if isinstance(error, exc.IntegrityError | exc.ProgrammingError | exc.DataError):
            return None
        if (
            error.connection_invalidated
            or isinstance(error, exc.OperationalError | exc.InterfaceError)
            or isinstance(error.orig, OSError | TimeoutError)
            or _is_asyncpg_connection_error(error.orig)
        ):
            return BackendUnavailable()
        return None
    if isinstance(error, exc.TimeoutError | exc.DisconnectionError | OSError | TimeoutError):
        # Pool exhausted, connect refused or timed out, a socket reset.
        return BackendUnavailable()
    if _is_asyncpg_connection_error(error):
        return BackendUnavailable()
    return None


def _is_asyncpg_connection_error(error: BaseException | None) -> bool:
    # Raised by asyncpg itself (outside SQLAlchemy's wrapping, or as the
    # cause of an adapted error): a closed connection, a failed connect.
    cause = getattr(error, "__cause__", None)
    for candidate in (error, cause):
        module = type(candidate).__module__
        if module.startswith("asyncpg") and type(candidate).__name__ in {
            "ConnectionDoesNotExistError",
            "InterfaceError",
            "ConnectionFailureError",
            "CannotConnectNowError",
            "TooManyConnectionsError",
            "ClientCannotConnectError",
            "InternalClientError",
        }:
            return True
    return False


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """Turns failures of the database itself into BackendUnavailable.

    Constraint violations are translated where they happen (the repositories
    know which constraint means what); anything else stays an unexpected
    error and becomes INTERNAL at the edge.
    """
    try:
        yield
    except AuthError:
        raise
    except Exception as error:
        fault = backend_fault(error)
        if fault is None:
            raise
        raise fault from error
