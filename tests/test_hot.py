"""The hot path's own value conversions agree with the dialect processors the Core path uses."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from agent_ledger import Ledger, ToolCall
from agent_ledger._fast import _bind_processor, _result_processor
from agent_ledger._schema import UTCDateTime, json_type

DIALECT = sqlite.dialect()

aware = st.datetimes(
    min_value=dt.datetime(1, 1, 2),
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [dt.timezone.utc, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]
    ),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@given(aware)
def test_sqlite_datetimes_are_stored_and_read_as_the_dialect_does(value: dt.datetime) -> None:
    t = UTCDateTime()
    ours_bind, theirs_bind = _bind_processor(t, DIALECT), t._cached_bind_processor(DIALECT)
    ours_result, theirs_result = _result_processor(t, DIALECT), t._cached_result_processor(DIALECT, None)
    assert ours_bind is not theirs_bind and ours_result is not theirs_result  # the fast ones are in use
    assert ours_bind is not None and theirs_bind is not None
    assert ours_result is not None and theirs_result is not None
    stored = theirs_bind(value)
    assert ours_bind(value) == stored
    assert ours_result(stored) == theirs_result(stored) == value
    assert ours_result(stored).tzinfo == dt.timezone.utc


def test_sqlite_naive_datetimes_are_refused_like_the_dialect_does() -> None:
    bind = _bind_processor(UTCDateTime(), DIALECT)
    assert bind is not None
    with pytest.raises(ValueError, match="aware datetimes only"):
        bind(dt.datetime(2026, 1, 1))


@given(json_values)
def test_sqlite_json_is_stored_and_read_as_the_dialect_does(value: Any) -> None:
    t = json_type()
    ours_bind, theirs_bind = _bind_processor(t, DIALECT), t._cached_bind_processor(DIALECT)
    ours_result, theirs_result = _result_processor(t, DIALECT), t._cached_result_processor(DIALECT, None)
    assert ours_bind is not None and theirs_bind is not None
    assert ours_result is not None and theirs_result is not None
    stored = theirs_bind(value)
    assert ours_bind(value) == stored
    assert ours_result(stored) == theirs_result(stored) == value
    assert ours_result(None) is theirs_result(None) is None


def test_hot_and_core_paths_read_the_same_row(make_ledger: Any) -> None:
    """A call written by the hot path reads back through the Core path (history) with the same values."""
    ledger: Ledger = make_ledger()
    ran = []

    def charge(amount: int, when: dt.datetime) -> dict[str, Any]:
        ran.append(amount)
        return {"charged": amount, "at": when.isoformat(), "nested": [1.5, None, "é"]}

    when = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    call = ToolCall(workflow_id="wf-hot", tool="charge", args={"amount": 7, "when": when})
    first = ledger.run(call, handler=charge)
    again = ledger.run(call, handler=charge)
    assert ran == [7]
    assert first == again == {"charged": 7, "at": when.isoformat(), "nested": [1.5, None, "é"]}
    [record] = ledger.history("wf-hot")
    assert record.result == first
    assert record.args == {"amount": 7, "when": "2026-03-04T03:06:07.890123Z"}
    assert record.started_at is not None and record.finished_at is not None
    assert record.started_at.tzinfo is not None and record.started_at <= record.finished_at


# -- async lookups never wait behind a writer, and the event loop never waits for a lock -------------

HOLD_LOCK = r"""
import sys
url, mode = sys.argv[1], sys.argv[2]
if url.startswith("sqlite"):
    import sqlite3
    conn = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
    if mode == "exclusive":  # a connection in exclusive locking mode: even WAL readers must wait
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE agent_ledger_effects SET owner = owner WHERE 0")
    if mode == "exclusive":
        conn.execute("SELECT count(*) FROM agent_ledger_effects").fetchone()
else:
    import psycopg
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    conn.execute("LOCK TABLE agent_ledger_effects IN EXCLUSIVE MODE")  # writers wait, plain reads do not
print("locked", flush=True)
sys.stdin.readline()
conn.rollback() if not url.startswith("sqlite") else conn.execute("ROLLBACK")
conn.close()
"""


class _Locker:
    """Another process holding the ledger's table locked until ``release()``."""

    def __init__(self, url: str, mode: str = "write") -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, url, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0


def _ticker(interval: float) -> tuple[Any, list[int]]:
    """A task counting how often the event loop lets it wake every ``interval`` seconds: (task, [count])."""
    import asyncio

    count = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(interval)
            count[0] += 1

    return asyncio.create_task(tick()), count


async def _waiting_off_the_loop(awaitable: Any, what: str) -> Any:
    """Start ``awaitable`` and let it run 0.5 s: it must still be waiting (for the other process's lock)
    while the event loop keeps ticking every 10 ms. Returns its task."""
    import asyncio

    ticker, count = _ticker(0.01)
    task = asyncio.ensure_future(awaitable)
    await asyncio.sleep(0.5)
    ticker.cancel()
    assert not task.done(), f"{what} should be waiting for the other process's lock"
    assert count[0] >= 20, f"the event loop ran only {count[0]} ticks in 0.5 s: something blocked it"
    return task


async def test_async_replays_do_not_wait_for_a_writer_and_claims_wait_off_the_loop(
    db_url: str, make_ledger: Any
) -> None:
    import asyncio

    ledger: Ledger = make_ledger()
    ran: list[str] = []

    async def send(to: str) -> str:
        ran.append(to)
        return f"sent to {to}"

    done = await ledger.arun(ToolCall(workflow_id="wf-lock", tool="send", args={"to": "a"}), handler=send)
    fresh = make_ledger()  # a retry from a fresh process
    locker = _Locker(db_url)
    try:
        # A replay is a plain read: it answers while another process holds the table for writing.
        again = await asyncio.wait_for(
            fresh.arun(ToolCall(workflow_id="wf-lock", tool="send", args={"to": "a"}), handler=send), 5
        )
        assert again == done == "sent to a"
        # A new call must claim, so it waits for the lock, and the event loop keeps running meanwhile.
        new = fresh.arun(ToolCall(workflow_id="wf-lock", tool="send", args={"to": "b"}), handler=send)
        task = await _waiting_off_the_loop(new, "the claim")
    finally:
        locker.release()
    assert await asyncio.wait_for(task, 30) == "sent to b"
    assert ran == ["a", "b"]


async def test_async_sqlite_lookup_that_meets_a_lock_waits_off_the_loop(sqlite_url: str) -> None:
    """A WAL read fails at once only against an exclusive-mode connection: it then waits in the worker
    thread, never on the event loop, and replays once the lock is gone."""
    import asyncio

    writer = Ledger(sqlite_url, auto_migrate=True)
    fresh = Ledger(sqlite_url)
    ran: list[str] = []

    def send(to: str) -> str:
        ran.append(to)
        return f"sent to {to}"

    try:
        await writer.arun(ToolCall(workflow_id="wf-x", tool="send", args={"to": "a"}), handler=send)
        await fresh.arun(ToolCall(workflow_id="wf-x", tool="warm", args={}), handler=lambda: None)  # schema checked
        # Exclusive locking mode needs every other connection closed first (the ledgers reopen theirs).
        await writer.aclose()
        for pool in (fresh._rt._reader(), fresh._rt._pool()):
            pool.close()
        await fresh._rt.aengine.dispose()
        locker = _Locker(sqlite_url, "exclusive")
        try:
            replay = fresh.arun(ToolCall(workflow_id="wf-x", tool="send", args={"to": "a"}), handler=send)
            task = await _waiting_off_the_loop(replay, "the lookup")
        finally:
            locker.release()
        assert await asyncio.wait_for(task, 30) == "sent to a"
        assert ran == ["a"]
    finally:
        await writer.aclose()
        await fresh.aclose()


def test_hot_path_uses_the_engines_json_settings(db_url: str) -> None:
    """``engine_options`` json_serializer / json_deserializer apply to replays (hot path) exactly as to
    ``history()`` (Core path): here floats come back as Decimals on both."""
    import functools
    import json
    from decimal import Decimal

    options = {
        "json_serializer": functools.partial(json.dumps, separators=(",", ":")),
        "json_deserializer": functools.partial(json.loads, parse_float=Decimal),
    }
    writer = Ledger(db_url, auto_migrate=True, engine_options=options)
    fresh = Ledger(db_url, engine_options=options)
    ran: list[float] = []

    def quote(amount: float) -> dict[str, Any]:
        ran.append(amount)
        return {"total": amount * 2, "lines": [0.5]}

    try:
        call = ToolCall(workflow_id="wf-json", tool="quote", args={"amount": 1.25})
        assert writer.run(call, handler=quote) == {"total": 2.5, "lines": [0.5]}
        replayed = fresh.run(call, handler=quote)
        assert ran == [1.25]
        assert replayed == {"total": Decimal("2.5"), "lines": [Decimal("0.5")]}
        assert isinstance(replayed["total"], Decimal)
        [record] = fresh.history("wf-json")
        assert record.result == replayed
        if db_url.startswith("sqlite"):  # the stored text is the configured serializer's (compact)
            import sqlite3

            path = db_url.split("///", 1)[1]
            with sqlite3.connect(path) as conn:
                (text,) = conn.execute(
                    "SELECT result FROM agent_ledger_effects WHERE workflow_id = 'wf-json'"
                ).fetchone()
            assert text == '{"total":2.5,"lines":[0.5]}'
    finally:
        writer.close()
        fresh.close()


async def test_async_replays_let_other_tasks_run(db_url: str, make_ledger: Any) -> None:
    """Each awaited replay suspends at least once (on SQLite the lookup itself runs on the loop), so a
    loop of replays does not starve other tasks or delay their cancellation."""
    import asyncio

    ledger: Ledger = make_ledger()
    ran: list[int] = []

    async def fetch(n: int) -> int:
        ran.append(n)
        return n

    for n in range(20):
        await ledger.arun(ToolCall(workflow_id="wf-coop", tool="fetch", args={"n": n}), handler=fetch)
    fresh = make_ledger()
    await fresh.arun(ToolCall(workflow_id="wf-coop", tool="fetch", args={"n": 0}), handler=fetch)  # warm
    ticker, count = _ticker(0)
    await asyncio.sleep(0)
    start = count[0]
    for n in range(20):
        assert await fresh.arun(ToolCall(workflow_id="wf-coop", tool="fetch", args={"n": n}), handler=fetch) == n
    ticker.cancel()
    ticks = count[0] - start
    assert ran == list(range(20)), "replays ran no handler"
    assert ticks >= 20, f"another task ran only {ticks} times during 20 replays"
