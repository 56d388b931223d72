"""Alembic migrations; installed as the package ``authsvc.migrations``."""
