"""Scale: a same-key storm of processes runs each key once, prune works through many rows in batches,
and every per-process cache is bounded (memory stays flat over millions of calls)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import _workers
import pytest
from _workers import read_lines, stale_claim
from sqlalchemy import func, select, update

from agent_ledger import Ledger, ToolCall, _keys, _ledger, _text
from agent_ledger._runtime import _ReplayBuffer

ctx = mp.get_context("spawn")
pytestmark = pytest.mark.pgbouncer  # the storm also runs through PgBouncer in transaction mode


def test_same_key_storm_runs_each_key_once(db_url: str, tmp_path: Path) -> None:
    """Six processes call the same 20 keys at once, each in its own order: 20 executions in all, and
    every call returns its key's result (the benchmark does 64 processes on 100 keys)."""
    Ledger(db_url).migrate()
    log, results, procs, keys = str(tmp_path / "storm.log"), ctx.Queue(), 6, 20
    barrier = ctx.Barrier(procs)
    workers = [
        ctx.Process(target=_workers.storm_caller, args=(db_url, "wf-storm", keys, n, log, barrier, results))
        for n in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        wrong = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(60)
    runs = Counter(line.split()[1] for line in read_lines(log))
    assert runs == Counter({str(k): 1 for k in range(keys)}), "each key executed exactly once"
    assert wrong == [0] * procs


def test_prune_deletes_in_batches_through_ties(make_ledger: Callable[..., Ledger]) -> None:
    """More rows than a batch, many sharing one ``retain_until`` (a batch boundary falls inside the tie):
    every settled row past retention goes with its events, in several batches; an unsettled one stays."""
    led = make_ledger()
    for i in range(57):
        led.run(ToolCall(workflow_id="old", tool="t", args={"i": i}), handler=lambda i: i, retention=0.01)
    stale_claim(led, ToolCall(workflow_id="old", tool="crashed", args={"i": 0}))
    e = led._rt.tables.effects
    with led._rt.engine.begin() as conn:  # 40 of them with the very same retention time
        same = conn.execute(e.select().where(e.c.tool == "t").limit(1)).mappings().one()["retain_until"]
        keys = [r.key for r in led.history("old") if r.tool == "t"][:40]
        conn.execute(update(e).where(e.c.key.in_(keys)).values(retain_until=same))
    time.sleep(0.05)
    batches = []
    real = led._rt.store.prunable

    def counted(**kw: object) -> object:
        batches.append(kw["after"])
        return real(**kw)  # type: ignore[arg-type]

    led._rt.store.prunable = counted  # type: ignore[method-assign]
    assert led.prune(batch_size=8) == 57
    assert len(batches) >= 57 // 8 and batches[0] is None and batches[1] is not None
    left = led.history("old")
    assert [r.tool for r in left] == ["crashed"]
    assert all(ev.key == left[0].key for ev in led.events(workflow_id="old"))
    led._rt.store.prunable = real  # type: ignore[method-assign]

    for i in range(23):
        led.run(ToolCall(workflow_id="aged", tool="t", args={"i": i}), handler=lambda i: i)
    assert led.prune(older_than=0, batch_size=5) == 23
    assert led.history("aged") == []
    with pytest.raises(ValueError, match="batch_size"):
        led.prune(batch_size=0)


def test_per_process_caches_are_bounded(make_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache a worker keeps across calls has a bound: with small bounds and many distinct
    workflows, tools and keys, none grows past it."""
    small = _ledger._Fits(limit=8)
    monkeypatch.setattr(_ledger, "_storable_names", small)
    led = make_ledger()
    buffer = led._rt._replays = _ReplayBuffer(led._rt, interval=3600, limit=4)
    for i in range(60):
        call = ToolCall(workflow_id=f"wf-{i}", tool=f"tool-{i % 13}", args={"i": i})
        led.run(call, handler=lambda i: i)
        led.run(call, handler=lambda i: i)  # a replay: buffered for the audit trail
        assert len(small._seen) <= 8
        assert len(buffer._items) + len(buffer._pending) <= 2 * 5 * 4
    for cached in (_keys._canonical_name, _text.check_name):
        info = cached.cache_info()  # type: ignore[attr-defined]
        assert info.maxsize is not None and info.currsize <= info.maxsize
    led.flush()
    assert buffer._items == [] and buffer._pending == {}
    ev = led._rt.tables.events
    with led._rt.engine.connect() as conn:
        written = conn.execute(select(func.count()).where(ev.c.kind == "replayed")).scalar_one()
    # Replays beyond the bound while the writer lags are dropped (counted in a warning), never queued.
    assert 0 < written <= 60
