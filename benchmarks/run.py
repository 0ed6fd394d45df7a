"""agent_ledger's benchmark: per-call overhead against a raw-driver floor measured in the same run.

    python benchmarks/run.py                # starts its own throwaway Postgres (like the tests)
    python benchmarks/run.py --pg-url postgresql+psycopg://user@host/db   # or use yours
    python benchmarks/run.py --pgbouncer    # the Postgres lines through a PgBouncer (transaction pooling)

For each path (a new call and a replay; sync and async; SQLite and Postgres) it measures p50 and p99
of the time per call and, in the same run, the floor: the minimum SQL for the same work on the raw
driver (psycopg autocommit ``INSERT ... ON CONFLICT ... RETURNING`` + ``UPDATE`` for a new call, one
``SELECT`` by key for a replay; the sqlite3 equivalent with ``BEGIN IMMEDIATE``). It prints each
ratio, the throughput with 1, 2, 4 and 8 processes on distinct keys, and how long waiters on one key
take to see the winner's result after it commits. Replays are measured the way they happen: keys
created by one ``Ledger`` are replayed through a second instance, as a retry from a fresh process
would. One more line compares the ledger with itself: a new call on Postgres with one declared limit
against the same call without limits (target 1.3x; the limit's charge rides in the claim's statement,
so there is no extra round trip). Results go to ``--out`` (default ``docs/performance``):
``results.json``, ``results.md`` and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # for the throwaway Postgres server the tests use

import psycopg  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from agent_ledger import Ledger, ToolCall, _keys  # noqa: E402

TARGETS = {"new": 1.5, "replay": 2.0, "limit": 1.3}

BOUNCED = "AGENT_LEDGER_BENCH_PGBOUNCER"
"""Set (to 1) by ``--pgbouncer`` in this process's environment, so spawned workers see it too."""


def pg_options() -> dict[str, Any]:
    """Keyword arguments for the floor's raw ``psycopg.connect``: behind PgBouncer in transaction pooling it
    cannot prepare statements either (``prepare_threshold=None``, as the ledger's ``?pgbouncer=transaction``)."""
    return {"prepare_threshold": None} if os.environ.get(BOUNCED) else {}


"""Ratio targets per path (p50 against the floor); overridden per path by ``PATH_TARGETS``."""
PATH_TARGETS = {
    "postgres sync replay": 1.5,
    "postgres async replay": 1.5,
    "sqlite sync replay": 2.5,  # against the floor plus the key computation every ledger must do
}
THROUGHPUT_TARGET = 0.8
"""The ledger's throughput against the raw driver's at the same concurrency."""
WAITER_TARGET_MS = 20.0
PRUNE_P99_TARGET = 2.0
SECTIONS = ("overhead", "throughput", "cost", "storm", "waiters", "prune", "rss", "upstream")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[int], Any], n: int, base: int) -> list[float]:
    out = []
    for i in range(base, base + n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def atimed(fn: Callable[[int], Awaitable[Any]], n: int, base: int) -> list[float]:
    out = []
    for i in range(base, base + n):
        t = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


# -- floors: the raw driver doing the minimum SQL -------------------------------------------------

CLAIM = (
    "INSERT INTO {t} (key, workflow_id, tool, status, attempt, payload_hash, args, owner, lease_expires_at, "
    "created_at, started_at) VALUES ({p}) ON CONFLICT (key, workflow_id) DO NOTHING RETURNING attempt"
)
COMPLETE = (
    "UPDATE {t} SET status = 'succeeded', result = {r}, result_replayable = true, lease_expires_at = NULL, "
    "finished_at = {n} WHERE key = {k} AND workflow_id = 'floor' AND owner = {o} AND attempt = 1 "
    "AND status = 'running'"
)
SELECT = (
    "SELECT status, attempt, payload_hash, result, result_replayable, error FROM {t} "
    "WHERE key = {k} AND workflow_id = 'floor'"
)
"""The honest replay floor: only the columns a replay needs (status, attempt, payload hash, result, error
flags), not ``SELECT *``, which would make the floor decode arguments and timestamps a replay never reads."""


def floor_sql(table: str, mark: str) -> tuple[str, str, str]:
    """The floor's claim, completion and lookup, with the driver's placeholder (``%s`` or ``?``)."""
    complete = COMPLETE.format(t=table, r=mark, n=mark, k=mark, o=mark)
    if mark == "?":
        complete = complete.replace("= true", "= 1")  # SQLite booleans are integers
    return CLAIM.format(t=table, p=", ".join([mark] * 11)), complete, SELECT.format(t=table, k=mark)


FLOOR_HASH = "v1:" + "0" * 64
"""The payload hash of every floor row."""


def claim_params(key: str, args: Any, lease_until: Any, now: Any) -> tuple[Any, ...]:
    """The floor's claim row, with the arguments and times already in the driver's form."""
    return (key, "floor", "bench", "running", 1, FLOOR_HASH, args, "floor-owner", lease_until, now, now)


def floor_conninfo(pg_url: str) -> str:
    """The floor's libpq URL: without ``?pgbouncer=``, which only the ledger understands."""
    url = make_url(pg_url).difference_update_query(["pgbouncer"]).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def pg_params(key: str) -> tuple[Any, ...]:
    now = datetime.now(timezone.utc)
    return claim_params(key, Jsonb({"i": key}), now + timedelta(seconds=30), now)


def sqlite_now() -> str:
    """Now, as SQLite stores the ledger's datetimes."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


Pair = tuple[Callable[[int], Any], Callable[[int], Any], Callable[[], Any]]


def floor_pg_sync(conninfo: str, table: str, run: str | None = None) -> Pair:
    """The Postgres floor (sync); its keys are ``floor-<run>-<i>``."""
    run = run or uuid.uuid4().hex[:8]
    claim, complete, select = floor_sql(table, "%s")
    conn = psycopg.connect(conninfo, autocommit=True, **pg_options())

    def new(i: int) -> None:
        key = f"floor-{run}-{i}"
        conn.execute(claim, pg_params(key)).fetchone()
        conn.execute(complete, (Jsonb({"ok": i}), datetime.now(timezone.utc), key, "floor-owner"))

    def replay(i: int) -> None:
        conn.execute(select, (f"floor-{run}-{i}",)).fetchone()

    return new, replay, conn.close


async def floor_pg_async(conninfo: str, table: str) -> Pair:
    run = uuid.uuid4().hex[:8]
    claim, complete, select = floor_sql(table, "%s")
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **pg_options())

    async def new(i: int) -> None:
        key = f"afloor-{run}-{i}"
        await (await conn.execute(claim, pg_params(key))).fetchone()
        await conn.execute(complete, (Jsonb({"ok": i}), datetime.now(timezone.utc), key, "floor-owner"))

    async def replay(i: int) -> None:
        await (await conn.execute(select, (f"afloor-{run}-{i}",))).fetchone()

    return new, replay, conn.close


def compute_key(i: int) -> str:
    """What every ledger does before its lookup: build the call, derive its key and payload hash."""
    call = ToolCall(workflow_id="wf", tool="bench", args={"i": i})
    data = _keys.canonical(_keys.normalise(dict(call.args)))
    _keys.payload_from_canonical(call.tool, data)
    return _keys.key_from_canonical(call.workflow_id, call.tool, data)


def floor_sqlite(path: str, table: str, with_key: bool = False, run: str | None = None) -> Pair:
    """The SQLite floor; ``with_key``: its replay first computes the call's key (the in-process read
    alone costs less than hashing the key, so that is the floor a ledger can be held to). Its keys are
    ``floor-<run>-<i>``."""
    run = run or uuid.uuid4().hex[:8]
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    claim, complete, select = floor_sql(table, "?")

    def new(i: int) -> None:
        key = f"floor-{run}-{i}"
        now = sqlite_now()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            claim,
            claim_params(key, json.dumps({"i": key}), now, now),
        ).fetchone()
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(complete, (json.dumps({"ok": i}), now, key, "floor-owner"))
        conn.execute("COMMIT")

    def replay(i: int) -> None:
        if with_key:
            compute_key(i)
        conn.execute(select, (f"floor-{run}-{i}",)).fetchone()

    return new, replay, conn.close


EVENT_COLUMNS = "key, workflow_id, tool, kind, attempt, owner, at, detail"
AUDIT_BATCH = 500
"""The minimal ledger writes its replay records every this many replays (agent_ledger: every 0.5 s)."""


def _minimal_ledger(
    run: str,
    new: Callable[[int], Any],
    close: Callable[[], Any],
    read: Callable[[str], Any],
    write: Callable[[list[tuple[Any, ...]]], None],
    now: Callable[[], Any],
    done: Callable[[], Any],
) -> Pair:
    """The minimal ledger's replay on a floor's keys (``floor-<run>-<i>``, written by its ``new``): the
    key, ``read`` (the narrow row, its result decoded), the check, and an audit row, handed to ``write``
    every ``AUDIT_BATCH`` replays; ``done`` closes the driver connection ``read`` and ``write`` use."""
    pending: list[tuple[Any, ...]] = []

    def replay(i: int) -> None:
        compute_key(i)  # (the floor's rows carry a fixed payload hash: the check below compares with it)
        key = f"floor-{run}-{i}"
        row = read(key)
        if row is None or row[0] != "succeeded" or row[2] != FLOOR_HASH:
            raise AssertionError(f"the minimal ledger found no success for {key}")
        # The detail as JSON text (on Postgres COPY hands it to the jsonb input function, cheaper than a
        # Jsonb dumper).
        pending.append((key, "floor", "bench", "replayed", row[1], "minimal", now(), "{}"))
        if len(pending) >= AUDIT_BATCH:
            write(pending)
            pending.clear()

    def close_all() -> None:
        if pending:
            write(pending)
        done()
        close()

    return new, replay, close_all


def minimal_replay_pg(conninfo: str, effects: str, events: str) -> Pair:
    """The least a replay can do and keep the product's promises, written straight on psycopg: compute
    the key and payload hash, read the narrow row, check it is a success of the same payload, return the
    decoded result, and leave an audit row (buffered, written by ``COPY`` every ``AUDIT_BATCH``
    replays). Not a target: the reference that says how much of a replay's cost is the promise itself
    and how much is agent_ledger's own code (flow, decision core, pool, typed operations, telemetry)."""
    run = uuid.uuid4().hex[:8]
    new, _, close = floor_pg_sync(conninfo, effects, run)  # writes the keys, as the floor does
    conn = psycopg.connect(conninfo, autocommit=True, **pg_options())
    select = SELECT.format(t=effects, k="%s")
    copy_sql = f"COPY {events} ({EVENT_COLUMNS}) FROM STDIN"

    def write(rows: list[tuple[Any, ...]]) -> None:
        with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            for rec in rows:
                copy.write_row(rec)

    def read(key: str) -> Any:
        return conn.execute(select, (key,)).fetchone()  # psycopg decodes the jsonb result

    return _minimal_ledger(run, new, close, read, write, lambda: datetime.now(timezone.utc), conn.close)


def minimal_replay_sqlite(path: str, effects: str, events: str) -> Pair:
    """``minimal_replay_pg`` on sqlite3: the key, the narrow read, the check, and an audit row, written
    by one ``executemany`` in a ``BEGIN IMMEDIATE`` transaction every ``AUDIT_BATCH`` replays."""
    run = uuid.uuid4().hex[:8]
    new, _, close = floor_sqlite(path, effects, run=run)  # writes the keys, as the floor does
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=FULL")
    select = SELECT.format(t=effects, k="?")
    insert = f"INSERT INTO {events} ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

    def write(rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, rows)
        conn.execute("COMMIT")

    def read(key: str) -> Any:
        row = conn.execute(select, (key,)).fetchone()
        if row is not None:
            json.loads(row[3])  # the result, decoded as a replay returns it
        return row

    return _minimal_ledger(run, new, close, read, write, sqlite_now, conn.close)


async def floor_sqlite_async(path: str, table: str) -> Pair:
    import aiosqlite

    run = uuid.uuid4().hex[:8]
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=30)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=FULL")
    claim, complete, select = floor_sql(table, "?")

    async def new(i: int) -> None:
        key = f"afloor-{run}-{i}"
        now = sqlite_now()
        await conn.execute("BEGIN IMMEDIATE")
        cur = await conn.execute(
            claim,
            claim_params(key, json.dumps({"i": key}), now, now),
        )
        await cur.fetchone()
        await conn.execute("COMMIT")
        await conn.execute("BEGIN IMMEDIATE")
        await conn.execute(complete, (json.dumps({"ok": i}), now, key, "floor-owner"))
        await conn.execute("COMMIT")

    async def replay(i: int) -> None:
        cur = await conn.execute(select, (f"afloor-{run}-{i}",))
        await cur.fetchone()

    return new, replay, conn.close


# -- the ledger ----------------------------------------------------------------------------------


def noop(i: int) -> dict[str, int]:
    return {"ok": i}


async def anoop(i: int) -> dict[str, int]:
    return {"ok": i}


def ledger_sync(url: str) -> Pair:
    wf = "bench-" + uuid.uuid4().hex[:8]
    writer = Ledger(url, auto_migrate=True)
    reader = Ledger(url)  # a retry comes from a fresh process: a second instance, no warm state

    def new(i: int) -> None:
        writer.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)

    def replay(i: int) -> None:
        reader.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)

    def close() -> None:
        writer.close()
        reader.close()

    return new, replay, close


def ledger_async(url: str) -> Pair:
    wf = "abench-" + uuid.uuid4().hex[:8]
    writer = Ledger(url, auto_migrate=True)
    reader = Ledger(url)

    async def new(i: int) -> None:
        await writer.arun(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=anoop)

    async def replay(i: int) -> None:
        await reader.arun(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=anoop)

    async def close() -> None:
        await writer.aclose()
        await reader.aclose()

    return new, replay, close


def ledger_limited(url: str) -> Pair:
    """New calls on a ledger with one limit (a per-workflow call cap, never reached): each claim also
    consumes the budget, in the same statement on Postgres."""
    from agent_ledger import Limit  # here: the rest of this file also runs on versions without limits

    wf = "lbench-" + uuid.uuid4().hex[:8]
    writer = Ledger(url, auto_migrate=True, limits=[Limit(max=10**12, name="bench calls")])

    def new(i: int) -> None:
        writer.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)

    def close() -> None:
        writer.close()

    return new, new, close


def compare_new(base: Pair, ours: Pair, n: int, warm: int, rounds: int) -> dict[str, list[float]]:
    """New calls only, alternating blocks of ``base`` (the floor of this comparison) and ``ours``."""
    out: dict[str, list[float]] = {"floor_new": [], "new": [], "ratio_new": []}
    block = max(1, n // rounds)
    for fn in (base[0], ours[0]):
        for i in range(warm):
            fn(100_000_000 + i)
    for r in range(rounds):
        f, o = timed(base[0], block, r * block), timed(ours[0], block, r * block)
        out["floor_new"] += f
        out["new"] += o
        out["ratio_new"].append(pct(o, 0.5) / pct(f, 0.5))
    base[2]()
    ours[2]()
    return out


def compare(
    floor: Pair, ours: Pair, n: int, warm: int, rounds: int, minimal: Pair | None = None
) -> dict[str, list[float]]:
    """Alternate blocks of floor and ledger calls so both see the same machine conditions. With
    ``minimal`` (a minimal ledger's replay), its replays are timed in the same rounds too."""
    out: dict[str, list[float]] = {"floor_new": [], "new": [], "floor_replay": [], "replay": []}
    block = max(1, n // rounds)
    extra = () if minimal is None else (minimal[0], minimal[1])
    for fn in (floor[0], ours[0], *extra[:1], floor[1], ours[1], *extra[1:]):
        for i in range(warm):
            fn(100_000_000 + i)
    out["ratio_new"], out["ratio_replay"] = [], []
    for r in range(rounds):
        base = r * block
        f, o = timed(floor[0], block, base), timed(ours[0], block, base)
        if minimal is not None:
            timed(minimal[0], block, base)  # its keys, for its replays below (not a reported figure)
        out["floor_new"] += f
        out["new"] += o
        out["ratio_new"].append(pct(o, 0.5) / pct(f, 0.5))
    if minimal is not None:
        out["minimal_replay"], out["ratio_minimal"], out["ratio_minimal_floor"] = [], [], []
    # The process's CPU per replay (every thread: agent_ledger's replay-record writer included), ms: the
    # part of a replay's time that is the client's work, the rest being the wait for the server.
    out["cpu_floor_replay"], out["cpu_replay"], out["cpu_minimal_replay"] = [], [], []

    def cpu_timed(fn: Callable[[int], Any], base: int, into: str) -> list[float]:
        started = time.process_time()
        got = timed(fn, block, base)
        out[into].append((time.process_time() - started) / block * 1000)
        return got

    for r in range(rounds):
        base = r * block
        f = cpu_timed(floor[1], base, "cpu_floor_replay")
        o = cpu_timed(ours[1], base, "cpu_replay")
        out["floor_replay"] += f
        out["replay"] += o
        out["ratio_replay"].append(pct(o, 0.5) / pct(f, 0.5))
        if minimal is not None:
            m = cpu_timed(minimal[1], base, "cpu_minimal_replay")
            out["minimal_replay"] += m
            out["ratio_minimal"].append(pct(o, 0.5) / pct(m, 0.5))
            out["ratio_minimal_floor"].append(pct(m, 0.5) / pct(f, 0.5))
    if minimal is not None:
        minimal[2]()
    floor[2]()
    ours[2]()
    return out


async def acompare(floor: Pair, ours: Pair, n: int, warm: int, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"floor_new": [], "new": [], "floor_replay": [], "replay": []}
    block = max(1, n // rounds)
    for fn in (floor[0], ours[0], floor[1], ours[1]):
        for i in range(warm):
            await fn(100_000_000 + i)
    out["ratio_new"], out["ratio_replay"] = [], []
    for r in range(rounds):
        base = r * block
        f, o = await atimed(floor[0], block, base), await atimed(ours[0], block, base)
        out["floor_new"] += f
        out["new"] += o
        out["ratio_new"].append(pct(o, 0.5) / pct(f, 0.5))
    for r in range(rounds):
        base = r * block
        f, o = await atimed(floor[1], block, base), await atimed(ours[1], block, base)
        out["floor_replay"] += f
        out["replay"] += o
        out["ratio_replay"].append(pct(o, 0.5) / pct(f, 0.5))
    await floor[2]()
    await ours[2]()
    return out


def key_cost(n: int) -> list[float]:
    """Per call: build the ``ToolCall`` and derive its key and payload hash, nothing else. This is work
    any ledger must do before its lookup, so it bounds how close a replay can come to a bare SELECT."""
    timed(compute_key, 300, 0)
    return timed(compute_key, n, 0)


# -- throughput: many workers on distinct keys, against the raw driver at the same concurrency ----


def _floor_new_sync(conn: Any, claim: str, complete: str, key: str, i: int) -> None:
    conn.execute(claim, pg_params(key)).fetchone()
    conn.execute(complete, (Jsonb({"ok": i}), datetime.now(timezone.utc), key, "floor-owner"))


def _tp_worker(url: str, conninfo: str, table: str, phases: list[str], calls: int, barrier: Any, done: Any) -> None:
    """One worker process: for each phase, wait at the barrier, then make ``calls`` new calls on distinct
    keys, either through the ledger or as the raw-driver floor, and report when done."""
    run = uuid.uuid4().hex
    claim, complete, _ = floor_sql(table, "%s")
    ledger = Ledger(url)
    floor = psycopg.connect(conninfo, autocommit=True, **pg_options())
    for i in range(20):  # warm both: connections open, statements prepared, claim-first mode learnt
        ledger.run(ToolCall(workflow_id=f"tpw-{run}", tool="bench", args={"i": i}), handler=noop)
        _floor_new_sync(floor, claim, complete, f"tpw-{run}-{i}", i)
    for n, kind in enumerate(phases):
        barrier.wait()
        if kind == "floor":
            for i in range(calls):
                _floor_new_sync(floor, claim, complete, f"tp-{run}-{n}-{i}", i)
        else:
            wf = f"tp-{run}-{n}"
            for i in range(calls):
                ledger.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)
        done.put(kind)
    floor.close()
    ledger.close()


class WaitSampler:
    """Samples what the database's active sessions wait on (``pg_stat_activity``) every few ms while a
    phase runs: a shared hot row or lock that serialised workers would show up as ``Lock`` waits
    (``tuple``, ``transactionid``) or a dominant ``LWLock``; commits waiting for the WAL flush show as
    ``IO``/``WALSync`` or ``LWLock``/``WALWrite``."""

    def __init__(self, conninfo: str) -> None:
        import collections
        import threading

        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._conninfo = conninfo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, **pg_options()) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT coalesce(wait_event_type, 'CPU'), coalesce(wait_event, 'running') FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()"
                ).fetchall()
                self.samples += 1
                for kind, name in rows:
                    self.counts[f"{kind}:{name}"] += 1
                self._stop.wait(0.005)

    def top(self, n: int = 4) -> dict[str, float]:
        """The most frequent waits, as active sessions per sample."""
        return {k: round(v / max(1, self.samples), 2) for k, v in self.counts.most_common(n)}


PHASES = ["floor", "ledger", "ledger", "floor"]
"""Alternating phases (ABBA), so a drift in machine load affects floor and ledger alike."""


def throughput_processes(url: str, conninfo: str, table: str, procs: int, total: int) -> dict[str, Any]:
    """Calls per second with ``procs`` worker processes, ledger and floor, in the same run (and what the
    database's sessions waited on during the ledger's phases)."""
    ctx = mp.get_context("spawn")
    calls = max(10, total // procs)
    barrier, done = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [
        ctx.Process(target=_tp_worker, args=(url, conninfo, table, PHASES, calls, barrier, done)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    spent: dict[str, float] = {"floor": 0.0, "ledger": 0.0}
    sampler = WaitSampler(conninfo)
    try:
        for n, kind in enumerate(PHASES):
            barrier.wait(timeout=600)
            t = time.perf_counter()
            if n == 1:
                sampler.__enter__()
            for _ in workers:
                done.get(timeout=600)
            if n == 1:
                sampler.__exit__()
            spent[kind] += time.perf_counter() - t
    finally:
        for w in workers:
            w.join(60)
    made = PHASES.count("floor") * procs * calls
    return {**{k: made / v for k, v in spent.items()}, "waits": sampler.top()}


async def throughput_tasks(url: str, conninfo: str, table: str, tasks: int, total: int) -> dict[str, float]:
    """Calls per second with ``tasks`` asyncio tasks in one process: ``arun`` against the floor's async
    connections (one per task; the ledger's pool is sized to ``tasks`` as well)."""
    run = uuid.uuid4().hex
    calls = max(10, total // tasks)
    claim, complete, _ = floor_sql(table, "%s")
    ledger = Ledger(url, engine_options={"pool_size": tasks, "max_overflow": 0})
    conns = [await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **pg_options()) for _ in range(tasks)]

    async def floor_task(conn: Any, tag: str) -> None:
        for i in range(calls):
            key = f"atp-{run}-{tag}-{i}"
            await (await conn.execute(claim, pg_params(key))).fetchone()
            await conn.execute(complete, (Jsonb({"ok": i}), datetime.now(timezone.utc), key, "floor-owner"))

    async def ledger_task(tag: str) -> None:
        for i in range(calls):
            await ledger.arun(ToolCall(workflow_id=f"atp-{run}-{tag}", tool="bench", args={"i": i}), handler=anoop)

    await asyncio.gather(*(floor_task(c, f"w{n}") for n, c in enumerate(conns)))
    await asyncio.gather(*(ledger_task(f"w{n}") for n in range(tasks)))  # opens the pool's connections
    spent: dict[str, float] = {"floor": 0.0, "ledger": 0.0}
    for p, kind in enumerate(PHASES):
        t = time.perf_counter()
        if kind == "floor":
            await asyncio.gather(*(floor_task(c, f"{p}-{n}") for n, c in enumerate(conns)))
        else:
            await asyncio.gather(*(ledger_task(f"{p}-{n}") for n in range(tasks)))
        spent[kind] += time.perf_counter() - t
    for c in conns:
        await c.close()
    await ledger.aclose()
    made = PHASES.count("floor") * tasks * calls
    return {k: made / v for k, v in spent.items()}


# -- the database's cost per new call ----------------------------------------------------------


def wal_lsn(conn: Any) -> int:
    got = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(got[0])


class StatementCounter:
    """Counts statements sent by psycopg connections of this process (each is one round trip: the hot
    path runs single autocommit statements, and the floor does too)."""

    def __init__(self) -> None:
        self.count = 0
        self._orig: Any = None

    def __enter__(self) -> StatementCounter:
        orig = self._orig = psycopg.Connection.execute
        me = self

        def execute(conn: Any, *a: Any, **k: Any) -> Any:
            me.count += 1
            return orig(conn, *a, **k)

        psycopg.Connection.execute = execute  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        psycopg.Connection.execute = self._orig  # type: ignore[method-assign]


def db_cost(url: str, conninfo: str, table: str, calls: int) -> dict[str, Any]:
    """Round trips and WAL bytes per new call: the ledger, the floor, and the floor plus one audit row
    (an ``INSERT`` into the events table), each measured three times in alternation (median)."""
    run = uuid.uuid4().hex
    claim, complete, _ = floor_sql(table, "%s")
    events = table.replace("effects", "events")
    audit = (
        f"INSERT INTO {events} (key, workflow_id, tool, kind, attempt, owner, at, detail) "
        "VALUES (%s, 'floor', 'bench', 'succeeded', 1, 'floor-owner', %s, NULL)"
    )
    meter = psycopg.connect(conninfo, autocommit=True, **pg_options())
    floor = psycopg.connect(conninfo, autocommit=True, **pg_options())
    ledger = Ledger(url)
    for i in range(50):
        ledger.run(ToolCall(workflow_id=f"costw-{run}", tool="bench", args={"i": i}), handler=noop)

    def floor_calls(tag: str, with_audit: bool) -> None:
        for i in range(calls):
            key = f"cost-{run}-{tag}-{i}"
            _floor_new_sync(floor, claim, complete, key, i)
            if with_audit:
                floor.execute(audit, (key, datetime.now(timezone.utc)))

    def ledger_calls(tag: str) -> None:
        for i in range(calls):
            ledger.run(ToolCall(workflow_id=f"cost-{run}-{tag}", tool="bench", args={"i": i}), handler=noop)

    wal: dict[str, list[float]] = {"floor": [], "floor + audit row": [], "agent_ledger": []}
    trips: dict[str, float] = {}
    for r in range(3):
        for name, fn in (
            ("floor", lambda t: floor_calls(t, False)),
            ("floor + audit row", lambda t: floor_calls(t, True)),
            ("agent_ledger", ledger_calls),
        ):
            with StatementCounter() as counter:
                before = wal_lsn(meter)
                fn(f"{r}-{name}")
                after = wal_lsn(meter)
            trips[name] = (counter.count - 2) / calls  # the two LSN reads are not the calls'
            wal[name].append((after - before) / calls)
    ledger.close()
    floor.close()
    meter.close()
    return {
        name: {"round_trips": round(trips[name], 2), "wal_bytes": round(statistics.median(v))}
        for name, v in wal.items()
    }


# -- same-key storm ------------------------------------------------------------------------------


def _storm_worker(url: str, wf: str, keys: int, seed: int, barrier: Any, executions: Any, done: Any) -> None:
    import random

    ledger = Ledger(url, wait=120)
    ledger.run(ToolCall(workflow_id=f"{wf}-warm-{seed}", tool="warm", args={}), handler=lambda: 0)
    order = list(range(keys))
    random.Random(seed).shuffle(order)

    def handler(k: int) -> int:
        with executions.get_lock():
            executions.value += 1
        return k * 2

    barrier.wait()
    wrong = 0
    for k in order:
        if ledger.run(ToolCall(workflow_id=wf, tool="storm", args={"k": k}), handler=handler) != k * 2:
            wrong += 1
    done.put(wrong)
    ledger.close()


def storm(url: str, procs: int, keys: int) -> dict[str, Any]:
    """``procs`` processes each call the same ``keys`` keys (in their own random order): every key must
    run exactly once, and every call must see its result."""
    ctx = mp.get_context("spawn")
    wf = "storm-" + uuid.uuid4().hex
    barrier, done, executions = ctx.Barrier(procs + 1), ctx.Queue(), ctx.Value("i", 0)
    workers = [
        ctx.Process(target=_storm_worker, args=(url, wf, keys, n, barrier, executions, done)) for n in range(procs)
    ]
    for w in workers:
        w.start()
    barrier.wait(timeout=600)
    t = time.perf_counter()
    wrong = sum(done.get(timeout=600) for _ in workers)
    elapsed = time.perf_counter() - t
    for w in workers:
        w.join(60)
    return {
        "processes": procs,
        "keys": keys,
        "executions": executions.value,
        "wrong_results": wrong,
        "calls_per_s": round(procs * keys / elapsed, 1),
    }


# -- waiters -------------------------------------------------------------------------------------


def _wait_party(url: str, role: str, run: str, rounds: int, work: float, barrier: Any, out: Any) -> None:
    """A long-lived winner or waiter: each round, one new key; the winner runs it (its handler takes
    ``work`` seconds), the waiters arrive just after and wait for its result."""
    ledger = Ledger(url, wait=60)
    ledger.run(ToolCall(workflow_id=f"{run}-warm-{os.getpid()}", tool="warm", args={}), handler=lambda: 0)

    def slow() -> str:
        time.sleep(work)
        return "winner"

    def mine() -> str:
        out.put(("executed", role))
        return "waiter ran"

    for r in range(rounds):
        barrier.wait()
        if role == "waiter":
            time.sleep(0.02)  # the winner claims first
        got = ledger.run(
            ToolCall(workflow_id=f"{run}-{r}", tool="slow", args={}), handler=slow if role == "winner" else mine
        )
        out.put((role, time.time(), got))  # run() returns after the completion committed
    barrier.wait()  # nobody exits while a waiter of the last round still waits: exits cost CPU too
    ledger.close()


def waiter_latency(url: str, rounds: int, waiters: int = 8, work: float = 0.1) -> dict[str, Any]:
    """How long after the winner's commit each of ``waiters`` processes on the same key sees its result."""
    ctx = mp.get_context("spawn")
    run = "wait-" + uuid.uuid4().hex
    barrier, out = ctx.Barrier(waiters + 2), ctx.Queue()
    roles = ["winner"] + ["waiter"] * waiters
    procs = [ctx.Process(target=_wait_party, args=(url, role, run, rounds, work, barrier, out)) for role in roles]
    for p in procs:
        p.start()
    lags: list[float] = []
    executed = 0
    try:
        for _ in range(rounds):
            barrier.wait(timeout=120)
            got: list[tuple[Any, ...]] = []
            while len(got) < len(procs):
                item = out.get(timeout=120)
                if item[0] == "executed":
                    executed += 1
                else:
                    got.append(item)
            committed = next(t for who, t, _ in got if who == "winner")
            lags += [max(0.0, (t - committed) * 1000) for who, t, v in got if who == "waiter" and v == "winner"]
        barrier.wait(timeout=120)  # then all of them close and exit
    finally:
        for p in procs:
            p.join(60)
    return {
        "waiters_per_key": waiters,
        "samples": len(lags),
        "expected_samples": rounds * waiters,
        "waiter_executions": executed,
        "p50_ms": round(pct(lags, 0.5), 2) if lags else None,
        "p90_ms": round(pct(lags, 0.9), 2) if lags else None,
        "p99_ms": round(pct(lags, 0.99), 2) if lags else None,
        "max_ms": round(max(lags), 2) if lags else None,
    }


# -- retention at scale --------------------------------------------------------------------------


def bulk_load(conninfo: str, prefix: str, rows: int) -> float:
    """``rows`` settled effects past their retention, each with one audit event, loaded with
    ``INSERT ... SELECT generate_series`` (not through the ledger: quick). Returns the seconds taken."""
    t = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True, **pg_options()) as conn:
        step = 200_000
        for lo in range(0, rows, step):
            hi = min(rows, lo + step) - 1
            conn.execute(
                f"INSERT INTO {prefix}effects (key, workflow_id, tool, status, attempt, payload_hash, args, result, "
                "result_replayable, owner, created_at, started_at, finished_at, retain_until) "
                "SELECT 'old-' || i, 'old-wf-' || (i / 100), 'old', 'succeeded', 1, 'v1:' || md5(i::text), "
                "'{\"i\": 1}'::jsonb, '{\"ok\": true}'::jsonb, true, 'loader', "
                "now() - interval '40 days', now() - interval '40 days', "
                "now() - interval '40 days' + i * interval '1 ms', "
                "now() - interval '10 days' + i * interval '1 ms' "
                "FROM generate_series(%s::int, %s::int) AS i",
                (lo, hi),
            )
            conn.execute(
                f"INSERT INTO {prefix}events (key, workflow_id, tool, kind, attempt, owner, at, detail) "
                "SELECT 'old-' || i, 'old-wf-' || (i / 100), 'old', 'succeeded', 1, 'loader', "
                "now() - interval '40 days', NULL FROM generate_series(%s::int, %s::int) AS i",
                (lo, hi),
            )
        conn.execute(f"VACUUM ANALYZE {prefix}effects")
        conn.execute(f"VACUUM ANALYZE {prefix}events")
    return time.perf_counter() - t


def _live_caller(url: str, run: str, start: Any, stop: Any, out: Any) -> None:
    """Live new calls, one after another, until told to stop; reports each call's time in ms."""
    ledger = Ledger(url)
    for i in range(20):
        ledger.run(ToolCall(workflow_id=f"{run}-warm", tool="live", args={"i": i}), handler=noop)
    out.put("ready")
    for phase in ("alone", "during prune"):
        start.wait()
        start.clear()
        times: list[float] = []
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            ledger.run(ToolCall(workflow_id=f"{run}-{phase}", tool="live", args={"i": i}), handler=noop)
            times.append((time.perf_counter() - t) * 1000)
            i += 1
        stop.clear()
        out.put(times)
    ledger.close()


def prune_at_scale(pg_url: str, conninfo: str, rows: int, alone_s: float) -> dict[str, Any]:
    """Load ``rows`` settled effects past retention (and their events) into a database of their own,
    then time ``ledger.prune()`` while another process makes live calls; compare the live calls' p99
    with their p99 when nothing is pruned."""
    db = "bench_prune"
    with psycopg.connect(conninfo, autocommit=True, **pg_options()) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")  # PgBouncer may hold connections
        admin.execute(f"CREATE DATABASE {db}")
    url = make_url(pg_url).set(database=db).render_as_string(hide_password=False)
    info = conninfo.rsplit("/", 1)[0] + "/" + db
    Ledger(url).migrate()
    loaded = bulk_load(info, "agent_ledger_", rows)
    ctx = mp.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    run = "live-" + uuid.uuid4().hex
    caller = ctx.Process(target=_live_caller, args=(url, run, start, stop, out))
    caller.start()
    try:
        assert out.get(timeout=120) == "ready"
        start.set()
        time.sleep(alone_s)
        stop.set()
        alone = out.get(timeout=120)
        ledger = Ledger(url)
        start.set()
        t = time.perf_counter()
        deleted = ledger.prune()
        elapsed = time.perf_counter() - t
        stop.set()
        during = out.get(timeout=120)
        ledger.close()
    finally:
        caller.join(60)
    with psycopg.connect(info, autocommit=True, **pg_options()) as conn:
        left = conn.execute("SELECT count(*) FROM agent_ledger_events WHERE key LIKE 'old-%%'").fetchone()[0]
    with psycopg.connect(conninfo, autocommit=True, **pg_options()) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")  # PgBouncer may hold connections
    return {
        "rows": rows,
        "load_s": round(loaded, 1),
        "deleted_effects": deleted,
        "events_left": left,
        "prune_s": round(elapsed, 1),
        "effects_per_s": round(deleted / elapsed),
        "rows_per_s": round(2 * deleted / elapsed),  # each effect had one event
        "live_p50_ms_alone": round(pct(alone, 0.5), 3),
        "live_p99_ms_alone": round(pct(alone, 0.99), 3),
        "live_p50_ms_during": round(pct(during, 0.5), 3),
        "live_p99_ms_during": round(pct(during, 0.99), 3),
        "live_calls": [len(alone), len(during)],
        "p99_ratio": round(pct(during, 0.99) / pct(alone, 0.99), 2),
    }


# -- memory of a worker --------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; elsewhere the peak, from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss_worker(url: str, calls: int, samples: int, out: Any) -> None:
    """Many calls on distinct keys (a new workflow every 1,000 calls, one replay in ten), sampling RSS."""
    ledger = Ledger(url)
    every = max(1, calls // samples)
    got: list[tuple[int, int]] = []
    for i in range(calls):
        wf = f"rss-{i // 1000}"
        ledger.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)
        if i % 10 == 9:
            ledger.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i - 5}), handler=noop)
        if (i + 1) % every == 0:
            got.append((i + 1, rss_bytes()))
    ledger.close()
    out.put(got)


def rss_over_calls(url: str, calls: int, samples: int = 10) -> list[tuple[int, int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_rss_worker, args=(url, calls, samples, out))
    p.start()
    got: list[tuple[int, int]] = out.get(timeout=7200)
    p.join(60)
    return got


# -- report --------------------------------------------------------------------------------------


def row(path: str, ours: list[float], floor: list[float], ratios: list[float], target: float | None) -> dict[str, Any]:
    """One path's figures. The ratio is the median over rounds of (our p50 / the floor's p50 in the
    same round): each round measures both back to back, so machine noise affects both alike."""
    return {
        "path": path,
        "p50_ms": round(pct(ours, 0.5), 4),
        "p99_ms": round(pct(ours, 0.99), 4),
        "floor_p50_ms": round(pct(floor, 0.5), 4),
        "floor_p99_ms": round(pct(floor, 0.99), 4),
        "ratio_p50": round(statistics.median(ratios), 2),
        "target": target,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["path"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar([i - 0.2 for i in x], [r["floor_p50_ms"] for r in rows], width=0.4, label="raw-driver floor (p50)")
    ax.bar([i + 0.2 for i in x], [r["p50_ms"] for r in rows], width=0.4, label="agent_ledger (p50)")
    for i, r in zip(x, rows, strict=True):
        ax.annotate(f"{r['ratio_p50']}x", (i + 0.2, r["p50_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms per call")
    ax.set_title("agent_ledger per-call time against the raw-driver floor (same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def overhead(pg_url: str, sqlite_url: str, tmp: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Per-call time of each path against its floor, in alternating rounds; writes the table and plot."""
    conninfo = floor_conninfo(pg_url)
    table = "agent_ledger_effects"
    n, warm, rounds = args.n, args.warm, args.rounds
    rows = []

    references = []

    def add(name: str, got: dict[str, list[float]], replay_floor: str = "") -> None:
        rows.append(row(f"{name} new", got["new"], got["floor_new"], got["ratio_new"], TARGETS["new"]))
        path = f"{name} replay"
        target = PATH_TARGETS.get(path, TARGETS["replay"])
        rows.append(row(path + replay_floor, got["replay"], got["floor_replay"], got["ratio_replay"], target))
        if got.get("cpu_replay"):
            cpu = {k: round(statistics.median(got[k]), 4) for k in ("cpu_floor_replay", "cpu_replay")}
            if got.get("cpu_minimal_replay"):
                cpu["cpu_minimal_replay"] = round(statistics.median(got["cpu_minimal_replay"]), 4)
            rows[-1]["client_cpu_ms"] = cpu
        if "minimal_replay" in got:  # not a target: how much of the replay is the promise itself
            minimal = row(
                f"{path}: minimal ledger", got["minimal_replay"], got["floor_replay"], got["ratio_minimal_floor"], None
            )
            minimal["ledger_vs_minimal"] = round(statistics.median(got["ratio_minimal"]), 2)
            references.append(minimal)

    events = "agent_ledger_events"
    add(
        "postgres sync",
        compare(
            floor_pg_sync(conninfo, table),
            ledger_sync(pg_url),
            n,
            warm,
            rounds,
            minimal_replay_pg(conninfo, table, events),
        ),
    )

    async def pg_async() -> dict[str, list[float]]:
        return await acompare(await floor_pg_async(conninfo, table), ledger_async(pg_url), n, warm, rounds)

    add("postgres async", asyncio.run(pg_async()))
    sqlite_floor = floor_sqlite(f"{tmp}/bench.db", table, with_key=True)
    minimal = minimal_replay_sqlite(f"{tmp}/bench.db", table, events)
    add("sqlite sync", compare(sqlite_floor, ledger_sync(sqlite_url), n, warm, rounds, minimal), " (floor + key)")

    async def sqlite_async() -> dict[str, list[float]]:
        floor = await floor_sqlite_async(f"{tmp}/bench.db", table)
        return await acompare(floor, ledger_async(sqlite_url), n, warm, rounds)

    add("sqlite async", asyncio.run(sqlite_async()))
    # A new call with one limit against the same call without: here the "floor" columns are the
    # ledger's own new call without limits (same run, alternating blocks).
    limited = compare_new(ledger_sync(pg_url), ledger_limited(pg_url), n, warm, rounds)
    rows.append(
        row(
            "postgres sync new, 1 limit vs none",
            limited["new"],
            limited["floor_new"],
            limited["ratio_new"],
            TARGETS["limit"],
        )
    )
    keys = key_cost(n)
    print(f"{'path':<34} {'p50 ms':>8} {'p99 ms':>8} {'floor p50':>10} {'floor p99':>10} {'ratio':>6} {'target':>7}")
    for r in rows:
        ok = "" if r["target"] is None else ("ok" if r["ratio_p50"] <= r["target"] else "MISSED")
        print(
            f"{r['path']:<34} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['floor_p50_ms']:>10.3f} "
            f"{r['floor_p99_ms']:>10.3f} {r['ratio_p50']:>5.2f}x {r['target'] or '-'!s:>6}x {ok}"
        )
    print(f"computing a key alone (ToolCall, canonical JSON, two SHA-256): {pct(keys, 0.5) * 1000:.1f} us p50")
    for r in rows:
        if "client_cpu_ms" in r:
            cpu = r["client_cpu_ms"]
            minimal_cpu = cpu.get("cpu_minimal_replay")
            print(
                f"{r['path']}: client CPU per replay (every thread) {cpu['cpu_replay'] * 1000:.0f} us, floor "
                f"{cpu['cpu_floor_replay'] * 1000:.0f} us"
                + ("" if minimal_cpu is None else f", minimal ledger {minimal_cpu * 1000:.0f} us")
            )
    for r in references:
        print(
            f"{r['path']} (key, narrow read, check, audit row by batch; not a target): p50 {r['p50_ms']:.3f} ms, "
            f"{r['ratio_p50']:.2f}x its floor; agent_ledger is {r['ledger_vs_minimal']:.2f}x the minimal ledger"
        )
    lines = [
        "| path | p50 ms | p99 ms | floor p50 ms | floor p99 ms | ratio (p50) | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['path']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['floor_p50_ms']:.3f} | "
        f"{r['floor_p99_ms']:.3f} | {r['ratio_p50']:.2f}x | <= {r['target']}x |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "overhead.png")
    missed = [r["path"] for r in rows if r["target"] is not None and r["ratio_p50"] > r["target"]]
    return {
        "paths": rows,
        "minimal_ledger": references,
        "key_alone_p50_ms": round(pct(keys, 0.5), 4),
        "missed": missed,
    }


def plot_throughput(got: dict[str, Any], path: Path) -> None:
    """Calls per second against concurrency, ledger and floor, processes and async tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, style in (("processes", "-"), ("async_tasks", "--")):
        levels = sorted(got[mode], key=int)
        if not levels:
            continue
        xs = [int(c) for c in levels]
        label = mode.replace("_", " ")
        ax.plot(xs, [got[mode][c]["floor"] for c in levels], style, marker="o", label=f"raw-driver floor, {label}")
        ax.plot(xs, [got[mode][c]["ledger"] for c in levels], style, marker="s", label=f"agent_ledger, {label}")
    ax.set_xscale("log", base=2)
    levels_all = sorted({int(c) for mode in ("processes", "async_tasks") for c in got[mode]})
    ax.set_xticks(levels_all, [str(c) for c in levels_all])
    ax.set_xlabel("concurrent workers")
    ax.set_ylabel("new calls per second (Postgres)")
    ax.set_title("Throughput on distinct keys against the raw-driver floor (same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section_throughput(pg_url: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    conninfo = floor_conninfo(pg_url)
    table = "agent_ledger_effects"
    got: dict[str, Any] = {"processes": {}, "async_tasks": {}}
    print(
        "postgres throughput, distinct keys, calls/s (ledger / raw-driver floor, same run; "
        f"target >= {THROUGHPUT_TARGET}x)"
    )
    for c in args.concurrency:
        for mode in ("processes", "async_tasks"):
            if mode == "processes":
                tp = throughput_processes(pg_url, conninfo, table, c, args.tp_calls)
            else:
                tp = asyncio.run(throughput_tasks(pg_url, conninfo, table, c, args.tp_calls))
            ratio = tp["ledger"] / tp["floor"]
            got[mode][c] = {"ledger": round(tp["ledger"], 1), "floor": round(tp["floor"], 1), "ratio": round(ratio, 2)}
            if "waits" in tp:
                got[mode][c]["db_waits"] = tp["waits"]
            ok = "ok" if ratio >= THROUGHPUT_TARGET else "MISSED"
            print(
                f"  {c:>3} {mode.replace('_', ' '):<11} {tp['ledger']:>8.0f} / {tp['floor']:>8.0f}  {ratio:.2f}x {ok}"
                + (f"   db sessions waiting on: {tp['waits']}" if "waits" in tp else ""),
                flush=True,
            )
    plot_throughput(got, out / "throughput.png")
    return got


def section_cost(pg_url: str, args: argparse.Namespace) -> dict[str, Any]:
    conninfo = floor_conninfo(pg_url)
    got = db_cost(pg_url, conninfo, "agent_ledger_effects", args.cost_calls)
    print("the database's cost per new call (round trips counted on the client; WAL bytes from pg_current_wal_lsn)")
    for name, v in got.items():
        print(f"  {name:<18} {v['round_trips']:>5.2f} round trips  {v['wal_bytes']:>6} WAL bytes")
    return got


def section_storm(pg_url: str, args: argparse.Namespace) -> dict[str, Any]:
    got = storm(pg_url, args.storm_procs, args.storm_keys)
    ok = "ok" if got["executions"] == args.storm_keys and got["wrong_results"] == 0 else "FAILED"
    print(
        f"same-key storm: {got['processes']} processes on {got['keys']} keys: {got['executions']} executions, "
        f"{got['wrong_results']} wrong results, {got['calls_per_s']} calls/s {ok}"
    )
    if ok != "ok":
        raise SystemExit(f"same-key storm: {got['executions']} executions for {args.storm_keys} keys")
    return got


def section_waiters(pg_url: str, args: argparse.Namespace) -> dict[str, Any]:
    got = waiter_latency(pg_url, args.wait_rounds, args.waiters)
    ok = "ok" if got["p99_ms"] is not None and got["p99_ms"] <= WAITER_TARGET_MS else "MISSED"
    print(
        f"waiters ({got['waiters_per_key']} per key, {got['samples']} waits) see the winner's result after its commit: "
        f"p50 {got['p50_ms']} ms, p90 {got['p90_ms']} ms, p99 {got['p99_ms']} ms, max {got['max_ms']} ms "
        f"(target p99 <= {WAITER_TARGET_MS:g} ms) {ok}; waiter executions: {got['waiter_executions']}"
    )
    if got["waiter_executions"] or got["samples"] != got["expected_samples"]:
        raise SystemExit("waiters: a waiter executed the handler or did not see the winner's result")
    return got


def section_prune(pg_url: str, args: argparse.Namespace) -> dict[str, Any]:
    conninfo = floor_conninfo(pg_url)
    got = prune_at_scale(pg_url, conninfo, args.prune_rows, args.prune_alone)
    ok = "ok" if got["p99_ratio"] <= PRUNE_P99_TARGET else "MISSED"
    print(
        f"prune: {got['deleted_effects']:,} effects and their events (loaded in {got['load_s']} s) "
        f"in {got['prune_s']} s: {got['effects_per_s']:,} effects/s, {got['rows_per_s']:,} rows/s; "
        f"live calls p99 {got['live_p99_ms_alone']} ms alone, {got['live_p99_ms_during']} ms during the prune "
        f"({got['p99_ratio']}x, target <= {PRUNE_P99_TARGET}x) {ok}"
    )
    return got


def section_rss(sqlite_url: str, args: argparse.Namespace) -> dict[str, Any]:
    samples = rss_over_calls(sqlite_url, args.rss_calls)
    mib = [(n, round(b / 2**20, 1)) for n, b in samples]
    third = mib[len(mib) // 3][1]
    growth = mib[-1][1] - third
    print(
        "worker RSS over calls (SQLite, distinct keys, a new workflow every 1,000 calls, one replay in ten): "
        + ", ".join(f"{n:,}: {m} MiB" for n, m in mib)
        + f"; growth after the first third: {growth:+.1f} MiB"
    )
    return {"calls": args.rss_calls, "rss_mib": mib, "growth_after_first_third_mib": round(growth, 1)}


# -- the upstream ``agent-ledger`` package, as a second reference --------------------------------

UPSTREAM_PYTHON = os.environ.get("AGENT_LEDGER_UPSTREAM_PYTHON", "/tmp/upstream-venv/bin/python")
"""A Python with PyPI's ``agent-ledger`` installed (a different project of the same name), kept in its
own virtualenv because its import name clashes with ours."""


def section_upstream(pg_url: str, args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """PyPI's ``agent-ledger`` (a different project with the same name, async only) measured in the same
    run, in its own virtualenv (benchmarks/upstream.py), next to agent_ledger's async Postgres paths."""
    import subprocess

    if not Path(UPSTREAM_PYTHON).exists():
        print(f"upstream agent-ledger: skipped (no {UPSTREAM_PYTHON}; set AGENT_LEDGER_UPSTREAM_PYTHON)")
        return {"skipped": True}
    conninfo = floor_conninfo(pg_url)
    db = "bench_upstream"
    with psycopg.connect(conninfo, autocommit=True, **pg_options()) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")  # PgBouncer may hold connections
        admin.execute(f"CREATE DATABASE {db}")
    script = str(ROOT / "benchmarks" / "upstream.py")
    target = conninfo.rsplit("/", 1)[0] + "/" + db
    done = subprocess.run(
        [UPSTREAM_PYTHON, "-I", script, target, str(min(args.n, 2000)), str(min(args.warm, 100))],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        print(f"upstream agent-ledger: failed ({done.stderr.strip().splitlines()[-1:]})")
        return {"skipped": True, "error": done.stderr[-2000:]}
    got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {r["path"]: r for r in results.get("overhead", {}).get("paths", [])}
    line = (
        f"upstream agent-ledger {got['version']} (async, Postgres): new p50 {got['new_p50_ms']:.3f} ms, "
        f"replay p50 {got['replay_p50_ms']:.3f} ms"
    )
    for kind in ("new", "replay"):
        mine = ours.get(f"postgres async {kind}")
        if mine is not None:
            got[f"{kind}_ratio_to_floor"] = round(got[f"{kind}_p50_ms"] / mine["floor_p50_ms"], 2)
            line += f"; {kind}: {got[f'{kind}_ratio_to_floor']}x the floor (agent_ledger {mine['ratio_p50']}x)"
    print(line)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", help="an existing Postgres (default: start a throwaway server)")
    parser.add_argument("--only", help=f"comma-separated sections to run (default all): {','.join(SECTIONS)}")
    parser.add_argument("-n", type=int, default=4000, help="timed calls per path (default 4000)")
    parser.add_argument("--warm", type=int, default=300, help="untimed warm-up calls per path")
    parser.add_argument("--rounds", type=int, default=20, help="alternating floor/ledger blocks per path")
    parser.add_argument("--concurrency", default="1,4,16,64", help="throughput: worker counts (default 1,4,16,64)")
    parser.add_argument("--tp-calls", type=int, default=3000, help="throughput: calls per phase, split over workers")
    parser.add_argument("--cost-calls", type=int, default=500, help="cost: new calls per measurement")
    parser.add_argument("--storm-procs", type=int, default=64, help="storm: processes (default 64)")
    parser.add_argument("--storm-keys", type=int, default=100, help="storm: keys they all call (default 100)")
    parser.add_argument("--waiters", type=int, default=8, help="waiters per key (default 8)")
    parser.add_argument("--wait-rounds", type=int, default=30, help="waiters: keys, one after another (default 30)")
    parser.add_argument("--prune-rows", type=int, default=1_000_000, help="prune: settled effects to load (1,000,000)")
    parser.add_argument("--prune-alone", type=float, default=5.0, help="prune: seconds of live calls without a prune")
    parser.add_argument("--rss-calls", type=int, default=100_000, help="rss: calls made by one worker (100,000)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance"), help="where to write results")
    parser.add_argument("--no-processes", action="store_true", help="skip every section that starts processes")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="run the Postgres lines (ledger and floor) through a throwaway PgBouncer in transaction pooling mode "
        "(tests/_pgbouncer.py) in front of the Postgres; results go to <out>/pgbouncer",
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    only = set(SECTIONS) if not args.only else {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.no_processes:
        only -= {"throughput", "storm", "waiters", "prune", "rss"}
    # A SIGTERM (a CI timeout, `kill`) ends the run through the `finally` below, which stops the
    # throwaway Postgres and PgBouncer; by default it would end the process and leave them running.
    signal.signal(signal.SIGTERM, _terminated)
    server = bouncer = None
    if args.pg_url:
        pg_url = args.pg_url
    else:
        from _pgserver import PgServer

        server = PgServer(extra_options=["-c", "max_connections=400"])  # 64 workers, a few connections each
        server.start()
        pg_url = server.url("postgres")
    if args.pgbouncer:
        from _pgbouncer import PgBouncer

        direct = make_url(pg_url)
        bouncer = PgBouncer(str(direct.host or "127.0.0.1"), direct.port or 5432, str(direct.username), direct.password)
        bouncer.start()
        pg_url = direct.set(host=bouncer.host, port=bouncer.port).update_query_dict({"pgbouncer": "transaction"})
        pg_url = pg_url.render_as_string(hide_password=False)
        os.environ[BOUNCED] = "1"
        args.out = str(Path(args.out) / "pgbouncer")
        print(f"through PgBouncer {bouncer.host}:{bouncer.port} (pool_mode=transaction) -> {direct.host}:{direct.port}")
    tmp = tempfile.mkdtemp(prefix="agent-ledger-bench-")
    sqlite_url = f"sqlite:///{tmp}/bench.db"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    try:
        results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {}
    except ValueError:
        results = {}
    try:
        Ledger(pg_url).migrate()
        Ledger(sqlite_url).migrate()
        runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("overhead", lambda: overhead(pg_url, sqlite_url, tmp, args, out)),
            ("throughput", lambda: section_throughput(pg_url, args, out)),
            ("cost", lambda: section_cost(pg_url, args)),
            ("storm", lambda: section_storm(pg_url, args)),
            ("waiters", lambda: section_waiters(pg_url, args)),
            ("prune", lambda: section_prune(pg_url, args)),
            ("rss", lambda: section_rss(sqlite_url, args)),
            ("upstream", lambda: section_upstream(pg_url, args, results)),
        ]
        results["meta"] = {
            "n": args.n,
            "warm": args.warm,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "sections": sorted(only),
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for name, fn in runs:
            if name in only:
                t = time.perf_counter()
                results[name] = fn()
                print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
                results_file.write_text(json.dumps(results, indent=2) + "\n")  # after each section
        print(f"wrote {results_file}" + (", results.md and overhead.png" if "overhead" in only else ""))
        missed = results.get("overhead", {}).get("missed") if "overhead" in only else None
        if missed:
            print("targets missed: " + ", ".join(missed))
        return 0
    finally:
        if bouncer is not None:
            bouncer.close()
        if server is not None:
            server.close()


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
