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

from agent_ledger import Ledger, Limit, ToolCall  # noqa: E402

TARGETS = {"new": 1.5, "replay": 2.0, "limit": 1.3}

BOUNCED = "AGENT_LEDGER_BENCH_PGBOUNCER"
"""Set (to 1) by ``--pgbouncer`` in this process's environment, so spawned workers see it too."""


def pg_options() -> dict[str, Any]:
    """Keyword arguments for the floor's raw ``psycopg.connect``: behind PgBouncer in transaction pooling it
    cannot prepare statements either (``prepare_threshold=None``, as the ledger's ``?pgbouncer=transaction``)."""
    return {"prepare_threshold": None} if os.environ.get(BOUNCED) else {}


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
SELECT = "SELECT * FROM {t} WHERE key = {k} AND workflow_id = 'floor'"


def floor_sql(table: str, mark: str) -> tuple[str, str, str]:
    """The floor's claim, completion and lookup, with the driver's placeholder (``%s`` or ``?``)."""
    complete = COMPLETE.format(t=table, r=mark, n=mark, k=mark, o=mark)
    if mark == "?":
        complete = complete.replace("= true", "= 1")  # SQLite booleans are integers
    return CLAIM.format(t=table, p=", ".join([mark] * 11)), complete, SELECT.format(t=table, k=mark)


def claim_params(key: str, args: Any, lease_until: Any, now: Any) -> tuple[Any, ...]:
    """The floor's claim row, with the arguments and times already in the driver's form."""
    return (key, "floor", "bench", "running", 1, "v1:" + "0" * 64, args, "floor-owner", lease_until, now, now)


def pg_params(key: str) -> tuple[Any, ...]:
    now = datetime.now(timezone.utc)
    return claim_params(key, Jsonb({"i": key}), now + timedelta(seconds=30), now)


def sqlite_now() -> str:
    """Now, as SQLite stores the ledger's datetimes."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


Pair = tuple[Callable[[int], Any], Callable[[int], Any], Callable[[], Any]]


def floor_pg_sync(conninfo: str, table: str) -> Pair:
    run = uuid.uuid4().hex[:8]
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


def floor_sqlite(path: str, table: str) -> Pair:
    run = uuid.uuid4().hex[:8]
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
        conn.execute(select, (f"floor-{run}-{i}",)).fetchone()

    return new, replay, conn.close


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


def compare(floor: Pair, ours: Pair, n: int, warm: int, rounds: int) -> dict[str, list[float]]:
    """Alternate blocks of floor and ledger calls so both see the same machine conditions."""
    out: dict[str, list[float]] = {"floor_new": [], "new": [], "floor_replay": [], "replay": []}
    block = max(1, n // rounds)
    for fn in (floor[0], ours[0], floor[1], ours[1]):
        for i in range(warm):
            fn(100_000_000 + i)
    out["ratio_new"], out["ratio_replay"] = [], []
    for r in range(rounds):
        base = r * block
        f, o = timed(floor[0], block, base), timed(ours[0], block, base)
        out["floor_new"] += f
        out["new"] += o
        out["ratio_new"].append(pct(o, 0.5) / pct(f, 0.5))
    for r in range(rounds):
        base = r * block
        f, o = timed(floor[1], block, base), timed(ours[1], block, base)
        out["floor_replay"] += f
        out["replay"] += o
        out["ratio_replay"].append(pct(o, 0.5) / pct(f, 0.5))
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
    from agent_ledger import _keys

    def one(i: int) -> None:
        call = ToolCall(workflow_id="wf", tool="bench", args={"i": i})
        data = _keys.canonical(_keys.normalise(dict(call.args)))
        _keys.key_from_canonical(call.workflow_id, call.tool, data)
        _keys.payload_from_canonical(call.tool, data)

    timed(one, 300, 0)
    return timed(one, n, 0)


# -- throughput and waiters ----------------------------------------------------------------------


def _throughput_worker(url: str, calls: int, barrier: Any, out: Any) -> None:
    ledger = Ledger(url)
    wf = "tp-" + uuid.uuid4().hex
    ledger.run(ToolCall(workflow_id=wf, tool="warm", args={}), handler=lambda: 0)
    barrier.wait()
    t = time.perf_counter()
    for i in range(calls):
        ledger.run(ToolCall(workflow_id=wf, tool="bench", args={"i": i}), handler=noop)
    out.put(time.perf_counter() - t)
    ledger.close()


def throughput(url: str, procs: int, calls: int) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_throughput_worker, args=(url, calls, barrier, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    barrier.wait()
    t = time.perf_counter()
    for _ in workers:
        out.get(timeout=600)
    elapsed = time.perf_counter() - t
    for w in workers:
        w.join()
    return procs * calls / elapsed


def _waiter(url: str, wf: str, barrier: Any, out: Any) -> None:
    ledger = Ledger(url)
    ledger._rt.ensure_schema()
    barrier.wait()
    time.sleep(0.02)  # let the winner claim first
    ledger.run(ToolCall(workflow_id=wf, tool="slow", args={}), handler=lambda: "waiter ran")
    out.put(("waiter", time.time()))
    ledger.close()


def _winner(url: str, wf: str, barrier: Any, out: Any) -> None:
    ledger = Ledger(url)
    ledger._rt.ensure_schema()

    def slow() -> str:
        time.sleep(0.15)
        return "winner"

    barrier.wait()
    ledger.run(ToolCall(workflow_id=wf, tool="slow", args={}), handler=slow)
    out.put(("winner", time.time()))  # run() returns after the completion committed
    ledger.close()


def waiter_latency(url: str, rounds: int, waiters: int = 3) -> list[float]:
    ctx = mp.get_context("spawn")
    lags: list[float] = []
    for r in range(rounds):
        wf = f"wait-{uuid.uuid4().hex}-{r}"
        barrier, out = ctx.Barrier(waiters + 1), ctx.Queue()
        procs = [ctx.Process(target=_winner, args=(url, wf, barrier, out))]
        procs += [ctx.Process(target=_waiter, args=(url, wf, barrier, out)) for _ in range(waiters)]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        committed = next(t for who, t in got if who == "winner")
        lags += [max(0.0, (t - committed) * 1000) for who, t in got if who == "waiter"]
    return lags


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", help="an existing Postgres (default: start a throwaway server)")
    parser.add_argument("-n", type=int, default=4000, help="timed calls per path (default 2000)")
    parser.add_argument("--warm", type=int, default=300, help="untimed warm-up calls per path")
    parser.add_argument("--rounds", type=int, default=20, help="alternating floor/ledger blocks per path")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance"), help="where to write results")
    parser.add_argument("--no-processes", action="store_true", help="skip throughput and waiter measurements")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="run the Postgres lines (ledger and floor) through a throwaway PgBouncer in transaction pooling mode "
        "(tests/_pgbouncer.py) in front of the Postgres; results go to <out>/pgbouncer",
    )
    args = parser.parse_args()
    server = bouncer = None
    if args.pg_url:
        pg_url = args.pg_url
    else:
        from _pgserver import PgServer

        server = PgServer()
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
    try:
        Ledger(pg_url).migrate()
        Ledger(sqlite_url).migrate()
        # The floor's libpq URL: without ?pgbouncer=, which only the ledger understands.
        conninfo = make_url(pg_url).difference_update_query(["pgbouncer"]).set(drivername="postgresql")
        conninfo = conninfo.render_as_string(hide_password=False)
        table = "agent_ledger_effects"
        n, warm, rounds = args.n, args.warm, args.rounds
        rows = []

        def add(name: str, got: dict[str, list[float]]) -> None:
            rows.append(row(f"{name} new", got["new"], got["floor_new"], got["ratio_new"], TARGETS["new"]))
            rows.append(
                row(f"{name} replay", got["replay"], got["floor_replay"], got["ratio_replay"], TARGETS["replay"])
            )

        add("postgres sync", compare(floor_pg_sync(conninfo, table), ledger_sync(pg_url), n, warm, rounds))

        async def pg_async() -> dict[str, list[float]]:
            return await acompare(await floor_pg_async(conninfo, table), ledger_async(pg_url), n, warm, rounds)

        add("postgres async", asyncio.run(pg_async()))
        add("sqlite sync", compare(floor_sqlite(f"{tmp}/bench.db", table), ledger_sync(sqlite_url), n, warm, rounds))

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
        sqlite_floor = next(r for r in rows if r["path"] == "sqlite sync replay")["floor_p50_ms"]

        print(
            f"{'path':<24} {'p50 ms':>8} {'p99 ms':>8} {'floor p50':>10} {'floor p99':>10} {'ratio':>6} {'target':>7}"
        )
        for r in rows:
            ok = "" if r["target"] is None else ("ok" if r["ratio_p50"] <= r["target"] else "MISSED")
            print(
                f"{r['path']:<24} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['floor_p50_ms']:>10.3f} "
                f"{r['floor_p99_ms']:>10.3f} {r['ratio_p50']:>5.2f}x {r['target'] or '-'!s:>6}x {ok}"
            )
        print(
            f"computing a key alone (ToolCall, canonical JSON, two SHA-256): {pct(keys, 0.5) * 1000:.1f} us p50, "
            f"{pct(keys, 0.5) / sqlite_floor:.1f}x the SQLite replay floor"
        )
        extra: dict[str, Any] = {"key_alone_p50_ms": round(pct(keys, 0.5), 4)}
        if not args.no_processes:
            tp = {p: round(throughput(pg_url, p, 500), 1) for p in (1, 2, 4, 8)}
            print("postgres throughput, distinct keys (calls/s): " + ", ".join(f"{p} proc: {v}" for p, v in tp.items()))
            lags = waiter_latency(pg_url, 8)
            print(
                f"waiters see the winner's result {statistics.median(lags):.1f} ms (median), "
                f"{pct(lags, 0.9):.1f} ms (p90), {max(lags):.1f} ms (max of {len(lags)}) after its commit"
            )
            extra |= {
                "throughput_calls_per_s": tp,
                "waiter_lag_ms": {
                    "median": round(statistics.median(lags), 2),
                    "p90": round(pct(lags, 0.9), 2),
                    "max": round(max(lags), 2),
                    "samples": len(lags),
                },
            }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "n": n,
            "warm": warm,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (out / "results.json").write_text(json.dumps({"meta": meta, "paths": rows, **extra}, indent=2) + "\n")
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
        print(f"wrote {out}/results.json, results.md and overhead.png")
        missed = [r["path"] for r in rows if r["target"] is not None and r["ratio_p50"] > r["target"]]
        if missed:
            print("targets missed: " + ", ".join(missed))
        return 0
    finally:
        if bouncer is not None:
            bouncer.close()
        if server is not None:
            server.close()


if __name__ == "__main__":
    raise SystemExit(main())
