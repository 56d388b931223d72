"""Runs the Alembic chain in ``migrations/`` (installed as ``authsvc.migrations``)."""

from __future__ import annotations

import importlib.util

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine


def _script_location() -> str:
    # Found through the import system: migrations/ is mapped onto
    # authsvc.migrations both in editable installs and in wheels.
    spec = importlib.util.find_spec("authsvc.migrations")
    assert spec is not None
    assert spec.submodule_search_locations
    return str(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", _script_location())
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call it from a thread when an event loop is running."""
    command.upgrade(alembic_config(url), revision)


class NotMigrated(RuntimeError):
    """The database is not at the head of the migration chain."""


async def require_head(engine: AsyncEngine) -> None:
    """Raises NotMigrated unless the database is fully migrated."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    async with engine.connect() as conn:
        current = await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
    if current != head:
        raise NotMigrated(
            f"the database is at migration {current or 'none'}, not {head}: "
            "run `authsvc migrate` first"
        )


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
