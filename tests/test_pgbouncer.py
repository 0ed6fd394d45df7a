"""PgBouncer in transaction pooling mode (a real pgbouncer, tests/_pgbouncer.py, in front of a real Postgres).

What breaks without ``?pgbouncer=transaction`` (psycopg prepares a statement on one server connection after
five executions; the next transaction may reach another server), that the option and automatic detection
turn it off, how the option is checked, and that the CLI and the migrations take it. The adversarial tests
(tests/test_adversarial.py, marked ``pgbouncer``) run every process, kill and takeover test through PgBouncer
as well.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _pgbouncer import PgBouncer
from pytest_postgresql.executors import NoopExecutor
from sqlalchemy.engine import make_url

from agent_ledger import ConfigurationError, Ledger, OutcomeUnknown, StorageError, ToolCall
from agent_ledger._runtime import normalise_url

ROOT = Path(__file__).resolve().parents[1]
SECRET = "pw-Zq8s3cr3t"


@pytest.fixture
def small_bouncer(postgresql_noproc: NoopExecutor) -> Iterator[PgBouncer]:
    """A private PgBouncer (transaction pooling, at most 4 server connections per database)."""
    server = postgresql_noproc
    with PgBouncer(
        server.host, int(server.port), server.user, server.password or None, settings={"default_pool_size": "4"}
    ) as bouncer:
        yield bouncer


def through(bouncer: PgBouncer, pg_url: str, flag: str | None) -> str:
    """``pg_url``'s database reached through ``bouncer``, with ``?pgbouncer=<flag>`` (None: no option)."""
    url = make_url(pg_url).set(host=bouncer.host, port=bouncer.port)
    if flag is not None:
        url = url.update_query_dict({"pgbouncer": flag})
    return url.render_as_string(hide_password=False)


def hold_a_server(bouncer: PgBouncer, pg_url: str) -> psycopg.Connection[Any]:
    """A client inside an open transaction: it keeps the idle server connection PgBouncer gives it (the one
    the ledger's calls just used, when they ran one at a time), so the ledger's next statement goes to
    another server connection."""
    conn = psycopg.connect(bouncer.conninfo(str(make_url(pg_url).database)))
    conn.execute("SELECT 1").fetchone()
    return conn


FIRST, THEN = 12, 6
"""Calls before the server is taken away (psycopg prepares a statement after its fifth execution), and after."""


def _outcomes(
    url: str, path: str, executions: Counter[int], hold: Callable[[], psycopg.Connection[Any]]
) -> list[tuple[int, str]]:
    """Run FIRST + THEN new calls one at a time on one ledger (sync, async or the Core reference path),
    with a server connection taken away after FIRST; return (call, error) for the calls that failed."""
    led = Ledger(url, auto_migrate=False)
    led._rt.use_hot_path = path != "core"

    def handler(i: int) -> int:
        executions[i] += 1
        return i * i

    def call(i: int) -> ToolCall:
        return ToolCall(workflow_id="bounce", tool="square", args={"i": i})

    failed: list[tuple[int, str]] = []

    async def arun() -> None:
        for i in range(FIRST):
            assert await led.arun(call(i), handler=handler) == i * i
        blocker = hold()
        try:
            for i in range(FIRST, FIRST + THEN):
                try:
                    assert await led.arun(call(i), handler=handler) == i * i
                except (StorageError, OutcomeUnknown) as e:
                    failed.append((i, f"{type(e).__name__}: {e}"))
        finally:
            blocker.close()

    try:
        if path == "async":
            asyncio.run(arun())
        else:
            for i in range(FIRST):
                assert led.run(call(i), handler=handler) == i * i
            blocker = hold()
            try:
                for i in range(FIRST, FIRST + THEN):
                    try:
                        assert led.run(call(i), handler=handler) == i * i
                    except (StorageError, OutcomeUnknown) as e:
                        failed.append((i, f"{type(e).__name__}: {e}"))
            finally:
                blocker.close()
    finally:
        led.close()
    return failed


@pytest.mark.parametrize("path", ["sync", "async", "core"])
@pytest.mark.parametrize("flag", ["session", "transaction", None], ids=["session", "transaction", "detected"])
def test_prepared_statements_break_transaction_pooling_unless_turned_off(
    pg_url: str, small_bouncer: PgBouncer, path: str, flag: str | None
) -> None:
    """Without the switch (``?pgbouncer=session`` claims server sessions are kept, so prepared statements stay
    on), calls through a transaction-pooling PgBouncer fail with "prepared statement ... does not exist" once
    their statements were prepared on a server connection another client now holds. ``?pgbouncer=transaction``
    and automatic detection (no option) turn prepared statements off: every call works. Whatever failed, no
    call ran its handler twice, and a later ledger settles every call with exactly one execution."""
    Ledger(pg_url).migrate()
    executions: Counter[int] = Counter()
    failed = _outcomes(
        through(small_bouncer, pg_url, flag), path, executions, lambda: hold_a_server(small_bouncer, pg_url)
    )
    if flag == "session":
        assert failed, "prepared statements through transaction pooling should have failed"
        for _i, error in failed:
            assert 'prepared statement "_pg3_' in error and "does not exist" in error, error
            # Told what to do (not "run agent-ledger migrate": the tables are there).
            assert error.startswith("StorageError") and "add ?pgbouncer=transaction to the URL" in error, error
    else:
        assert failed == []
    assert all(n == 1 for n in executions.values()), executions
    # Every call again, through PgBouncer with the switch on: replays, and the calls that failed before their
    # handler ran now run it once. (A call whose outcome could not be recorded is honestly unknown.)
    after = Ledger(through(small_bouncer, pg_url, "transaction"))
    unknown = set()
    for i in range(FIRST + THEN):

        def again(i: int) -> int:
            executions[i] += 1
            return i * i

        try:
            assert after.run(ToolCall(workflow_id="bounce", tool="square", args={"i": i}), handler=again) == i * i
        except OutcomeUnknown:
            unknown.add(i)
    after.close()
    assert unknown <= {i for i, e in failed if e.startswith("OutcomeUnknown")}
    assert executions == {i: 1 for i in range(FIRST + THEN)}


def test_the_driver_itself_breaks_without_the_switch(pg_url: str, small_bouncer: PgBouncer) -> None:
    """The failure is psycopg's default behaviour through transaction pooling, not something of the ledger:
    a plain connection that ran a query five times has it prepared; on another server it is missing."""
    dbname = str(make_url(pg_url).database)
    conn = psycopg.connect(small_bouncer.conninfo(dbname), autocommit=True)
    for i in range(8):
        assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
    blocker = hold_a_server(small_bouncer, pg_url)
    try:
        with pytest.raises(psycopg.errors.InvalidSqlStatementName, match='prepared statement "_pg3_0" does not exist'):
            conn.execute("SELECT %s::int", (9,))
        conn.prepare_threshold = None  # what ?pgbouncer=transaction does to the ledger's connections
        assert conn.execute("SELECT %s::int", (10,)).fetchone() == (10,)
    finally:
        blocker.close()
        conn.close()


def test_detection_and_listen_ok(pg_url: str, small_bouncer: PgBouncer, tmp_path: Path) -> None:
    """``Runtime.listen_ok`` (may a waiter LISTEN?) and prepared statements, per URL, after the first call."""
    Ledger(pg_url).migrate()

    def after_a_call(url: str) -> tuple[bool, bool | None, bool]:
        led = Ledger(url)
        before = led._rt.listen_ok
        assert led.run(ToolCall(workflow_id="d", tool="t", args={"u": url[-12:]}), handler=lambda u: u) == url[-12:]
        out = (before, led._rt.pooling.pooled, led._rt.listen_ok)
        assert led._rt.prepare_threshold == (None if led._rt.pooling.pooled else 5)
        led.close()
        return out

    # Direct: unknown (False) until a connection was checked, then True.
    assert after_a_call(pg_url) == (False, False, True)
    # Through PgBouncer without the option: detected (its backend pid is made up).
    assert after_a_call(through(small_bouncer, pg_url, None)) == (False, True, False)
    # Explicit: nothing to detect.
    assert after_a_call(through(small_bouncer, pg_url, "transaction")) == (False, True, False)
    assert after_a_call(through(small_bouncer, pg_url, "session")) == (True, False, True)
    sqlite = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    assert sqlite._rt.listen_ok is False
    sqlite.close()


def test_detection_assumes_transaction_pooling_behind_a_session_pooler(
    pg_url: str, postgresql_noproc: NoopExecutor
) -> None:
    """A pooler's mode cannot be read from a data connection: behind PgBouncer in session mode detection
    still turns prepared statements off (safe, slightly slower); ``?pgbouncer=session`` keeps them."""
    server = postgresql_noproc
    Ledger(pg_url).migrate()
    with PgBouncer(server.host, int(server.port), server.user, server.password or None, pool_mode="session") as b:
        for flag, pooled in ((None, True), ("session", False)):
            led = Ledger(through(b, pg_url, flag))
            for i in range(10):
                assert led.run(ToolCall(workflow_id="s", tool="t", args={"i": i}), handler=lambda i: i) == i
            assert led._rt.pooling.pooled is pooled
            led.close()


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("pgbouncer=bogus", "not the unknown value 'bogus'"),
        ("pgbouncer=statement", "statement pooling cannot run the ledger's transactions"),
        (f"pgbouncer={SECRET}%21", "not the unknown value"),  # not echoed: it does not look like a mode
        ("pgbouncer=transaction&pgbouncer=session", "given more than once"),
        ("pgbouncer=", "needs a value"),
        ("sslmode=require&pgbouncer", "needs a value"),
    ],
)
def test_unknown_values_are_configuration_errors_without_secrets(query: str, why: str) -> None:
    url = f"postgresql+psycopg://app:{SECRET}@db.internal:6432/app?{query}"
    with pytest.raises(ConfigurationError) as raised:
        Ledger(url)
    message = str(raised.value)
    assert why in message and ("'transaction'" in message or why == "given more than once")
    if why == "not the unknown value":
        assert message.endswith(why)  # a value that does not look like a mode name is not echoed
    assert SECRET not in message and "app:***@db.internal" in message
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_the_option_is_postgres_only_and_never_reaches_the_driver(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="applies to Postgres URLs only"):
        Ledger(f"sqlite:///{tmp_path / 'l.db'}?pgbouncer=transaction")
    dialect, sync_url, async_url = normalise_url(
        f"postgresql://u:{SECRET}@h:6432/d?pgbouncer=transaction&sslmode=require"
    )
    assert dialect == "postgresql"
    for url in (sync_url, async_url):
        assert "pgbouncer" not in url and make_url(url).query == {"sslmode": "require"}
    assert normalise_url("postgresql://u@h/d?pgbouncer=session")[1] == "postgresql+psycopg://u@h/d"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_ledger", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _tables(pg_url: str) -> set[str]:
    engine = sa.create_engine(pg_url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_cli_takes_the_option(pg_url: str, pg_bouncer: PgBouncer) -> None:
    """``agent-ledger migrate`` and the reading commands through PgBouncer; a bad value is a clean error."""
    url = through(pg_bouncer, pg_url, "transaction")
    out = _cli("migrate", "--url", url)
    assert out.returncode == 0, out.stderr
    assert {"agent_ledger_effects", "agent_ledger_events"} <= _tables(pg_url)
    led = Ledger(url)
    for i in range(8):
        led.run(ToolCall(workflow_id="cli", tool="t", args={"i": i}), handler=lambda i: i)
    led.close()
    out = _cli("history", "cli", "--url", url, "--json")
    assert out.returncode == 0, out.stderr
    assert '"tool": "t"' in out.stdout and out.stdout.count('"status": "succeeded"') == 8
    bad = make_url(url).set(password=SECRET).update_query_dict({"pgbouncer": "sometimes"})
    out = _cli("history", "cli", "--url", bad.render_as_string(hide_password=False))
    assert out.returncode != 0 and "pgbouncer= must be 'transaction'" in out.stderr
    assert "Traceback" not in out.stderr and SECRET not in out.stderr + out.stdout


def test_alembic_migrates_through_pgbouncer(pg_url: str, pg_bouncer: PgBouncer) -> None:
    """``alembic -c alembic.ini upgrade head`` with ``$AGENT_LEDGER_URL`` through PgBouncer (env.py's own
    engine), from nothing and then from the previous revision."""
    url = through(pg_bouncer, pg_url, "transaction")
    env = {"AGENT_LEDGER_URL": url}
    for args in (["upgrade", "head"], ["downgrade", "-1"], ["upgrade", "head"]):
        out = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
    led = Ledger(url)
    assert led.run(ToolCall(workflow_id="m", tool="t", args={}), handler=lambda: "ok") == "ok"
    led.close()
