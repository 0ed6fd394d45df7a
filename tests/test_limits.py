"""Runtime limits (issue 13): budgets and loop guards enforced in the claim, on SQLite and Postgres,
sync and async, across processes and restarts. Every test counts handler executions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import multiprocessing as mp
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _limit_workers
import psycopg
import pytest
import sqlalchemy as sa
from _workers import read_lines, stale_claim

from agent_ledger import (
    ApprovalPending,
    ConfigurationError,
    InvalidArguments,
    Ledger,
    LedgerError,
    Limit,
    LimitExceeded,
    LimitUsage,
    ToolCall,
)
from agent_ledger import _ledger as ledger_module
from agent_ledger._limits import EPOCH, window_bounds

ctx = mp.get_context("spawn")
MODES = ["sync", "async"]


class Runs:
    """Calls a tool through ``ledger.run`` (sync) or ``ledger.arun`` (async), counting executions."""

    def __init__(self, ledger: Ledger, mode: str, tool: str = "t", **options: Any) -> None:
        self.ledger = ledger
        self.mode = mode
        self.tool = tool
        self.options = options
        self.ran: list[dict[str, Any]] = []
        self.fail = False

    def _handle(self, **args: Any) -> Any:
        self.ran.append(args)
        if self.fail:
            raise RuntimeError("downstream timed out")
        return args

    def __call__(self, workflow: str = "w", tool: str | None = None, **args: Any) -> Any:
        call = ToolCall(workflow_id=workflow, tool=tool or self.tool, args=args)
        if self.mode == "sync":
            return self.ledger.run(call, handler=self._handle, **self.options)

        async def handler(**a: Any) -> Any:
            await asyncio.sleep(0)
            return self._handle(**a)

        return asyncio.run(self.ledger.arun(call, handler=handler, **self.options))


def kinds(ledger: Ledger, workflow: str) -> list[str]:
    return [e.kind for e in ledger.events(workflow_id=workflow)]


# -- what consumes, and what is refused ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_call_cap_per_workflow(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=3)])
    for n in range(3):
        assert run(n=n) == {"n": n}
    with pytest.raises(LimitExceeded) as refused:
        run(n=3)
    e = refused.value
    assert (e.limit, e.scope, e.used, e.max, e.requested) == ("t:calls/workflow", "w", 3, 3, 1)
    assert isinstance(e, LedgerError) and e.key is not None
    assert str(e).startswith("budget t:calls/workflow/w used 3 of 3; this call needs 1.")
    assert len(run.ran) == 3
    # Another workflow has its own budget.
    assert run("w2", n=3) == {"n": 3}
    assert len(run.ran) == 4
    # Atomic: the refused call left no claim row, in any state.
    assert ledger.effect(e.key) is None


@pytest.mark.parametrize("mode", MODES)
def test_spend_cap_on_an_argument(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, tool="stripe.charge", limits=[Limit(max=500, count="amount", name="stripe.charge")])
    assert run("order-9", amount=250, n=1) == {"amount": 250, "n": 1}
    assert run("order-9", amount=150, n=2) == {"amount": 150, "n": 2}
    with pytest.raises(LimitExceeded) as refused:
        run("order-9", amount=200, n=3)
    assert str(refused.value).startswith("budget stripe.charge/order-9 used 400 of 500; this call needs 200.")
    assert (refused.value.used, refused.value.requested) == (400, 200)
    assert run("order-9", amount=100, n=4) == {"amount": 100, "n": 4}  # exactly up to the cap
    assert run("order-9", amount=0, n=5) == {"amount": 0, "n": 5}  # nothing left, and nothing asked
    with pytest.raises(LimitExceeded):
        run("order-9", amount=0.5, n=6)
    assert [r["n"] for r in run.ran] == [1, 2, 4, 5]
    [usage] = ledger.usage(workflow_id="order-9")
    assert (usage.name, usage.scope, usage.used, usage.max, usage.remaining) == (
        "stripe.charge",
        "order-9",
        500,
        500,
        0,
    )


@pytest.mark.parametrize("mode", MODES)
def test_per_tool_scope_is_one_budget_across_workflows(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, tool="search", limits=[Limit(max=2, per="tool")])
    assert run("w1", q=1) and run("w2", q=1)
    with pytest.raises(LimitExceeded) as refused:
        run("w3", q=1)
    assert refused.value.scope == "search"
    assert len(run.ran) == 2
    # Another tool with the same Limit has a budget of its own (the default name names the tool).
    other = Runs(ledger, mode, tool="fetch", limits=[Limit(max=2, per="tool")])
    assert other("w3", q=1) == {"q": 1}


@pytest.mark.parametrize("mode", MODES)
def test_per_callable_scope(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    per_tenant = Limit(max=2, per=lambda call: f"tenant:{call.args['tenant']}", name="tenant calls")
    run = Runs(ledger, mode, limits=[per_tenant])
    assert run("w1", tenant="acme", n=1) and run("w2", tenant="acme", n=2)
    with pytest.raises(LimitExceeded) as refused:
        run("w3", tenant="acme", n=3)
    assert refused.value.scope == "tenant:acme"
    assert run("w3", tenant="globex", n=3) == {"tenant": "globex", "n": 3}
    assert len(run.ran) == 3
    # A tenant's budget is not one workflow's: listed without a workflow filter.
    assert [(u.scope, u.used) for u in ledger.usage()] == [("tenant:acme", 2), ("tenant:globex", 1)]
    assert ledger.usage(workflow_id="w1") == []


@pytest.mark.parametrize("mode", MODES)
def test_ledger_limits_cover_every_tool(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger(limits=[Limit(max=3, per="ledger", name="everything")])
    a = Runs(ledger, mode, tool="a")
    b = Runs(ledger, mode, tool="b")
    assert a("w1", n=1) and b("w2", n=1) and a("w3", n=2)
    with pytest.raises(LimitExceeded) as refused:
        b("w4", n=2)
    assert (refused.value.limit, refused.value.scope) == ("everything", "ledger")
    assert len(a.ran) + len(b.ran) == 3


@pytest.mark.parametrize("mode", MODES)
def test_decorated_tool_limits(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    ran: list[int] = []

    if mode == "sync":

        @ledger.tool("send", limits=[Limit(max=2)])
        def send(n: int) -> int:
            ran.append(n)
            return n

        def call(n: int) -> Any:
            with ledger.workflow("wf"):
                return send(n)

    else:

        @ledger.tool("send", limits=[Limit(max=2)])
        async def asend(n: int) -> int:
            ran.append(n)
            return n

        def call(n: int) -> Any:
            async def go() -> Any:
                async with ledger.workflow("wf"):
                    return await asend(n)

            return asyncio.run(go())

    assert call(1) == 1 and call(2) == 2 and call(1) == 1  # the third is a replay
    with pytest.raises(LimitExceeded):
        call(3)
    assert ran == [1, 2]
    assert [(u.name, u.used, u.remaining) for u in ledger.usage(workflow_id="wf", tool="send")] == [
        ("send:calls/workflow", 2, 0)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_windows_reset(make_ledger: Callable[..., Ledger], mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed window aligned to the epoch: a new window starts from zero (the clock is injected)."""
    now = [dt.datetime(2030, 1, 1, 12, 0, 30, tzinfo=dt.timezone.utc)]
    monkeypatch.setattr(ledger_module, "utcnow", lambda: now[0])
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=2, window=dt.timedelta(minutes=1))])
    assert run(n=1) and run(n=2)
    with pytest.raises(LimitExceeded) as refused:
        run(n=3)
    assert refused.value.window_end == dt.datetime(2030, 1, 1, 12, 1, tzinfo=dt.timezone.utc)
    assert "starts again at 2030-01-01T12:01:00+00:00" in str(refused.value)
    now[0] += dt.timedelta(seconds=29)  # 12:00:59, same window
    with pytest.raises(LimitExceeded):
        run(n=3)
    now[0] += dt.timedelta(seconds=1)  # 12:01:00: a new window
    assert run(n=3) == {"n": 3}
    [usage] = ledger.usage(workflow_id="w")
    assert (usage.used, usage.window_start, usage.window_end) == (
        1,
        dt.datetime(2030, 1, 1, 12, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2030, 1, 1, 12, 2, tzinfo=dt.timezone.utc),
    )
    assert len(run.ran) == 3


def test_windows_are_fixed_and_aligned_to_the_epoch() -> None:
    at = dt.datetime(2030, 1, 1, 12, 0, 59, 999999, tzinfo=dt.timezone.utc)
    assert window_bounds(60, at) == (at.replace(second=0, microsecond=0), at.replace(minute=1, second=0, microsecond=0))
    assert window_bounds(None, at) == (EPOCH, None)
    assert window_bounds(3600, at)[0] == at.replace(minute=0, second=0, microsecond=0)


@pytest.mark.parametrize("mode", MODES)
def test_replays_and_refused_calls_are_free(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=2)])
    for _ in range(5):
        assert run(n=1) == {"n": 1}
    assert [u.used for u in ledger.usage(workflow_id="w")] == [1]
    assert run(n=2)
    for _ in range(3):
        with pytest.raises(LimitExceeded):
            run(n=3)
    assert [u.used for u in ledger.usage(workflow_id="w")] == [2]
    assert len(run.ran) == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_handler_is_retried_until_the_cap_stops_it(make_ledger: Callable[..., Ledger], mode: str) -> None:
    """The loop guard: each retry after a recorded failure is an execution; the cap ends the loop, and the
    refused retry leaves the recorded failure as it was."""
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=3, name="loop guard")])
    run.fail = True
    for _ in range(3):
        with pytest.raises(RuntimeError):
            run(n=1)
    with pytest.raises(LimitExceeded) as refused:
        run(n=1)
    assert len(run.ran) == 3
    record = ledger.effect(refused.value.key or "")
    assert record is not None and record.status == "failed" and record.attempts == 3


@pytest.mark.parametrize("mode", MODES)
def test_a_takeover_consumes(make_ledger: Callable[..., Ledger], mode: str) -> None:
    """A takeover of a dead claim under on_crash="retry" runs the handler: it consumes; over the budget
    it is refused and the dead claim stays as it was."""
    ledger = make_ledger()
    run = Runs(ledger, mode, on_crash="retry", limits=[Limit(max=1)])
    stale_claim(ledger, ToolCall(workflow_id="w", tool="t", args={"n": 1}))
    stale_claim(ledger, ToolCall(workflow_id="w", tool="t", args={"n": 2}))
    assert run(n=1) == {"n": 1}
    with pytest.raises(LimitExceeded) as refused:
        run(n=2)
    assert len(run.ran) == 1
    record = ledger.effect(refused.value.key or "")
    assert record is not None and record.status == "running" and record.attempts == 1


# -- atomic across processes and restarts -------------------------------------------------------------


def test_eight_processes_racing_on_one_budget_make_exactly_n_executions(
    db_url: str, ledger: Ledger, tmp_path: Path
) -> None:
    """8 spawned processes call the same 12 keys in random orders against one budget of 5: exactly 5
    executions, and the budget used is exactly 5 (losers and waiters of a key paid nothing)."""
    ledger.migrate()
    log = str(tmp_path / "runs.log")
    workers, keys, budget = 8, 12, 5
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_limit_workers.budget_racer, args=(db_url, keys, budget, barrier, results, log))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in range(workers * keys)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    executed = read_lines(log)
    assert len(executed) == budget
    assert len({line.split()[0] for line in executed}) == budget  # each key at most once
    assert all(o[2] == budget and o[3] == budget for o in outcomes if o[0] == "refused")
    assert {o[1] for o in outcomes if o[0] == "ok"} == {int(line.split()[0]) for line in executed}
    [usage] = ledger.usage()
    assert (usage.name, usage.scope, usage.used) == ("race", "race", budget)


def test_usage_survives_a_new_process(db_url: str, ledger: Ledger, tmp_path: Path) -> None:
    ledger.migrate()
    log = str(tmp_path / "pay.log")
    results = ctx.Queue()
    p = ctx.Process(target=_limit_workers.spender, args=(db_url, [60, 30], log, results))
    p.start()
    assert [results.get(timeout=120) for _ in range(2)] == [("ok", 60), ("ok", 30)]
    p.join(timeout=60)
    # A restarted agent (a new process) starts from what is stored, not from zero.
    p = ctx.Process(target=_limit_workers.spender, args=(db_url, [60, 30, 20, 10], log, results))
    p.start()
    got = [results.get(timeout=120) for _ in range(4)]
    p.join(timeout=60)
    assert got == [("ok", 60), ("ok", 30), ("refused", 90), ("ok", 10)]  # the first two are replays
    assert read_lines(log) == ["pay 60", "pay 30", "pay 10"]
    assert [(u.name, u.used, u.remaining) for u in Ledger(db_url).usage(workflow_id="order-1")] == [("spend", 100, 0)]


# -- on_exceed="approval" --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_on_exceed_approval_lets_one_approved_call_through(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=100, count="amount", name="spend", on_exceed="approval")])
    assert run(amount=80, n=1)
    with pytest.raises(ApprovalPending) as pending:
        run(amount=50, n=2)
    approval_id = pending.value.approval_id
    with pytest.raises(ApprovalPending):  # still pending: the same request, nothing ran
        run(amount=50, n=2)
    assert ledger.approval(approval_id) is not None
    assert len(run.ran) == 1
    ledger.approve(approval_id, by="finance-lead")
    assert run(amount=50, n=2) == {"amount": 50, "n": 2}  # runs once, past the limit
    assert run(amount=50, n=2) == {"amount": 50, "n": 2}  # a replay
    assert len(run.ran) == 2
    [usage] = ledger.usage(workflow_id="w")
    assert (usage.used, usage.max, usage.remaining) == (130, 100, 0)  # its consumption is recorded
    # The approval covered that one call: another call over the limit asks again.
    with pytest.raises(ApprovalPending) as again:
        run(amount=1, n=3)
    assert again.value.approval_id != approval_id
    assert len(run.ran) == 2
    # Each refusal is audited, the approved call's too (it ran past the limit: the trail says so).
    events = [k for k in kinds(ledger, "w") if k != "replayed"]
    assert events == [
        "succeeded",
        "limit_exceeded",
        "approval_requested",
        "limit_exceeded",
        "approved",
        "limit_exceeded",
        "approval_consumed",
        "succeeded",
        "limit_exceeded",
        "approval_requested",
    ]


# -- audit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_refusals_and_resets_are_audited(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=1, name="one")])
    assert run("wf-audit", n=1)
    with pytest.raises(LimitExceeded):
        run("wf-audit", n=2)
    [refusal] = [e for e in ledger.events(workflow_id="wf-audit") if e.kind == "limit_exceeded"]
    assert refusal.tool == "t" and refusal.attempt is None
    assert refusal.detail is not None
    assert {k: refusal.detail[k] for k in ("limit", "scope", "used", "max", "requested", "on_exceed")} == {
        "limit": "one",
        "scope": "wf-audit",
        "used": 1,
        "max": 1,
        "requested": 1,
        "on_exceed": "raise",
    }
    assert ledger.reset_usage("one", "wf-audit", by="ops") == 1
    [reset] = [e for e in ledger.events(workflow_id="wf-audit") if e.kind == "limit_reset"]
    assert reset.owner == "ops" and reset.detail == {"limit": "one", "scope": "wf-audit"}
    assert run("wf-audit", n=2) == {"n": 2}  # the same call succeeds once the usage was reset
    assert ledger.reset_usage("nothing", "wf-audit", by="ops") == 0
    assert len(run.ran) == 2


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Limit(max=-1), "max"),
        (lambda: Limit(max=float("nan")), "max"),
        (lambda: Limit(max="10"), "max"),  # type: ignore[arg-type]
        (lambda: Limit(max=2**60), "max"),
        (lambda: Limit(max=1, per="galaxy"), "per"),  # type: ignore[arg-type]
        (lambda: Limit(max=1, window=0), "window"),
        (lambda: Limit(max=1, window=dt.timedelta(0)), "window"),
        (lambda: Limit(max=1, window=-5), "window"),
        (lambda: Limit(max=1, count=-2), "count"),
        (lambda: Limit(max=1, count=""), "count"),
        (lambda: Limit(max=1, on_exceed="ignore"), "on_exceed"),  # type: ignore[arg-type]
        (lambda: Limit(max=1, name="a\x00b"), "NUL"),
    ],
)
def test_bad_limits_are_refused_when_declared(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"n": 1}, "does not have"),
        ({"amount": "5"}, "str, not a finite number"),
        ({"amount": True}, "bool, not a finite number"),
        ({"amount": float("inf")}, "inf"),
        ({"amount": -3}, "negative"),
        ({"amount": 10**300}, "over the largest"),
    ],
)
def test_bad_amounts_are_refused_before_anything_runs(
    make_ledger: Callable[..., Ledger], mode: str, args: dict[str, Any], match: str
) -> None:
    ledger = make_ledger()
    run = Runs(ledger, mode, limits=[Limit(max=100, count="amount")])
    with pytest.raises(InvalidArguments, match=match):
        run("w-bad", **args)
    assert run.ran == [] and ledger.effects(workflow_id="w-bad") == [] and kinds(ledger, "w-bad") == []
    assert ledger.usage() == []


@pytest.mark.parametrize("mode", MODES)
def test_bad_counts_and_scopes_from_functions_are_refused(make_ledger: Callable[..., Ledger], mode: str) -> None:
    ledger = make_ledger()
    for limit, error in [
        (Limit(max=5, count=lambda call: -1), InvalidArguments),
        (Limit(max=5, count=lambda call: "many"), InvalidArguments),
        (Limit(max=5, count=lambda call: 1 / 0), ConfigurationError),
        (Limit(max=5, per=lambda call: ""), InvalidArguments),
        (Limit(max=5, per=lambda call: "x" * 300), InvalidArguments),
    ]:
        run = Runs(ledger, mode, limits=[limit])
        with pytest.raises(error):
            run("w-bad", n=1)
        assert run.ran == []
    assert ledger.effects(workflow_id="w-bad") == [] and ledger.usage() == []


def test_bad_limits_options_are_refused(make_ledger: Callable[..., Ledger]) -> None:
    with pytest.raises(ConfigurationError, match="list of Limit"):
        Ledger("sqlite://", limits=Limit(max=1))  # type: ignore[arg-type]
    ledger = make_ledger()
    with pytest.raises(ConfigurationError, match="Limit objects"):
        ledger.tool("x", limits=[{"max": 1}])(lambda: 1)  # type: ignore[list-item]
    keyed = make_ledger(redaction_key="k" * 32)
    secret = Runs(keyed, "sync", limits=[Limit(max=1, count="pin")], redact=["pin"])
    with pytest.raises(ConfigurationError, match="which the tool redacts"):
        secret(pin=1234)
    assert secret.ran == []
    long_tool = Runs(ledger, "sync", tool="t" * 250, limits=[Limit(max=1)])
    with pytest.raises(ConfigurationError, match="give the limit a name"):
        long_tool(n=1)
    assert long_tool.ran == []
    run = Runs(ledger, "sync", limits=[Limit(max=1, name="same"), Limit(max=2, name="same")])
    with pytest.raises(ConfigurationError, match="two different limits named 'same'"):
        run(n=1)
    assert run.ran == []
    for bad in ("", "x" * 300, "a\x00"):
        with pytest.raises(InvalidArguments):
            ledger.reset_usage(bad, "w", by="ops")
        with pytest.raises(InvalidArguments):
            ledger.reset_usage("n", "w", by=bad)
        with pytest.raises(InvalidArguments):
            ledger.usage(workflow_id=bad)


# -- usage listing --------------------------------------------------------------------------------------


def test_usage_lists_declared_budgets_and_filters(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(limits=[Limit(max=10, name="calls")])

    @ledger.tool("search", limits=[Limit(max=3, per="tool")])
    def search(q: str) -> str:
        return q

    @ledger.tool("pay", limits=[Limit(max=50, count="amount", name="spend")])
    def pay(amount: int) -> int:
        return amount

    def view(usage: list[LimitUsage]) -> list[tuple[str, str, float, float]]:
        return [(u.name, u.scope, u.used, u.remaining) for u in usage]

    # Nothing consumed yet: what is declared, with everything remaining.
    assert view(ledger.usage(workflow_id="w1")) == [
        ("calls", "w1", 0, 10),
        ("search:calls/tool", "search", 0, 3),
        ("spend", "w1", 0, 50),
    ]
    with ledger.workflow("w1"):
        search("a")
        pay(20)
    with ledger.workflow("w2"):
        search("b")
    assert view(ledger.usage(workflow_id="w1")) == [
        ("calls", "w1", 2, 8),
        ("search:calls/tool", "search", 2, 1),
        ("spend", "w1", 20, 30),
    ]
    assert view(ledger.usage(workflow_id="w2", tool="search")) == [
        ("calls", "w2", 1, 9),
        ("search:calls/tool", "search", 2, 1),
    ]
    assert view(ledger.usage(tool="pay")) == [("calls", "w1", 2, 8), ("calls", "w2", 1, 9), ("spend", "w1", 20, 30)]


# -- one statement on Postgres ---------------------------------------------------------------------------


def test_a_new_call_with_a_limit_costs_no_extra_round_trip_on_postgres(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted at the driver: every statement the hot path sends goes through psycopg's
    ``Connection.execute``. A new call with one limit sends as many statements as one without (the
    charge rides in the claim's statement); without limits the statements are the very same."""
    ledger = Ledger(pg_url, auto_migrate=True)
    ledger.migrate()
    ledger.run(ToolCall(workflow_id="warm", tool="t", args={"n": 0}), handler=lambda n: n)
    sent: list[str] = []
    real = psycopg.Connection.execute

    def counting(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)
    ledger._rt.hot._new_rate = 1.0  # both calls take the same statement order (claim first)
    ledger.run(ToolCall(workflow_id="w", tool="t", args={"n": 1}), handler=lambda n: n)
    plain = list(sent)
    sent.clear()
    ledger._rt.hot._new_rate = 1.0
    ledger.run(ToolCall(workflow_id="w", tool="t", args={"n": 2}), handler=lambda n: n, limits=[Limit(max=5)])
    limited = list(sent)
    assert len(plain) == len(limited) == 2, (plain, limited)
    assert "usage" not in plain[0] and "usage" in limited[0]
    assert [u.used for u in ledger.usage(workflow_id="w")] == [1]
    ledger.close()


def test_no_limits_means_no_charges(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    plan = ledger._call_plan(ToolCall(workflow_id="w", tool="t", args={}), lambda: 1, {})
    assert plan.charges == () and plan.limit_approval is None
    from agent_ledger._flow import _first_claim
    from agent_ledger._store import ClaimOrLoad

    claim = _first_claim(ClaimOrLoad, plan, EPOCH, EPOCH)
    assert claim.charges == ()
    work = ledger._rt.store.claim_or_load_op(claim)
    assert work.charges == () and work.fast is not None and work.fast.charges == ()


# -- CLI ------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_ledger", *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_cli_limits_and_reset(db_url: str, make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    run = Runs(ledger, "sync", limits=[Limit(max=2, name="calls")])
    run("wf-cli", n=1)
    run("wf-cli", n=2)
    run("other", n=1)
    out = _cli("limits", "--url", db_url)
    assert out.returncode == 0, out.stderr
    assert "calls" in out.stdout and "wf-cli" in out.stdout and "other" in out.stdout
    out = _cli("limits", "--url", db_url, "--workflow", "wf-cli", "--json")
    assert out.returncode == 0, out.stderr
    assert [(u["name"], u["scope"], u["used"], u["max"], u["remaining"]) for u in json.loads(out.stdout)] == [
        ("calls", "wf-cli", 2, 2, 0)
    ]
    with pytest.raises(LimitExceeded):
        run("wf-cli", n=3)
    out = _cli("limits", "reset", "calls", "wf-cli", "--by", "ops", "--url", db_url)
    assert out.returncode == 0, out.stderr
    assert "reset" in out.stdout
    assert run("wf-cli", n=3) == {"n": 3}
    assert "limit_reset" in kinds(ledger, "wf-cli")
    out = _cli("limits", "reset", "calls", "nobody", "--by", "ops", "--url", db_url)
    assert out.returncode == 1 and "nothing" in (out.stdout + out.stderr)
    out = _cli("limits", "reset", "calls", "wf-cli", "--url", db_url)
    assert out.returncode == 2  # --by is required
    assert len(run.ran) == 4


# -- the schema ---------------------------------------------------------------------------------


def test_recorded_steps_are_not_tools(make_ledger: Callable[..., Ledger]) -> None:
    """Model turns recorded with ``ledger.step`` do not consume the ledger's tool limits."""
    ledger = make_ledger(limits=[Limit(max=1, name="tool calls")])
    turns: list[int] = []

    def turn(n: int) -> int:
        turns.append(n)
        return n

    with ledger.workflow("wf-steps"):
        assert [ledger.step("think", turn, n) for n in range(3)] == [0, 1, 2]
    assert turns == [0, 1, 2] and ledger.usage() == []


def test_rows_of_removed_limits_are_harmless(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    run = Runs(ledger, "sync", limits=[Limit(max=1, name="old")])
    run(n=1)
    # The limit is gone from code: its row stays, nothing reads it, calls run.
    free = Runs(ledger, "sync")
    assert free(n=2) and free(n=3)
    assert [u.name for u in ledger.usage()] == ["old"]


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


def test_the_usage_table_has_one_row_per_budget_and_window(
    make_ledger: Callable[..., Ledger], engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)]
    monkeypatch.setattr(ledger_module, "utcnow", lambda: now[0])
    ledger = make_ledger()
    run = Runs(ledger, "sync", limits=[Limit(max=5, window=60, name="rate")])
    run(n=1)
    run(n=2)
    now[0] += dt.timedelta(minutes=1)
    run(n=3)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT name, scope, used, cap, per FROM agent_ledger_usage ORDER BY window_start"))
        assert [tuple(r) for r in rows] == [("rate", "w", 2, 5, "workflow"), ("rate", "w", 1, 5, "workflow")]
