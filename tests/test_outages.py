"""Database outages and load: errors reach the caller as StorageError, the replay-record writer survives
an outage, the connection pools are bounded, SQLite's real errors are reported, SQLite URL options are
honoured.

Every test runs against real databases: private Postgres servers (stopped, restarted, or started with a
small ``max_connections``) and SQLite files. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent_ledger import ConfigurationError, Ledger, StorageError, ToolCall, cli

PASSWORD = "s3cret-pw-xyz"  # the test servers trust every local connection, so any password is accepted


def _with_password(url: str) -> str:
    return url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{PASSWORD}@")


def _call(i: int, workflow: str = "w") -> ToolCall:
    return ToolCall(workflow_id=workflow, tool="t", args={"i": i})


def _replay_counts(led: Ledger, workflow: str = "w") -> dict[int, int]:
    return {rec.args["i"]: rec.replays for rec in led.history(workflow)}


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _assert_storage_error(e: BaseException) -> None:
    assert isinstance(e, StorageError), f"{type(e).__name__}: {e}"
    text = str(e)
    assert "database" in text and "during" in text, text  # names what failed
    assert PASSWORD not in text
    assert PASSWORD not in repr(e.__cause__)


# -- 1. a failed (re)connect on the hot path is a StorageError -------------------------------------


def test_sync_outage_on_the_hot_path_is_a_storage_error(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    led = Ledger(_with_password(server.url()), auto_migrate=True)
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i * 10

    try:
        assert led.run(_call(1), handler=handler) == 10
        assert led.run(_call(1), handler=handler) == 10  # a replay: the key is known
        server.stop()
        for _ in range(3):  # the pooled connection fails first, then every reconnect
            for call in (_call(1), _call(2)):  # a replay and a new call
                with pytest.raises(Exception) as info:
                    led.run(call, handler=handler)
                _assert_storage_error(info.value)
        assert runs == [1]  # a call that could not claim never ran its handler
        server.start()
        assert led.run(_call(1), handler=handler) == 10
        assert led.run(_call(2), handler=handler) == 20
        assert led.run(_call(2), handler=handler) == 20
        assert runs == [1, 2]
    finally:
        led.close()


async def test_async_outage_on_the_hot_path_is_a_storage_error(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    led = Ledger(_with_password(server.url()), auto_migrate=True)
    runs: list[int] = []

    async def handler(i: int) -> int:
        runs.append(i)
        return i * 10

    try:
        assert await led.run(_call(1), handler=handler) == 10
        assert await led.run(_call(1), handler=handler) == 10
        await asyncio.to_thread(server.stop)
        for _ in range(3):
            for call in (_call(1), _call(2)):
                with pytest.raises(Exception) as info:
                    await led.run(call, handler=handler)
                _assert_storage_error(info.value)
        assert runs == [1]
        await asyncio.to_thread(server.start)
        assert await led.run(_call(1), handler=handler) == 10
        assert await led.run(_call(2), handler=handler) == 20
        assert await led.run(_call(2), handler=handler) == 20
        assert runs == [1, 2]
    finally:
        await led.aclose()


def test_unreachable_database_is_a_storage_error(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    url = _with_password(server.url())
    Ledger(url).migrate()
    server.stop()
    led = Ledger(url)
    try:
        with pytest.raises(StorageError) as info:
            led.run(_call(1), handler=lambda i: i)
        _assert_storage_error(info.value)
    finally:
        led.close()


# -- 2. the replay-record writer survives an outage ----------------------------------------------


def test_replay_records_survive_a_postgres_restart(pg_server_factory: Callable[..., Any]) -> None:
    server = pg_server_factory()
    led = Ledger(server.url(), auto_migrate=True)
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i

    try:
        for i in range(3):
            led.run(_call(i), handler=handler)
        for i in range(3):
            led.run(_call(i), handler=handler)  # replays before the outage (buffered)
        server.stop()  # the outage hits before the writer wrote them (it writes every half second)
        for i in range(3):
            with pytest.raises(StorageError):
                led.run(_call(i), handler=handler)  # calls during the outage: no replay, an error
        time.sleep(2)  # the writer tries (and fails) at least once while the server is down
        server.start()
        for i in range(3):
            led.run(_call(i), handler=handler)  # replays after the outage
        _wait_until(
            lambda: _pg_replay_total(server) == 6, timeout=30, what="the writer to record the replays on its own"
        )
        assert runs == [0, 1, 2]
        for _ in range(2):
            led.run(_call(0), handler=handler)  # the writer keeps working after the outage
        led.flush()
        assert _replay_counts(led) == {0: 4, 1: 2, 2: 2}
        assert runs == [0, 1, 2]
    finally:
        led.close()


def _pg_replay_total(server: Any) -> int:
    try:
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum((detail->>'count')::int), 0) FROM agent_ledger_events WHERE kind = 'replayed'"
            ).fetchone()
    except psycopg.OperationalError:
        return -1
    assert row is not None
    return int(row[0])


def _sqlite_replay_total(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT coalesce(sum(json_extract(detail, '$.count')), 0) FROM agent_ledger_events WHERE kind = 'replayed'"
        ).fetchone()
    finally:
        conn.close()
    return int(row[0])


def _set_max_pages(led: Ledger, pages: int | None) -> None:
    """Set ``PRAGMA max_page_count`` on the SQLite connections of the ledger's hot-path pool (the pragma
    is per connection): ``None`` lifts the limit, a number at the file's size makes every write that
    grows the file fail with SQLITE_FULL, as on a full disk."""
    pool = led._rt._pool()
    conns = [pool.acquire() for _ in range(4)]  # every connection it holds (a few at most here)
    try:
        for conn in conns:
            conn.execute(f"PRAGMA max_page_count = {pages if pages is not None else 2**30}")
    finally:
        for conn in conns:
            pool.release(conn, True)


def test_replay_records_survive_a_full_sqlite_disk(tmp_path: Path) -> None:
    """SQLite's outage for writes: a full disk (reads go on, so replays are served while their records
    cannot be written)."""
    path = tmp_path / "ledger.db"
    led = Ledger(f"sqlite:///{path}")
    workflow = "w" * 250  # long rows: the records of 300 keys need new pages
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i

    try:
        for i in range(300):
            led.run(_call(i, workflow), handler=handler)
        pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
        _set_max_pages(led, pages)  # the disk is full: no write that grows the file succeeds
        for i in range(600):
            assert led.run(_call(i % 300, workflow), handler=handler) == i % 300  # replays (reads): served
        time.sleep(1.5)  # the writer tried and failed
        assert _sqlite_replay_total(path) == 0
        _set_max_pages(led, None)  # space again
        led.run(_call(0, workflow), handler=handler)
        _wait_until(lambda: _sqlite_replay_total(path) == 601, timeout=30, what="the writer to catch up")
        assert runs == list(range(300))
        assert _replay_counts(led, workflow) == {i: 3 if i == 0 else 2 for i in range(300)}
    finally:
        led.close()


# -- 3. bounded pools ----------------------------------------------------------------------------


class _Peak:
    """Samples the number of server connections to one database while a block runs."""

    def __init__(self, server: Any, dbname: str = "postgres") -> None:
        self.server, self.dbname = server, dbname
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        with psycopg.connect(self.server.conninfo(), autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.dbname,),
                ).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                self.samples += 1
                time.sleep(0.002)

    def __enter__(self) -> _Peak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        _wait_until(lambda: self.samples > 0, timeout=10, what="the first sample")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def small_server(pg_server_factory: Callable[..., Any]) -> Iterator[Any]:
    """A Postgres server that refuses a 41st client (plus superuser slots: the tests connect as postgres)."""
    server = pg_server_factory(extra_options=["-c", "max_connections=40", "-c", "superuser_reserved_connections=0"])
    led = Ledger(server.url())
    led.migrate()
    led.close()
    yield server


@pytest.mark.parametrize(
    "options, bound", [({}, 15 + 15), ({"pool_size": 3, "max_overflow": 2}, 5 + 5)], ids=["default", "configured"]
)
async def test_async_gather_of_1000_calls_stays_within_the_pool_bound(
    small_server: Any, options: dict[str, Any], bound: int
) -> None:
    led = Ledger(small_server.url(), engine_options=options)
    runs: dict[int, int] = {}

    async def handler(i: int) -> int:
        runs[i] = runs.get(i, 0) + 1
        await asyncio.sleep(0.005)  # the handler awaits, so every call is in flight at once
        return i

    try:
        with _Peak(small_server) as peak:
            # 1,000 calls on 500 keys: each key is called twice at once (one runs, one waits or replays).
            results = await asyncio.gather(*(led.run(_call(i % 500), handler=handler) for i in range(1000)))
        assert results == [i % 500 for i in range(1000)]
        assert runs == {i: 1 for i in range(500)}
        # The ledger's async pools (the hot path's and SQLAlchemy's: schema check, reports), each bounded,
        # plus one connection of the sync pool for the replay-record writer's thread.
        assert 1 <= peak.peak <= bound + 1, peak.peak
    finally:
        await led.aclose()


def test_sync_threads_stay_within_the_pool_bound(small_server: Any) -> None:
    led = Ledger(small_server.url(), engine_options={"pool_size": 2, "max_overflow": 2})
    runs: dict[int, int] = {}
    lock = threading.Lock()

    def handler(i: int) -> int:
        with lock:
            runs[i] = runs.get(i, 0) + 1
        time.sleep(0.002)
        return i

    try:
        with _Peak(small_server) as peak, concurrent.futures.ThreadPoolExecutor(60) as pool:
            results = list(pool.map(lambda i: led.run(_call(i % 300), handler=handler), range(900)))
        assert results == [i % 300 for i in range(900)]
        assert runs == {i: 1 for i in range(300)}
        assert 1 <= peak.peak <= 4 + 4, peak.peak  # the hot path's pool (replay writer included) + the engine's
    finally:
        led.close()


def _hold_write_lock(led: Ledger, db_url: str) -> Callable[[], None]:
    """Block the next claim of ``_call(1)`` behind a lock held by another connection; returns the release."""
    if db_url.startswith("sqlite"):
        blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
    else:
        conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
        blocker = psycopg.connect(conninfo)  # type: ignore[assignment]
        blocker.execute("LOCK TABLE agent_ledger_effects IN EXCLUSIVE MODE")

    def release() -> None:
        blocker.rollback()
        blocker.close()

    return release


def test_pool_timeout_is_a_storage_error(db_url: str, make_ledger: Callable[..., Ledger]) -> None:
    led = make_ledger(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3})
    led.run(_call(0), handler=lambda i: i)  # tables exist, the engine has checked them
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i

    release = _hold_write_lock(led, db_url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(led.run, _call(1), handler=handler)  # takes the one connection and waits
            _wait_until(lambda: _pool_in_use(led) == 1, timeout=10, what="the first call to hold the connection")
            with pytest.raises(StorageError) as info:
                led.run(_call(2), handler=handler)
            assert "pool_timeout" in str(info.value) and "claim" in str(info.value), str(info.value)
        finally:
            release()
        assert first.result(timeout=30) == 1
    assert led.run(_call(2), handler=handler) == 2  # the pool works once a connection is free
    assert runs == [1, 2]


def _pool_in_use(led: Ledger) -> int:
    return int(led._rt._pool().in_use)


async def test_async_pool_timeout_is_a_storage_error(pg_url: str) -> None:
    led = Ledger(pg_url, auto_migrate=True, engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3})
    runs: list[int] = []

    async def handler(i: int) -> int:
        runs.append(i)
        return i

    try:
        await led.run(_call(0), handler=handler)
        release = _hold_write_lock(led, pg_url)
        try:
            first = asyncio.ensure_future(led.run(_call(1), handler=handler))
            await asyncio.sleep(0.2)
            with pytest.raises(StorageError) as info:
                await led.run(_call(2), handler=handler)
            assert "pool_timeout" in str(info.value), str(info.value)
        finally:
            release()
        assert await first == 1
        assert await led.run(_call(2), handler=handler) == 2
        assert runs == [0, 1, 2]
    finally:
        await led.aclose()


@pytest.mark.parametrize(
    "options", [{"pool_size": "ten"}, {"pool_size": -1}, {"max_overflow": 1.5}, {"pool_timeout": "soon"}]
)
def test_bad_pool_options_are_refused(sqlite_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="engine_options"):
        Ledger(sqlite_url, engine_options=options)


# -- 4. SQLite: the real cause of a failed write ---------------------------------------------------


def test_sqlite_disk_full_reports_the_real_cause(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(f"sqlite:///{path}")
    runs: list[int] = []

    def handler(i: int, pad: str = "") -> str:
        runs.append(i)
        return "x" * 20_000  # bigger than a page: recording it needs new pages

    try:
        led.run(_call(0), handler=handler)
        pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
        # Room for a claim (a page or two), not for the outcome (its result needs five overflow pages).
        _set_max_pages(led, pages + 2)
        with pytest.raises(StorageError) as info:
            led.run(_call(1), handler=handler)
        text = str(info.value)
        assert "full" in text and "cannot rollback" not in text, text
        assert runs == [0, 1]  # the handler ran; its outcome could not be recorded
        # And a claim that does not fit either.
        _set_max_pages(led, sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0])
        for i in range(3, 50):
            with pytest.raises(StorageError) as info:
                led.run(ToolCall(workflow_id="w", tool="t", args={"i": i, "pad": "y" * 3000}), handler=handler)
            assert "full" in str(info.value) and "cannot rollback" not in str(info.value), str(info.value)
        assert set(range(3, 50)) - set(runs), "no claim met the full disk"  # those never ran their handler
        _set_max_pages(led, None)
        # The pool's connections are still usable: nothing was left half-open.
        ran = len(runs)
        assert led.run(_call(2), handler=handler) == "x" * 20_000
        assert runs[ran:] == [2]
    finally:
        led.close()


# -- 5. SQLite URL options --------------------------------------------------------------------------


def test_sqlite_read_only_url_refuses_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a dir").mkdir()
    path = tmp_path / "a dir" / "ledger.db"  # a space: the file: URI form quotes it
    rw = Ledger(f"sqlite:///{path}")
    assert rw.run(_call(1), handler=lambda i: i) == 1
    rw.close()
    size = path.stat().st_size
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i

    ro = Ledger(f"sqlite:///{path}?mode=ro")
    try:
        assert ro.run(_call(1), handler=handler) == 1  # a replay only reads
        with pytest.raises(StorageError, match="readonly"):
            ro.run(_call(2), handler=handler)
        assert runs == []
        assert [r.args["i"] for r in ro.history("w")] == [1]
    finally:
        ro.close()
    assert cli.main(["history", "w", "--url", f"sqlite:///{path}?mode=ro"]) in (0, None)  # reading works
    assert "succeeded" in capsys.readouterr().out
    check = Ledger(f"sqlite:///{path}")
    try:
        assert [r.args["i"] for r in check.history("w")] == [1]  # nothing of call 2 was written
    finally:
        check.close()
    assert path.stat().st_size == size


async def test_sqlite_read_only_url_refuses_async_writes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"

    async def first(i: int) -> int:
        return i

    async def handler(i: int) -> int:
        raise AssertionError("must not run")

    rw = Ledger(f"sqlite:///{path}")
    assert await rw.run(_call(1), handler=first) == 1
    await rw.aclose()

    ro = Ledger(f"sqlite:///{path}?mode=ro")
    try:
        assert await ro.run(_call(1), handler=handler) == 1
        with pytest.raises(StorageError, match="readonly"):
            await ro.run(_call(2), handler=handler)
    finally:
        await ro.aclose()


def test_sqlite_url_timeout_is_honoured(tmp_path: Path) -> None:
    """``?timeout=`` bounds how long a write waits for another writer's lock, on every path."""
    path = tmp_path / "ledger.db"
    led = Ledger(f"sqlite:///{path}?timeout=0.2")
    runs: list[int] = []

    def handler(i: int) -> int:
        runs.append(i)
        return i

    try:
        led.run(_call(0), handler=handler)
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(5.0, blocker.rollback)  # the lock is held for 5 s
        releaser.start()
        try:
            with pytest.raises(StorageError, match="locked"):
                led.run(_call(1), handler=handler)  # gave up after 0.2 s instead of waiting 30 s
            assert runs == [0]
        finally:
            releaser.join()
            blocker.close()
        assert led.run(_call(1), handler=handler) == 1
        assert runs == [0, 1]
    finally:
        led.close()


def test_sqlite_unknown_url_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="colour"):
        Ledger(f"sqlite:///{tmp_path}/x.db?colour=blue")
    assert not (tmp_path / "x.db").exists()
