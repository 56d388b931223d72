"""The SQL database: engine set-up, transactions, driver error translation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from authsvc.errors import AuthError, BackendUnavailable
from authsvc.storage.sql import SqlTransaction


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; foreign keys are off by
    # default in SQLite and the schema relies on ON DELETE CASCADE.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str, *, pool_size: int, pgbouncer: bool) -> AsyncEngine:
    """Builds the engine for a SQLAlchemy URL (SQLite or Postgres)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
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
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        if self._write_lock is None:
            async with _translated(), self.engine.begin() as conn:
                yield SqlTransaction(conn)
            return
        async with self._write_lock, _translated(), self.engine.begin() as conn:
            yield SqlTransaction(conn)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[SqlTransaction]:
        async with _translated(), self._reads.connect() as conn:
            yield SqlTransaction(conn)

    async def ping(self) -> None:
        async with self.reader() as tx:
            await tx.ping()

    async def close(self) -> None:
        await self.engine.dispose()


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """Turns connection-level driver failures into BackendUnavailable.

    Constraint violations are translated where they happen (the repositories
    know which constraint means what); anything else stays an unexpected
    error and becomes INTERNAL at the edge.
    """
    try:
        yield
    except AuthError:
        raise
    except (exc.OperationalError, exc.InterfaceError, OSError, TimeoutError) as error:
        raise BackendUnavailable() from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            raise BackendUnavailable() from error
        raise
