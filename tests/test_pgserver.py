"""Tests of the test infrastructure itself: the throwaway Postgres server and the URL fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest


def _psycopg_dsn(sqlalchemy_url: str) -> str:
    assert sqlalchemy_url.startswith("postgresql+psycopg://"), sqlalchemy_url
    return "postgresql://" + sqlalchemy_url.removeprefix("postgresql+psycopg://")


def test_pg_url_is_durable_per_test_database(pg_url: str, pg_server: Any) -> None:
    assert pg_url.startswith("postgresql+psycopg://")
    with psycopg.connect(_psycopg_dsn(pg_url)) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None and pg_url.endswith("/" + dbname[0])
        conn.execute("CREATE TABLE t (x int)")
    if pg_server is not None:
        assert f"@127.0.0.1:{pg_server.port}/" in pg_url
        with psycopg.connect(_psycopg_dsn(pg_server.url("postgres"))) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("200",)


def test_pg_url_database_is_fresh(pg_url: str) -> None:
    # The previous test created table t in its database; ours must not have it.
    with psycopg.connect(_psycopg_dsn(pg_url)) as conn:
        assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)


@pytest.fixture
def leaked_connections() -> Iterator[list[psycopg.Connection]]:
    """Requested *before* pg_url, so its teardown runs *after* pg_url's (database dropped)."""
    leaked: list[psycopg.Connection] = []
    yield leaked
    for conn in leaked:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # terminated by pg_url's teardown
        conn.close()


def test_pg_url_teardown_survives_leaked_connections(leaked_connections: list[psycopg.Connection], pg_url: str) -> None:
    # Simulates a library pool that is never disposed: open connections, one of them
    # idle in a transaction holding a lock. Teardown must still drop the database.
    leaked_connections.extend(psycopg.connect(_psycopg_dsn(pg_url)) for _ in range(3))
    leaked_connections[0].execute("CREATE TABLE locked (x int)")  # leaves an open transaction


def test_db_url_yields_both_backends(db_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.id
    assert backend in ("sqlite", "postgres")
    if backend == "sqlite":
        assert db_url.startswith("sqlite:///")
        assert db_url.endswith("/ledger.db")
    else:
        assert db_url.startswith("postgresql+psycopg://")
        with psycopg.connect(_psycopg_dsn(db_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def engines() -> Iterator[list[Any]]:
    """Requested before db_url: engines are disposed only after the database was dropped."""
    made: list[Any] = []
    yield made
    for engine in made:
        engine.dispose()


def test_db_url_with_sqlalchemy(engines: list[Any], db_url: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(db_url)
    engines.append(engine)  # pooled connections stay open through pg_url's teardown
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE ledger_probe (k text PRIMARY KEY)"))
        conn.execute(sqlalchemy.text("INSERT INTO ledger_probe VALUES ('a')"))
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT k FROM ledger_probe")).scalar_one() == "a"


def test_private_server_restart(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    port = server.port
    assert server.url("postgres") == f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    with psycopg.connect(_psycopg_dsn(server.url("postgres")), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    old = psycopg.connect(_psycopg_dsn(server.url("postgres")))

    server.restart()  # a Postgres outage
    assert server.port == port
    assert server.is_running()
    with pytest.raises(psycopg.OperationalError):
        old.execute("SELECT 1")  # connections from before the outage are gone
    old.close()
    with psycopg.connect(_psycopg_dsn(server.url("postgres"))) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(1,)]

    server.stop()
    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_psycopg_dsn(server.url("postgres")), connect_timeout=2)
    server.start()
    with psycopg.connect(_psycopg_dsn(server.url("postgres"))) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)

    base_dir = server.base_dir
    server.close()
    assert not base_dir.exists()
    server.close()  # idempotent


def test_private_server_kill_keeps_committed_data(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    with psycopg.connect(_psycopg_dsn(server.url("postgres")), autocommit=True) as conn:
        conn.execute("CREATE TABLE durable (x int)")
        conn.execute("INSERT INTO durable SELECT generate_series(1, 100)")
    server.kill()  # crash: SIGKILL, no shutdown checkpoint
    assert not server.is_running()
    server.start()  # crash recovery replays the WAL
    with psycopg.connect(_psycopg_dsn(server.url("postgres"))) as conn:
        assert conn.execute("SELECT count(*) FROM durable").fetchone() == (100,)
    assert "database system was interrupted" in server.log_tail(200) or "redo" in server.log_tail(200)
