"""Shared test fixtures.

Postgres: unless ``--postgresql-port`` is given (an external server, reached with the
``--postgresql-host/-user/-password`` options of pytest-postgresql), one throwaway
PostgreSQL cluster (tests/_pgserver.py) is started for the whole session in
``pytest_configure`` and pytest-postgresql's ``postgresql_noproc`` fixture is pointed at
it.  Each test that asks for ``pg_url`` gets a fresh database, dropped afterwards.

Fixtures:

* ``pg_server``  (session) the session's PgServer, or None with an external server.
* ``pg_server_factory`` (function) start private PgServers, closed after the test.
* ``postgresql`` (function) psycopg connection to the per-test database (pytest-postgresql).
* ``pg_url``     (function) SQLAlchemy URL of the per-test database.
* ``sqlite_url`` (function) SQLAlchemy URL of a fresh SQLite file under tmp_path.
* ``db_url``     (function) parametrised over ids ``sqlite`` and ``postgres``; in a module or test
  marked ``pytest.mark.pgbouncer``, also ``pgbouncer``.
* ``pg_bouncer`` (session) a PgBouncer in transaction pooling mode (tests/_pgbouncer.py) in front of the
  session's Postgres, started on first use.
* ``pgbouncer_url`` (function) the ``pg_url`` database through ``pg_bouncer``, with ``?pgbouncer=transaction``.

Every test that uses Postgres is marked ``postgres``. ``--pg-partitions N`` makes every migration of the
run create the Postgres tables hash-partitioned by workflow_id (docs/scaling.md); scripts/test.sh runs
``-m postgres --pg-partitions 4`` after the whole suite.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor

pytest_plugins = ["pytester"]

try:  # repo root importable (python -m pytest, editable install, or tests/ is a package)
    from tests._pgbouncer import PgBouncer, PgBouncerError
    from tests._pgserver import PgServer, PgServerError
except ImportError:  # plain `pytest` with rootdir-conftest: tests/ itself is on sys.path
    from _pgbouncer import PgBouncer, PgBouncerError  # type: ignore[no-redef,import-not-found,unused-ignore]
    from _pgserver import PgServer, PgServerError  # type: ignore[no-redef,import-not-found,unused-ignore]

_PG_SERVER_KEY = pytest.StashKey["PgServer | None"]()


def _is_xdist_controller(config: pytest.Config) -> bool:
    # With pytest-xdist the workers run pytest_configure themselves (one server each);
    # the controller runs no tests and needs no server.
    if hasattr(config, "workerinput"):
        return False
    numprocesses = getattr(config.option, "numprocesses", None)
    return bool(numprocesses) or getattr(config.option, "dist", "no") != "no"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-partitions",
        type=int,
        default=None,
        metavar="N",
        help="create every Postgres schema of the run hash-partitioned by workflow_id into N partitions "
        "(sets AGENT_LEDGER_PARTITIONS, which migrations read, also in spawned processes); "
        "combine with -m postgres to run only the tests that use Postgres",
    )


_PG_FIXTURES = frozenset(
    {"pg_url", "postgresql", "postgresql_async", "pg_server", "pg_server_factory", "pg_bouncer", "pgbouncer_url"}
)


def _uses_postgres(item: pytest.Item) -> bool:
    if _PG_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("db_url") in ("postgres", "pgbouncer")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``postgres`` every test that uses a Postgres database (``-m postgres`` selects them)."""
    for item in items:
        if _uses_postgres(item):
            item.add_marker(pytest.mark.postgres)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_PG_SERVER_KEY] = None
    partitions = config.getoption("pg_partitions", default=None)
    if partitions is not None:
        if not 1 <= partitions <= 1024:
            raise pytest.UsageError("--pg-partitions takes a number from 1 to 1024")
        # Every migration of the run (fixtures, Ledger(auto_migrate=True), the CLI in a subprocess)
        # creates the partitioned schema; SQLite ignores it.
        os.environ["AGENT_LEDGER_PARTITIONS"] = str(partitions)
    if config.getoption("postgresql_port", default=None):
        return  # external server: pytest-postgresql's own options already describe it
    if config.option.help or config.option.version or _is_xdist_controller(config):
        return
    try:
        server = PgServer()
    except PgServerError as exc:
        raise pytest.UsageError(f"Could not set up the test PostgreSQL server: {exc}") from exc
    try:
        server.start()
    except PgServerError as exc:
        server.close()
        raise pytest.UsageError(f"Could not start the test PostgreSQL server: {exc}") from exc
    config.stash[_PG_SERVER_KEY] = server
    config.option.postgresql_host = server.host
    config.option.postgresql_port = str(server.port)
    config.option.postgresql_user = server.user


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_PG_SERVER_KEY, None)
    if server is not None:
        config.stash[_PG_SERVER_KEY] = None
        server.close()


def pytest_report_header(config: pytest.Config) -> str:
    server = config.stash.get(_PG_SERVER_KEY, None)
    if server is not None:
        return f"postgresql: throwaway server {server.host}:{server.port} ({server.bin_dir})"
    port = config.getoption("postgresql_port", default=None)
    if port:
        return f"postgresql: external server {config.getoption('postgresql_host') or '127.0.0.1'}:{port}"
    return "postgresql: none"


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> PgServer | None:
    """The session's throwaway PgServer, or None when testing against an external server.

    Restarting it (``pg_server.restart()``) simulates an outage for every test database;
    tests that want to kill or restart a server in isolation should start their own PgServer.
    """
    return pytestconfig.stash.get(_PG_SERVER_KEY, None)


@pytest.fixture
def pg_server_factory() -> Iterator[Callable[..., PgServer]]:
    """Start extra, private PgServers (to kill or restart without disturbing other tests).

    ``server = pg_server_factory()`` returns a started server; keyword arguments go to
    PgServer().  Every server made is closed (stopped, temp dir removed) after the test.
    """
    servers: list[PgServer] = []

    def make(**kwargs: Any) -> PgServer:
        server = PgServer(**kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in reversed(servers):
        server.close()


# pytest-postgresql: override the plugin's process-spawning fixtures so that everything
# uses the server configured above (the plugin's postgresql_proc would run pg_ctl itself,
# which fails as root).
postgresql_noproc = factories.postgresql_noproc()
postgresql = factories.postgresql("postgresql_noproc")
postgresql_async = factories.postgresql_async("postgresql_noproc")


def _force_drop_database(server: NoopExecutor, dbname: str) -> None:
    """Drop the per-test database even if the code under test still holds connections to it.

    pytest-postgresql's DatabaseJanitor.drop() (run right after this) already does
    ``ALTER DATABASE ... allow_connections false`` + ``pg_terminate_backend`` + ``DROP DATABASE``,
    but pg_terminate_backend only *signals* the backends and DROP DATABASE gives them
    just 5 seconds to go; a slow backend makes the drop fail with "database ... is being
    accessed by other users", and then every later test's CREATE DATABASE fails too
    (all tests reuse the same database name).  So: forbid new connections, terminate and
    *wait* for the backends (PG >= 14), and DROP ... WITH (FORCE) (PG >= 13).  The
    janitor then finds the database gone and does nothing.
    """
    with psycopg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        dbname=server.maintenance_dbname,
        autocommit=True,
    ) as admin:
        version = admin.info.server_version
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            return
        ident = sql.Identifier(dbname)
        admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))
        terminate = "pg_terminate_backend(pid, 5000)" if version >= 140000 else "pg_terminate_backend(pid)"
        admin.execute(
            f"SELECT {terminate} FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        force = sql.SQL(" WITH (FORCE)") if version >= 130000 else sql.SQL("")
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident) + force)


@pytest.fixture
def pg_url(postgresql_noproc: NoopExecutor, postgresql: psycopg.Connection) -> Iterator[str]:
    """SQLAlchemy URL (``postgresql+psycopg://user@host:port/dbname``) of a fresh per-test database.

    The database is dropped after the test even if connections to it are still open
    (pooled connections of the code under test are terminated).
    """
    server = postgresql_noproc
    dbname = postgresql.info.dbname
    auth = quote(server.user, safe="")
    if server.password:
        auth += ":" + quote(server.password, safe="")
    yield f"postgresql+psycopg://{auth}@{server.host}:{server.port}/{quote(dbname, safe='')}"
    # Runs before pytest-postgresql's own teardown (close its connection, janitor drop).
    # Closing its connection here is harmless: the fixture's close() is idempotent.
    postgresql.close()
    try:
        _force_drop_database(server, dbname)
    except psycopg.Error as exc:  # leave it to the janitor, which will report a real failure
        warnings.warn(f"pg_url teardown could not drop {dbname!r}: {exc}", stacklevel=1)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite database file in the test's tmp_path."""
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture(scope="session")
def pg_bouncer(postgresql_noproc: NoopExecutor) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the session's Postgres (every database name is
    passed through), started on first use and stopped at the end of the session."""
    server = postgresql_noproc
    try:
        bouncer = PgBouncer(server.host, int(server.port), server.user, server.password or None)
        bouncer.start()
    except PgBouncerError as exc:
        pytest.fail(f"Could not start the test PgBouncer: {exc}", pytrace=False)
    yield bouncer
    bouncer.close()


@pytest.fixture
def pgbouncer_url(pg_url: str, pg_bouncer: PgBouncer) -> str:
    """The fresh per-test database of ``pg_url``, reached through ``pg_bouncer`` (transaction pooling), with
    ``?pgbouncer=transaction``."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_url).set(host=pg_bouncer.host, port=pg_bouncer.port)
    return url.update_query_dict({"pgbouncer": "transaction"}).render_as_string(hide_password=False)


BACKENDS = ("sqlite", "postgres")
"""The ``db_url`` backends every storage test runs on."""

BACKENDS_WITH_PGBOUNCER = (*BACKENDS, "pgbouncer")
"""The ``db_url`` backends of tests marked ``pytest.mark.pgbouncer``: also Postgres through PgBouncer."""


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``pgbouncer`` that use ``db_url`` also run through PgBouncer: a ``parametrize`` mark
    on ``db_url`` takes precedence over the fixture's own params."""
    if "db_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("pgbouncer"):
        metafunc.definition.add_marker(
            pytest.mark.parametrize("db_url", BACKENDS_WITH_PGBOUNCER, indirect=True, ids=BACKENDS_WITH_PGBOUNCER)
        )


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL on each backend: runs the test once on SQLite, once on Postgres (and, when
    marked ``pgbouncer``, once on Postgres through PgBouncer in transaction pooling mode)."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    if request.param == "pgbouncer":
        return str(request.getfixturevalue("pgbouncer_url"))
    return str(request.getfixturevalue("pg_url"))


# ---- library fixtures (added by the library engineer) ----

from agent_ledger import Ledger  # noqa: E402


class Counter:
    """Counts handler executions (in this process)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def make_ledger(db_url: str) -> Iterator[Callable[..., Ledger]]:
    """Ledgers on the test database (migrated); each one is like a fresh process's."""
    made: list[Ledger] = []

    def make(**kwargs: Any) -> Ledger:
        kwargs.setdefault("auto_migrate", True)
        led = Ledger(db_url, **kwargs)
        made.append(led)
        return led

    yield make
    for led in made:
        led.close()


@pytest.fixture
def ledger(make_ledger: Callable[..., Ledger]) -> Ledger:
    return make_ledger()
