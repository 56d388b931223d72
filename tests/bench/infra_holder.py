"""PostgreSQL and Redis for the benchmark, from the test suite's own fixtures.

Not collected by the suite (the name does not match ``test_*.py``); the
benchmark runs it explicitly::

    python -m pytest tests/bench/infra_holder.py -s -p no:cacheprovider

with ``AUTHSVC_BENCH_INFRA_OUT`` (where to write the URLs) and
``AUTHSVC_BENCH_LIFELINE_FD`` (a pipe the orchestrator holds) set. The test
starts the servers through ``tests/infra.py`` exactly as the suite does
(``postgres_server``, ``redis_url``), writes their URLs, and blocks until the
pipe closes; pytest then tears the fixtures down, which stops both servers
(and the suite's reaper covers a pytest that dies harder than that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.infra import PostgresServer

from .common import INFRA_OUT_ENV, LIFELINE_FD_ENV, wait_for_eof

BENCH_DBNAME = "authsvc_bench"


def test_hold_infra(postgres_server: PostgresServer, redis_url: str) -> None:
    out = os.environ.get(INFRA_OUT_ENV)
    fd = os.environ.get(LIFELINE_FD_ENV)
    if not out or not fd:
        pytest.skip("run by `python -m tests.bench` only")
    database_url = postgres_server.create_database(BENCH_DBNAME)
    try:
        info = {
            "database_url": database_url,
            "redis_url": redis_url,
            "postgres_host": postgres_server.host,
            "postgres_port": postgres_server.port,
        }
        tmp = Path(out + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(out)  # atomic: the orchestrator never sees half a file
        wait_for_eof(int(fd))
    finally:
        postgres_server.drop_database(BENCH_DBNAME)
