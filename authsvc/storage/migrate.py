"""Runs the Alembic chain in ``migrations/`` (installed as ``authsvc.migrations``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import authsvc.migrations


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(authsvc.migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call it from a thread when an event loop is running."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
