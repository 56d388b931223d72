"""Test infrastructure plugin: real PostgreSQL and Redis servers for a test session.

Registered from ``tests/conftest.py`` (``pytest_plugins = ["tests.infra"]``).
Only infrastructure lives here; application fixtures belong elsewhere.

Public fixtures (all lazy: a server starts only when a test asks for it):

``postgres_dsn`` (session)
    ``postgresql+asyncpg://USER:PASS@127.0.0.1:PORT/authsvc_test``: a freshly
    created, empty database on a PostgreSQL server private to this session.
``postgres_admin_dsn`` (session)
    Same server and (superuser) credentials, pointing at the ``postgres``
    maintenance database.
``postgres_server`` (session)
    A :class:`PostgresServer` (host, port, user, password, ``url(dbname)``,
    ``create_database``, ``drop_database``).
``make_postgres_db`` (function)
    A factory ``make_postgres_db(name=None) -> url``: each call creates another
    empty database on the same server and returns its URL; all of them are
    dropped when the test ends.
``redis_url`` (session)
    ``redis://127.0.0.1:PORT/0`` of a redis-server private to this session
    (pytest-redis's ``redis_proc`` factory).
``pgbouncer_server`` (session)
    A :class:`PgBouncer` in front of that PostgreSQL server, private to this
    session: ``pool_mode = transaction`` with only ``PGBOUNCER_POOL_SIZE``
    server connections per database, so client connections really share
    server connections. Any database of the server is reachable through it
    (``url(dbname)``), with the same credentials.
``pgbouncer_dsn`` (session)
    ``postgresql+asyncpg://USER:PASS@127.0.0.1:PORT/authsvc_test`` through that
    PgBouncer: the session database with the Alembic chain applied (the
    ``migrated_postgres`` fixture of ``tests.app``, the same database).

Helper: :func:`asyncpg_dsn` turns one of those SQLAlchemy URLs into a DSN that
``asyncpg.connect`` accepts.

Tests that use the Postgres (or PgBouncer) or Redis fixtures get the
``postgres`` / ``redis`` marker automatically (when those markers are registered), so
``-m "not postgres"`` deselects them.

How PostgreSQL is started
-------------------------
* Not root: pytest-postgresql's own ``postgresql_proc`` factory, unchanged.
* Root (PostgreSQL refuses to run as root): pytest-postgresql's
  ``PostgreSQLExecutor`` is given, as its ``pg_ctl``, a small wrapper script
  that runs the real ``pg_ctl`` through ``runuser -u postgres --``; the data
  directory, socket and log live in a directory of ours that the ``postgres``
  user owns (pytest's own tmp dirs under /tmp/pytest-of-root are 0700, so the
  stock factory cannot be used). ``initdb`` is run by us so the password file
  is readable by that user. Databases are created/dropped with
  pytest-postgresql's ``DatabaseJanitor`` in both cases.

How PgBouncer is started
------------------------
``/usr/sbin/pgbouncer`` (Debian's ``pgbouncer`` package, which ./tests/run
installs) runs in the foreground as a child of pytest, on a free loopback port,
with its ini file, auth file, log and pid file in a directory of its own. It
refuses to run as root: a root pytest runs it as the same unprivileged user as
PostgreSQL, and that user owns the directory. Clients authenticate with SCRAM
against a userlist (``auth_file``) that holds the superuser's password in
plain text, which PgBouncer also uses to log in to PostgreSQL. Its own
prepared-statement support (``max_prepared_statements``, PgBouncer >= 1.21,
on by default since 1.24) is turned off, so protocol-level prepared statements
break across transactions as they do on classic transaction pooling.

Cleanup when the run is interrupted
-----------------------------------
Ctrl-C: pytest still tears session fixtures down, which stops the servers.
For harder deaths (SIGTERM, SIGKILL, a CI timeout) a small reaper process,
started in its own session, holds the read end of a pipe from this pytest
process; when the pipe closes without the servers having been stopped, it
stops them (and removes the root-mode data directory and PgBouncer's
directory).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

import port_for
import pytest
from mirakuru.base import SimpleExecutor
from pytest_postgresql import factories as pg_factories
from pytest_postgresql.config import get_config as get_pg_config
from pytest_postgresql.executors import PostgreSQLExecutor
from pytest_postgresql.janitor import DatabaseJanitor
from pytest_redis import factories as redis_factories

__all__ = ["PgBouncer", "PostgresExecutor", "PostgresServer", "asyncpg_dsn", "private_postgres"]

PG_HOST = "127.0.0.1"
PG_USER = "postgres"
PG_PASSWORD = "authsvc-test-pw"
PG_DBNAME = "authsvc_test"
# Durability off: the data is thrown away at the end of the session anyway.
PG_SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)
# OS user that runs PostgreSQL when pytest runs as root. Debian's postgresql
# package creates "postgres"; when it is absent, this one is created instead.
PG_OS_USER_DEFAULT = "postgres"
PG_OS_USER_FALLBACK = "authsvc-pgtest"
PG_OS_USER_ENV = "AUTHSVC_TEST_PG_OS_USER"
# Server connections PgBouncer keeps per (database, user) pool: fewer than a
# server's connection pool, so transactions of different client connections
# take turns on the same server connections.
PGBOUNCER_POOL_SIZE = 3


# --------------------------------------------------------------------------- helpers


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy) -> ``postgresql://...`` (asyncpg/libpq)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url, count=1)


def _find_pg_ctl() -> str | None:
    """Newest ``/usr/lib/postgresql/N/bin/pg_ctl`` (Debian layout), else one on PATH."""

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit()) or (0,)

    candidates = [
        p
        for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
        if os.access(p, os.X_OK) and os.access(Path(p).with_name("initdb"), os.X_OK)
    ]
    if candidates:
        return max(candidates, key=version)
    return shutil.which("pg_ctl")


@dataclass(frozen=True)
class PostgresServer:
    """Connection facts of the session's PostgreSQL server (superuser credentials)."""

    host: str
    port: int
    user: str
    password: str

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (asyncpg driver) of ``dbname`` on this server."""
        return (
            f"postgresql+asyncpg://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )

    def _janitor(self, dbname: str) -> DatabaseJanitor:
        return DatabaseJanitor(
            user=self.user,
            host=self.host,
            port=self.port,
            dbname=dbname,
            password=self.password,
            maintenance_dbname="postgres",
            connection_timeout=30,
        )

    def create_database(self, dbname: str) -> str:
        """Create an empty database (dropping a leftover of that name first); return its URL."""
        janitor = self._janitor(dbname)
        janitor.drop()
        janitor.init()
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        """Drop ``dbname``, terminating any connections still open to it."""
        self._janitor(dbname).drop()


# --------------------------------------------------------------------------- reaper

_REAPER_SRC = r"""
import os, shutil, signal, sys, time

def start_time(pid):
    # /proc start time of a live (non-zombie) process, else None.
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]

def kill(pid, sig, grace):
    try:
        os.kill(pid, sig)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass

entries = {}
for line in sys.stdin:
    parts = line.rstrip("\n").split("\t")
    if parts[0] == "add" and len(parts) >= 3:
        entries[parts[1]] = parts[2:]
    elif parts[0] == "del" and len(parts) == 2:
        entries.pop(parts[1], None)

# The pipe closed: pytest has exited. Whatever is still registered was not
# cleaned up by the fixtures' own teardown.
removals = []
for kind, *args in entries.values():
    try:
        if kind == "pid":  # pid, /proc start time (guards against pid reuse)
            pid = int(args[0])
            if start_time(pid) == args[1]:
                kill(pid, signal.SIGTERM, 5)
        elif kind == "pgdata":  # a PostgreSQL data directory
            with open(os.path.join(args[0], "postmaster.pid")) as f:
                pid = int(f.readline())
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    is_pg = b"postgres" in f.read()
            except OSError:
                is_pg = False
            if is_pg:
                kill(pid, signal.SIGQUIT, 10)  # SIGQUIT = immediate shutdown
        elif kind == "rmtree":
            removals.append(args[0])
    except (OSError, ValueError):
        pass
for path in removals:
    shutil.rmtree(path, ignore_errors=True)
"""


class _Reaper:
    """Cleans up server processes if this pytest process dies without tearing down."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._ids = itertools.count()

    def _pipe(self) -> IO[str] | None:
        if self._proc is None:
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _REAPER_SRC],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # not hit by the terminal's Ctrl-C
                    close_fds=True,
                    text=True,
                )
            except OSError:
                return None
        return self._proc.stdin

    def _send(self, *fields: str) -> None:
        pipe = self._pipe()
        if pipe is None:
            return
        try:
            pipe.write("\t".join(fields) + "\n")
            pipe.flush()
        except OSError:
            pass

    def add(self, kind: str, *args: str) -> str:
        key = str(next(self._ids))
        self._send("add", key, kind, *args)
        return key

    def add_pid(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                started = f.read().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None
        return self.add("pid", str(pid), started)

    def forget(self, key: str | None) -> None:
        if key is not None:
            self._send("del", key)

    def close(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass


_reaper = _Reaper()


# --------------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    # pytest-postgresql's default pg_ctl is /usr/lib/postgresql/14/bin/pg_ctl;
    # point it at the installed one unless the user chose one explicitly.
    if not config.getoption("postgresql_exec", None):
        ini_exec = config.getini("postgresql_exec")
        if not (ini_exec and os.access(ini_exec, os.X_OK)):
            found = _find_pg_ctl()
            if found:
                config.option.postgresql_exec = found


def pytest_unconfigure(config: pytest.Config) -> None:
    _reaper.close()


_POSTGRES_FIXTURES = frozenset(
    {
        "postgres_dsn",
        "postgres_admin_dsn",
        "postgres_server",
        "make_postgres_db",
        "pgbouncer_server",
        "pgbouncer_dsn",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    registered = {str(line).split(":", 1)[0].strip() for line in config.getini("markers")}
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "postgres" in registered and names & _POSTGRES_FIXTURES:
            item.add_marker("postgres")
        if "redis" in registered and "redis_url" in names:
            item.add_marker("redis")


# --------------------------------------------------------------------------- mirakuru

# mirakuru starts servers with ``preexec_fn=os.setsid``, which runs Python in
# the forked child; with grpc's threads alive in this process (a test that
# restarts Redis or PostgreSQL while servers run) that child can crash before
# it execs. ``start_new_session`` does the same setsid() without Python.
_mirakuru_popen_kwargs = SimpleExecutor._popen_kwargs


def _popen_kwargs_without_preexec(self: SimpleExecutor) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(_mirakuru_popen_kwargs.fget(self))  # type: ignore[attr-defined]
    if kwargs.pop("preexec_fn", None) is os.setsid:
        kwargs["start_new_session"] = True
    return kwargs


SimpleExecutor._popen_kwargs = property(_popen_kwargs_without_preexec)  # type: ignore[method-assign,assignment]


# --------------------------------------------------------------------------- PostgreSQL

# Non-root: pytest-postgresql's own process fixture.
_authsvc_postgresql_proc = pg_factories.postgresql_proc(
    host=PG_HOST,
    user=PG_USER,
    password=PG_PASSWORD,
    dbname=PG_DBNAME,
    postgres_options=PG_SERVER_OPTIONS,
)


def _pg_os_user() -> pwd.struct_passwd:
    """The unprivileged OS user that runs PostgreSQL for a root pytest; created if needed."""
    wanted = os.environ.get(PG_OS_USER_ENV)
    names = [wanted] if wanted else [PG_OS_USER_DEFAULT, PG_OS_USER_FALLBACK]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    name = names[-1]
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


class _RunAsUserPostgreSQLExecutor(PostgreSQLExecutor):
    """PostgreSQLExecutor whose ``executable`` is a wrapper that drops root.

    Every pg_ctl call of the base class (start, status, stop, --version) goes
    through the wrapper. Only initdb is overridden, because the base class
    writes the password file with tempfile (0600, root's) where the
    unprivileged user cannot read it.
    """

    def __init__(self, *args: Any, os_user: pwd.struct_passwd, workdir: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._os_user = os_user
        self._workdir = workdir

    def init_directory(self) -> None:
        if self._directory_initialised:
            return
        self.clean_directory()
        options = [f"--username={self.user}", "--auth=trust"]
        pwfile = self._workdir / "pwfile"
        if self.password:
            pwfile.write_text(self.password)
            os.chown(pwfile, self._os_user.pw_uid, self._os_user.pw_gid)
            pwfile.chmod(0o600)
            options = [f"--username={self.user}", "--auth=password", f"--pwfile={pwfile}"]
        env = {**os.environ, **self.envvars}
        env.pop("PGDATA", None)
        try:
            subprocess.run(
                [self.executable, "initdb", "-D", self.datadir, "-o", shlex.join(options)],
                env=env,
                check=True,
                capture_output=True,
                timeout=self._timeout,
            )
        except subprocess.CalledProcessError as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            err = (exc.stderr or b"").decode(errors="replace")
            raise RuntimeError(f"initdb failed ({exc.returncode}):\n{out}\n{err}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        self._directory_initialised = True


@pytest.fixture(scope="session")
def _authsvc_postgresql_proc_root(request: pytest.FixtureRequest) -> Iterator[PostgreSQLExecutor]:
    """PostgreSQL for a root pytest: same executor, run as an unprivileged user."""
    with _root_postgres(request) as executor:
        yield executor


@contextlib.contextmanager
def private_postgres(request: pytest.FixtureRequest) -> Iterator[PostgresExecutor]:
    """Another PostgreSQL server, private to its caller, who may stop,
    restart or reconfigure it (fault tests: the session's server must stay
    up). Root or not, it runs as an unprivileged user."""
    with _root_postgres(request, as_root=os.geteuid() == 0) as executor:
        yield PostgresExecutor(
            executor,
            PostgresServer(
                host=executor.host,
                port=int(executor.port),
                user=executor.user,
                password=executor.password or "",
            ),
        )


@dataclass(frozen=True)
class PostgresExecutor:
    """A private server: its executor (``executable`` is pg_ctl, or a wrapper
    that runs it as the server's user) and its connection facts."""

    executor: PostgreSQLExecutor
    server: PostgresServer

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        """Runs ``pg_ctl ARGS -D <datadir> -l <its log>`` (e.g. ``restart -m
        fast``); without ``-l`` a (re)started server would write to our pipe,
        which then never closes."""
        subprocess.run(
            [
                self.executor.executable,
                *args,
                "-D",
                self.executor.datadir,
                "-l",
                self.executor.logfile,
                "-w",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )


@contextlib.contextmanager
def _root_postgres(
    request: pytest.FixtureRequest, *, as_root: bool = True
) -> Iterator[PostgreSQLExecutor]:
    config = get_pg_config(request)
    pg_ctl = config.exec
    if not (pg_ctl and os.access(pg_ctl, os.X_OK)):
        pytest.fail(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/pg_ctl); "
            "run ./tests/run, which installs them"
        )
    runuser = shutil.which("runuser")
    if as_root and runuser is None:
        pytest.fail("runuser (util-linux) is needed to run PostgreSQL as non-root")
    os_user = _pg_os_user() if as_root else pwd.getpwuid(os.geteuid())

    # base/      root 0711: traversable, not writable, by the postgres user
    #   bin/pg_ctl  root-owned wrapper (the postgres user cannot replace it)
    #   pg/      owned by the postgres user, 0700: data dir, socket, log
    base = Path(tempfile.mkdtemp(prefix="authsvc-pgtest-"))
    reaper_keys = [_reaper.add("rmtree", str(base))]
    executor: _RunAsUserPostgreSQLExecutor | None = None
    try:
        base.chmod(0o711)
        bindir = base / "bin"
        bindir.mkdir(mode=0o755)
        workdir = base / "pg"
        workdir.mkdir(mode=0o700)
        os.chown(workdir, os_user.pw_uid, os_user.pw_gid)
        wrapper = bindir / "pg_ctl"
        run_as = (
            f"{shlex.quote(runuser)} -u {shlex.quote(os_user.pw_name)} -- "
            if as_root and runuser
            else ""
        )
        wrapper.write_text(
            "#!/bin/sh\n"
            f"cd {shlex.quote(str(workdir))} || exit 1\n"
            f'exec {run_as}{shlex.quote(pg_ctl)} "$@"\n'
        )
        wrapper.chmod(0o755)

        datadir = workdir / "data"
        reaper_keys.insert(0, _reaper.add("pgdata", str(datadir)))
        executor = _RunAsUserPostgreSQLExecutor(
            executable=str(wrapper),
            host=PG_HOST,
            port=port_for.select_random(),
            datadir=str(datadir),
            unixsocketdir=str(workdir),
            logfile=str(workdir / "postgresql.log"),
            startparams=config.startparams,
            dbname=PG_DBNAME,
            user=PG_USER,
            password=PG_PASSWORD,
            postgres_options=PG_SERVER_OPTIONS,
            os_user=os_user,
            workdir=workdir,
        )
        try:
            executor.start()
        except Exception as exc:
            log = workdir / "postgresql.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            raise RuntimeError(
                f"PostgreSQL did not start: {exc}\n--- server log ---\n{tail}"
            ) from exc
        executor.wait_for_postgres()
        yield executor
    finally:
        if executor is not None:
            try:
                executor.stop()
            except Exception as exc:  # still remove what we can; the reaper retries
                print(f"tests.infra: stopping PostgreSQL failed: {exc}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        if not base.exists():
            for key in reaper_keys:
                _reaper.forget(key)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PostgresServer:
    """The session's PostgreSQL server (started on first use)."""
    if os.geteuid() == 0:
        executor = request.getfixturevalue("_authsvc_postgresql_proc_root")
    else:
        executor = request.getfixturevalue("_authsvc_postgresql_proc")
        _reaper.add("pgdata", executor.datadir)  # idempotent; no-op once stopped
    return PostgresServer(
        host=executor.host,
        port=int(executor.port),
        user=executor.user,
        password=executor.password or "",
    )


@pytest.fixture(scope="session")
def postgres_admin_dsn(postgres_server: PostgresServer) -> str:
    """Superuser URL of the ``postgres`` maintenance database."""
    return postgres_server.url("postgres")


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a freshly created, empty database for the session."""
    url = postgres_server.create_database(PG_DBNAME)
    yield url
    postgres_server.drop_database(PG_DBNAME)


@pytest.fixture
def make_postgres_db(postgres_server: PostgresServer) -> Iterator[Callable[..., str]]:
    """Factory of extra empty databases, dropped at the end of the test."""
    created: list[str] = []

    def make(name: str | None = None) -> str:
        dbname = name or f"{PG_DBNAME}_x{next(_extra_db_ids)}"
        url = postgres_server.create_database(dbname)
        created.append(dbname)
        return url

    yield make
    for dbname in reversed(created):
        postgres_server.drop_database(dbname)


_extra_db_ids = itertools.count(1)


# --------------------------------------------------------------------------- PgBouncer

PGBOUNCER_BIN = "/usr/sbin/pgbouncer"


def _find_pgbouncer() -> str | None:
    """Debian's ``/usr/sbin/pgbouncer``, else one on PATH."""
    if os.access(PGBOUNCER_BIN, os.X_OK):
        return PGBOUNCER_BIN
    return shutil.which("pgbouncer")


def _pgbouncer_version(binary: str) -> tuple[int, int]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


@dataclass(frozen=True)
class PgBouncer:
    """The session's PgBouncer: where it listens, and PostgreSQL's superuser credentials."""

    server: PostgresServer  # PgBouncer's host and port; PostgreSQL's user and password
    pool_size: int  # server connections per (database, user) pool
    logfile: Path

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (asyncpg driver) of ``dbname`` through PgBouncer."""
        return self.server.url(dbname)

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on PgBouncer's admin console (``pools``, ``servers``...), as dicts.

        Blocking (psycopg); from async code, call it through ``asyncio.to_thread``.
        """
        import psycopg
        from psycopg.rows import dict_row

        if not re.fullmatch(r"[a-z_]+", what):
            raise ValueError(f"not a SHOW command: {what!r}")
        # The admin console speaks only the simple query protocol: autocommit
        # (no BEGIN) and a client-side-binding cursor.
        with (
            psycopg.connect(
                asyncpg_dsn(self.url("pgbouncer")),
                autocommit=True,
                cursor_factory=psycopg.ClientCursor,
                connect_timeout=10,
            ) as conn,
            conn.cursor(row_factory=dict_row) as cursor,
        ):
            cursor.execute(f"SHOW {what}")  # a checked keyword
            return cursor.fetchall()


def _pgbouncer_config(
    *, server: PostgresServer, port: int, userlist: Path, version: tuple[int, int]
) -> str:
    lines = [
        "[databases]",
        # Every database of the server, under its own name.
        f"* = host={server.host} port={server.port}",
        "",
        "[pgbouncer]",
        f"listen_addr = {PG_HOST}",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = scram-sha-256",
        f"auth_file = {userlist}",
        f"admin_users = {server.user}",
        "pool_mode = transaction",
        f"default_pool_size = {PGBOUNCER_POOL_SIZE}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        "max_client_conn = 500",
        # asyncpg and libpq clients may send it; PgBouncer rejects unknown ones.
        "ignore_startup_parameters = extra_float_digits",
    ]
    if version >= (1, 21):
        lines.append("max_prepared_statements = 0")
    return "\n".join(lines) + "\n"


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with status {proc.returncode}")
        try:
            with socket.create_connection((PG_HOST, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"pgbouncer did not listen on port {port} in {timeout}s"
                ) from None
            time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: PgBouncer's immediate shutdown
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def pgbouncer_server(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in front of the session's PostgreSQL (started on first use)."""
    binary = _find_pgbouncer()
    if binary is None:
        pytest.fail(f"pgbouncer not found (no {PGBOUNCER_BIN}); run ./tests/run, which installs it")
    # PgBouncer refuses to run as root: the same unprivileged user as PostgreSQL.
    os_user = _pg_os_user() if os.geteuid() == 0 else None

    # workdir/  0700, owned by the user PgBouncer runs as
    #   pgbouncer.ini, userlist.txt (the password: 0600)
    #   pgbouncer.log  PgBouncer's stderr, written through a descriptor of ours
    workdir = Path(tempfile.mkdtemp(prefix="authsvc-pgbouncer-"))
    reaper_keys: list[str | None] = [_reaper.add("rmtree", str(workdir))]
    proc: subprocess.Popen[bytes] | None = None
    logfile = workdir / "pgbouncer.log"
    try:
        port = port_for.select_random()
        userlist = workdir / "userlist.txt"
        userlist.write_text(
            '"{}" "{}"\n'.format(
                *(v.replace('"', '""') for v in (postgres_server.user, postgres_server.password))
            )
        )
        userlist.chmod(0o600)
        ini = workdir / "pgbouncer.ini"
        ini.write_text(
            _pgbouncer_config(
                server=postgres_server,
                port=port,
                userlist=userlist,
                version=_pgbouncer_version(binary),
            )
        )
        ini.chmod(0o600)
        user_args: dict[str, Any] = {}
        if os_user is not None:
            for path in (workdir, userlist, ini):
                os.chown(path, os_user.pw_uid, os_user.pw_gid)
            user_args = {"user": os_user.pw_uid, "group": os_user.pw_gid, "extra_groups": []}
        with logfile.open("ab") as log:
            proc = subprocess.Popen(
                [binary, str(ini)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not hit by the terminal's Ctrl-C
                **user_args,
            )
        reaper_keys.insert(0, _reaper.add_pid(proc.pid))
        try:
            _wait_for_port(proc, port, timeout=30)
        except RuntimeError as exc:
            tail = logfile.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"PgBouncer did not start: {exc}\n--- its log ---\n{tail}") from exc
        yield PgBouncer(
            server=PostgresServer(
                host=PG_HOST,
                port=port,
                user=postgres_server.user,
                password=postgres_server.password,
            ),
            pool_size=PGBOUNCER_POOL_SIZE,
            logfile=logfile,
        )
    finally:
        if proc is not None:
            _stop_process(proc, grace=10)
        shutil.rmtree(workdir, ignore_errors=True)
        if not workdir.exists() and (proc is None or proc.poll() is not None):
            for key in reaper_keys:
                _reaper.forget(key)


@pytest.fixture(scope="session")
def pgbouncer_dsn(pgbouncer_server: PgBouncer, migrated_postgres: str) -> str:
    """URL through PgBouncer of the session database, migrated (``tests.app``'s fixture)."""
    dbname = unquote(urlsplit(migrated_postgres).path.lstrip("/"))
    return pgbouncer_server.url(dbname)


# --------------------------------------------------------------------------- Redis

# Port: pytest-redis picks a free one (unless --redis-port is given).
_authsvc_redis_proc = redis_factories.redis_proc(host="127.0.0.1")


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's redis-server (started on first use)."""
    redis_exec = request.config.getoption("redis_exec", None) or request.config.getini("redis_exec")
    if not (redis_exec or shutil.which("redis-server")):
        pytest.fail("redis-server not found; run ./tests/run, which installs it")
    executor = request.getfixturevalue("_authsvc_redis_proc")
    if executor.process is not None:
        _reaper.add_pid(executor.process.pid)  # no-op for the reaper once it has exited
    return f"redis://{executor.host}:{executor.port}/0"
