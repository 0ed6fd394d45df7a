"""Waiters on a key another process is running: they see the winner's result soon after its commit and
never run the handler themselves. On Postgres a waiting process is woken by the completion's ``NOTIFY``,
which is sent only when some process waits for that key (``_fast.Listener``); SQLite waiters poll."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import _workers
import psycopg
import pytest
from _workers import read_lines

from agent_ledger import Ledger, ToolCall, compute_key
from agent_ledger._store import WAKE_LOCK_CLASS

ctx = mp.get_context("spawn")
pytestmark = pytest.mark.pgbouncer  # db_url tests also run through PgBouncer (transaction mode: polling)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_waiting_processes_see_the_result_right_after_the_commit(db_url: str, tmp_path: Path, mode: str) -> None:
    """A winner runs a key for two seconds while three other processes call it. Exactly one execution; every
    waiter returns the winner's result within a second of its commit. On Postgres the waiters poll only
    every 10 s here, so only the notification can explain that; on SQLite and through PgBouncer in
    transaction mode (no LISTEN there) they poll every few ms."""
    pg = db_url.startswith("postgresql") and "pgbouncer=transaction" not in db_url
    Ledger(db_url).migrate()
    log, results, go = str(tmp_path / "runs.log"), ctx.Queue(), ctx.Event()
    waiters = [
        ctx.Process(target=_workers.patient_waiter, args=(db_url, "wf-wait", log, pg, mode, go, results))
        for _ in range(3)
    ]
    winner = ctx.Process(target=_workers.slow_winner, args=(db_url, "wf-wait", log, 2.0, results))
    for w in waiters:
        w.start()
    try:
        got = [results.get(timeout=60) for _ in waiters]  # ready: imported, connected
        winner.start()
        assert results.get(timeout=60)[0] == "started"
        go.set()
        got = [results.get(timeout=60) for _ in range(len(waiters) + 1)]
    finally:
        for p in [winner, *waiters]:
            p.join(60)
    committed = [t for kind, t, *_ in got if kind == "committed"]
    waited = [(t, out) for kind, t, out in got if kind == "waited"]
    assert len(committed) == 1 and len(waited) == 3
    assert len(read_lines(log)) == 1, "exactly one execution, by the winner"
    assert all(out == "winner's result" for _, out in waited)
    lags = [t - committed[0] for t, _ in waited]
    assert max(lags) < 1.0, f"waiters returned {lags} s after the winner's commit"


def _notifications(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=0.5)]


def test_a_completion_notifies_only_when_someone_waits(pg_url: str) -> None:
    """Notifying every completion cost ~10% of the throughput: a completion nobody waits for sends no
    ``NOTIFY``; one whose key a process marked (the shared advisory lock a waiter holds) does."""
    led = Ledger(pg_url)
    led.migrate()
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    channel = f"{led._rt.store.tables.effects.name}_done"
    with psycopg.connect(conninfo, autocommit=True) as listen, psycopg.connect(conninfo, autocommit=True) as marker:
        listen.execute(f'LISTEN "{channel}"')
        assert led.run(ToolCall(workflow_id="wf", tool="t", args={"i": 1}), handler=lambda i: i) == 1
        assert _notifications(listen) == [], "nobody waited: no notification"

        ran: list[int] = []

        def handler(i: int) -> int:
            # Someone starts waiting while the call runs: it marks the key as a waiter does.
            marker.execute("SELECT pg_advisory_lock_shared(%s, hashtext(%s))", (WAKE_LOCK_CLASS, key))
            ran.append(i)
            return i

        call = ToolCall(workflow_id="wf", tool="t", args={"i": 2})
        key = compute_key(call.workflow_id, call.tool, dict(call.args))
        assert led.run(call, handler=handler) == 2
        assert _notifications(listen) == [key]
        assert ran == [2]
        # A failure (its audit row written by the same statement) is announced the same way.

        def fails(i: int) -> int:
            marker.execute("SELECT pg_advisory_lock_shared(%s, hashtext(%s))", (WAKE_LOCK_CLASS, key))
            raise ValueError("no")

        call = ToolCall(workflow_id="wf", tool="t", args={"i": 3})
        key = compute_key(call.workflow_id, call.tool, dict(call.args))
        with pytest.raises(ValueError):
            led.run(call, handler=fails)
        assert _notifications(listen) == [key]
        assert [e.kind for e in led.history("wf")[-1].events][-1] == "failed"
    led.close()


def test_waiting_in_process_marks_and_releases(pg_url: str) -> None:
    """A waiting ledger marks the key while it waits and releases the mark once it was announced: no
    advisory lock outlives the wait."""
    import threading

    led, other = Ledger(pg_url, wait=30), Ledger(pg_url)
    led.migrate()
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    release = threading.Event()
    started = threading.Event()

    def slow(i: int) -> str:
        started.set()
        release.wait(30)
        return "done"

    call = ToolCall(workflow_id="wf", tool="slow", args={"i": 1})
    t = threading.Thread(target=lambda: other.run(call, handler=slow))
    t.start()
    assert started.wait(30)
    got: list[str] = []
    w = threading.Thread(target=lambda: got.append(led.run(call, handler=lambda i: "waiter ran")))
    w.start()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        held = 0
        while time.monotonic() < deadline and not held:
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (WAKE_LOCK_CLASS,),
            ).fetchone()[0]
            time.sleep(0.01)
        assert held == 1, "the waiting ledger marks the key"
        release.set()
        t.join(30)
        w.join(30)
        assert got == ["done"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and held:
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (WAKE_LOCK_CLASS,),
            ).fetchone()[0]
            time.sleep(0.01)
        assert held == 0, "the mark is released once the key was announced"
    led.close()
    other.close()


def test_a_notification_wakes_its_waiter_at_once_and_unmarks_the_key(pg_url: str) -> None:
    """The listener thread listens in ticks (it looks at mark requests in between): a notification must
    wake its waiters as it arrives, not when the tick ends, and the key must be unmarked at once, so that
    a waiter between two sleeps does not then sleep the long marked pause on a key already announced.
    With a 3 s tick, both happen well within the tick."""
    import threading

    from agent_ledger._fast import Listener
    from agent_ledger._flow import Sleep
    from agent_ledger._store import notify_channel

    led = Ledger(pg_url)
    led.migrate()
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    listener = Listener(conninfo, notify_channel(led._rt.store.tables))
    listener.TICK = 3.0
    woken = threading.Event()
    try:
        listener.watch("k-tick", woken.set)
        deadline = time.monotonic() + 30
        while "k-tick" not in listener._marked:  # the thread takes the mark after its first, short wait
            assert time.monotonic() < deadline, "the key was never marked"
            time.sleep(0.01)
        assert listener.pause(Sleep(0.001, "k-tick", 10.0)) == Listener.MARKED_POLL
        with psycopg.connect(conninfo, autocommit=True) as conn:
            sent = time.monotonic()
            conn.execute("SELECT pg_notify(%s, %s)", (listener.channel, "k-tick"))
        assert woken.wait(2.0), "the waiter was not woken before the listener's tick ended"
        assert time.monotonic() - sent < 2.0
        assert listener.pause(Sleep(0.001, "k-tick", 10.0)) == 0.001, "the announced key is still marked"
    finally:
        listener.unwatch("k-tick", woken.set)
        listener.close()
        led.close()
