"""Top-level test configuration: only registers the plugins.

Application fixtures go in their own conftest/plugin modules, not here:
``tests.infra`` (PostgreSQL, Redis), ``tests.app`` (authsvc servers) and
``tests.undeclared`` (the run fails when a call answered an error reason its
method does not declare).
"""

import sys
from pathlib import Path

# Make `tests.infra` importable however pytest is launched (plain `pytest`
# does not put the repository root on sys.path; `python -m pytest` does).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# The examples under clients/examples import as `examples.*` (as mypy sees them).
_CLIENTS = str(Path(_ROOT) / "clients")
if _CLIENTS not in sys.path:
    sys.path.append(_CLIENTS)

pytest_plugins = ["tests.infra", "tests.app", "tests.undeclared"]
