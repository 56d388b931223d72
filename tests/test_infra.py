"""The test infrastructure itself: real PostgreSQL and Redis servers are reachable."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis


def asyncpg_dsn(url: str) -> str:
    # Same as tests.infra.asyncpg_dsn; not imported so that mypy, which sees
    # tests/ as top-level modules (no tests/__init__.py), does not find
    # tests/infra.py under two module names.
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url, count=1)


USER_TABLES_SQL = """
    select count(*) from information_schema.tables
    where table_schema not in ('pg_catalog', 'information_schema')
"""


def test_postgres_dsn_shape(postgres_dsn: str) -> None:
    parts = urlsplit(postgres_dsn)
    assert parts.scheme == "postgresql+asyncpg"
    assert parts.hostname == "127.0.0.1"
    assert parts.port
    assert parts.username
    assert parts.password
    assert parts.path == "/authsvc_test"


@pytest.mark.asyncio
async def test_postgres_select_1_and_settings(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(postgres_dsn))
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == "authsvc_test"
        assert await conn.fetchval("show fsync") == "off"
        assert await conn.fetchval("show synchronous_commit") == "off"
        assert await conn.fetchval("show full_page_writes") == "off"
        assert await conn.fetchval("show max_connections") == "200"
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_postgres_unique_violation(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(postgres_dsn))
    try:
        await conn.execute("create temp table infra_users (email text primary key)")
        await conn.execute("insert into infra_users values ('a@example.com')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("insert into infra_users values ('a@example.com')")
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_postgres_rejects_wrong_password(postgres_dsn: str) -> None:
    parts = urlsplit(asyncpg_dsn(postgres_dsn))
    wrong = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong.geturl())


@pytest.mark.asyncio
async def test_sqlalchemy_accepts_url(postgres_dsn: str) -> None:
    sa_asyncio = pytest.importorskip("sqlalchemy.ext.asyncio")
    from sqlalchemy import text

    engine = sa_asyncio.create_async_engine(postgres_dsn)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("select 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_make_postgres_db_gives_distinct_empty_dbs(
    postgres_dsn: str, make_postgres_db: Callable[..., str]
) -> None:
    first, second = make_postgres_db(), make_postgres_db()
    names = {urlsplit(u).path for u in (first, second, postgres_dsn)}
    assert len(names) == 3

    conn1 = await asyncpg.connect(asyncpg_dsn(first))
    conn2 = await asyncpg.connect(asyncpg_dsn(second))
    try:
        assert await conn1.fetchval(USER_TABLES_SQL) == 0
        assert await conn2.fetchval(USER_TABLES_SQL) == 0
        await conn1.execute("create table only_in_first (id int)")
        assert await conn1.fetchval(USER_TABLES_SQL) == 1
        assert await conn2.fetchval(USER_TABLES_SQL) == 0
    finally:
        await conn1.close()
        await conn2.close()


@pytest.mark.asyncio
async def test_redis_set_get(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    assert (parts.scheme, parts.hostname, parts.path) == ("redis", "127.0.0.1", "/0")
    client = aioredis.from_url(redis_url)
    try:
        assert await client.set("infra:key", "value", ex=30)
        assert await client.get("infra:key") == b"value"
    finally:
        await client.aclose()
