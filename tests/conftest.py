"""Top-level test configuration: only registers the infrastructure plugin.

Application fixtures go in their own conftest/plugin modules, not here.
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

pytest_plugins = ["tests.infra", "tests.app"]
