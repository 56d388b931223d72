"""The Alembic chain against ``authsvc.storage.tables.metadata``, on both databases.

``upgrade head`` on an empty database must create exactly the schema the code
declares (tables, columns and their types and nullability, indexes, unique
constraints, foreign keys), as Alembic's autogenerate comparison sees it;
``downgrade base`` must remove it all, and the chain must run up again. Every
step is also walked down and up one revision at a time, so a later migration
with a broken ``downgrade`` fails here.

Alembic's ``env.py`` runs its own event loop (``asyncio.run``), so the
migration commands run in a worker thread, never in the test's loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, MetaData, String, insert, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from authsvc.storage import migrate
from authsvc.storage.tables import metadata, sessions, users

VERSION_TABLE = "alembic_version"


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))


@pytest.fixture
def empty_db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """URL of an empty database: a new SQLite file, or a new PostgreSQL database."""
    if backend == "postgres":
        return str(request.getfixturevalue("make_postgres_db")())
    return f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"


async def _inspect(url: str, fn: Callable[[Connection], Any]) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _diff(target: MetaData) -> Callable[[Connection], list[Any]]:
    def run(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))

    return run


def _schema(conn: Connection) -> dict[str, Any]:
    """Tables, with their columns, indexes, unique constraints and foreign keys, by name."""
    inspector = inspect(conn)
    out: dict[str, Any] = {}
    for table in inspector.get_table_names():
        out[table] = {
            "columns": {c["name"] for c in inspector.get_columns(table)},
            # PostgreSQL also reports the index behind each unique constraint.
            "indexes": {
                i["name"]
                for i in inspector.get_indexes(table)
                if not i.get("duplicates_constraint")
            },
            "unique": {u["name"] for u in inspector.get_unique_constraints(table)},
            "fks": {f["name"] for f in inspector.get_foreign_keys(table)},
        }
    return out


def _version(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _declared() -> dict[str, Any]:
    """The same shape as ``_schema``, from the metadata (names via its naming convention)."""
    out: dict[str, Any] = {}
    for table in metadata.sorted_tables:
        out[table.name] = {
            "columns": {c.name for c in table.columns},
            "indexes": {str(i.name) for i in table.indexes},
            "unique": {
                str(c.name) for c in table.constraints if c.__class__.__name__ == "UniqueConstraint"
            },
            "fks": {str(f.name) for f in table.foreign_key_constraints},
        }
    return out


async def _upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(migrate.upgrade, url, revision)


async def _downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(migrate.downgrade, url, revision)


async def assert_matches_metadata(url: str) -> None:
    diffs = await _inspect(url, _diff(metadata))
    assert diffs == [], f"the migrated schema differs from the metadata: {diffs}"
    schema = await _inspect(url, _schema)
    assert set(schema) == set(metadata.tables) | {VERSION_TABLE}
    del schema[VERSION_TABLE]
    assert schema == _declared()


def test_the_chain_has_one_head_and_one_base() -> None:
    script = _script()
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1


async def test_compare_metadata_sees_the_database(empty_db: str) -> None:
    """Guards the comparison itself: on an empty database it reports every table."""
    diffs = await _inspect(empty_db, _diff(metadata))
    added = {d[1].name for d in diffs if d[0] == "add_table"}
    assert added == set(metadata.tables)


async def test_compare_metadata_notices_drift(empty_db: str, backend: str) -> None:
    """Guards the comparison: a changed length, nullability, time zone or index shows."""
    await _upgrade(empty_db)
    drifted = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(drifted)
    users = drifted.tables["users"]
    users.c.display_name.type = String(100)
    users.c.email.nullable = True
    users.c.updated_at.type = DateTime(timezone=False)
    sessions = drifted.tables["sessions"]
    sessions.indexes.discard(
        next(i for i in sessions.indexes if i.name == "ix_sessions_created_at_id")
    )

    found = set()
    for diff in await _inspect(empty_db, _diff(drifted)):
        # Column changes come as a one-element list of (kind, schema, table, column, ...).
        kind, *rest = diff[0] if isinstance(diff, list) else diff
        found.add((kind, rest[2]) if kind.startswith("modify_") else (kind, rest[0].name))
    expected = {
        ("modify_type", "display_name"),
        ("modify_nullable", "email"),
        ("remove_index", "ix_sessions_created_at_id"),
    }
    if backend == "postgres":  # SQLite has no time zone to compare
        expected.add(("modify_type", "updated_at"))
    assert found == expected


async def test_upgrade_creates_the_metadata_schema_and_downgrade_removes_it(
    empty_db: str,
) -> None:
    head = _script().get_current_head()
    assert await _inspect(empty_db, _schema) == {}

    await _upgrade(empty_db)
    assert await _inspect(empty_db, _version) == head
    await assert_matches_metadata(empty_db)

    await _downgrade(empty_db, "base")
    assert await _inspect(empty_db, _version) is None
    remaining = set(await _inspect(empty_db, _schema))
    assert remaining <= {VERSION_TABLE}, remaining
    # Everything the metadata declares is gone.
    diffs = await _inspect(empty_db, _diff(metadata))
    assert {d[1].name for d in diffs if d[0] == "add_table"} == set(metadata.tables)

    await _upgrade(empty_db)
    assert await _inspect(empty_db, _version) == head
    await assert_matches_metadata(empty_db)


async def test_every_revision_downgrades_and_upgrades_again(empty_db: str) -> None:
    """The stairway: up one, down one, up one again, for each revision in order."""
    script = _script()
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
    assert revisions
    for revision in revisions:
        previous = revision.down_revision or "base"
        assert isinstance(previous, str), "merge revisions need their own test"
        await _upgrade(empty_db, revision.revision)
        await _downgrade(empty_db, previous)
        expected = None if previous == "base" else previous
        assert await _inspect(empty_db, _version) == expected
        await _upgrade(empty_db, revision.revision)
        assert await _inspect(empty_db, _version) == revision.revision
    await assert_matches_metadata(empty_db)


async def test_upgrade_twice_is_a_no_op(empty_db: str) -> None:
    await _upgrade(empty_db)
    before = await _inspect(empty_db, _schema)
    await _upgrade(empty_db)
    assert await _inspect(empty_db, _schema) == before


async def test_user_names_arrive_empty_on_existing_users_and_leave_them_intact(
    empty_db: str,
) -> None:
    """0004 adds users.given_name and users.family_name: NOT NULL, '' for the
    users that exist (and by default for rows inserted without them); its
    downgrade removes both columns and keeps every user, sessions included."""
    await _upgrade(empty_db, "0003")
    now = datetime.now(UTC)
    user_id = uuid.uuid4()
    # Only the columns 0003 has: the metadata's Core insert names no others.
    engine = create_async_engine(empty_db)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(users).values(
                    id=user_id,
                    email="old@example.com",
                    email_key="old@example.com",
                    password_hash="not-a-hash",
                    display_name="Old",
                    role="user",
                    email_verified=False,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                insert(sessions).values(
                    id=uuid.uuid4(),
                    user_id=user_id,
                    created_at=now,
                    last_used_at=now,
                    expires_at=now,
                    ip_address="",
                    user_agent="",
                )
            )
    finally:
        await engine.dispose()
    await _upgrade(empty_db, "0004")

    def names(conn: Connection) -> list[tuple[Any, ...]]:
        rows = conn.execute(text("SELECT email, display_name, given_name, family_name FROM users"))
        return [tuple(r) for r in rows]

    assert await _inspect(empty_db, names) == [("old@example.com", "Old", "", "")]
    columns = await _inspect(
        empty_db, lambda conn: {c["name"]: c for c in inspect(conn).get_columns("users")}
    )
    for name in ("given_name", "family_name"):
        assert columns[name]["nullable"] is False
        assert isinstance(columns[name]["type"], String)
        assert columns[name]["type"].length == 200

    await _downgrade(empty_db, "0003")

    def after_downgrade(conn: Connection) -> tuple[set[str], list[Any], int]:
        cols = {c["name"] for c in inspect(conn).get_columns("users")}
        rows = [tuple(r) for r in conn.execute(text("SELECT email, display_name FROM users"))]
        count = conn.execute(text("SELECT count(*) FROM sessions")).scalar_one()
        return cols, rows, int(count)

    cols, kept, live = await _inspect(empty_db, after_downgrade)
    assert not {"given_name", "family_name"} & cols
    assert (kept, live) == ([("old@example.com", "Old")], 1)
    await _upgrade(empty_db)
    await assert_matches_metadata(empty_db)
