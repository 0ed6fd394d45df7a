"""Leases, waiting, unknown outcomes, reconcile, resolve and the recovery sweeper (in one process).

The same guarantees under real processes, kills and restarts are in test_adversarial.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from _workers import stale_claim

from agent_ledger import (
    NOT_EXECUTED,
    ConfigurationError,
    Effect,
    InProgress,
    Ledger,
    LedgerError,
    OutcomeUnknown,
    RecordedError,
    Status,
    ToolCall,
    compute_key,
)

pytestmark = pytest.mark.pgbouncer  # leases, takeovers and sweeps also through PgBouncer

CALL = ToolCall(workflow_id="order-1", tool="stripe.charge", args={"amount": 100})
KEY = compute_key("order-1", "stripe.charge", {"amount": 100})


def test_wait_zero_raises_in_progress_with_owner_and_since(make_ledger: Callable[..., Ledger]) -> None:
    holder, other = make_ledger(), make_ledger()
    entered, release = threading.Event(), threading.Event()
    runs = 0

    def slow(amount: int) -> str:
        nonlocal runs
        runs += 1
        entered.set()
        release.wait(10)
        return "done"

    t = threading.Thread(target=lambda: holder.run(CALL, handler=slow))
    t.start()
    assert entered.wait(10)
    with pytest.raises(InProgress) as info:
        other.run(CALL, handler=slow, wait=0)
    assert info.value.key == KEY and info.value.owner == holder.owner and info.value.since is not None
    assert str(holder.owner) in str(info.value)
    with pytest.raises(InProgress):
        other.run(CALL, handler=slow, wait=dt.timedelta(milliseconds=50))
    release.set()
    t.join()
    # A waiter with time to spare gets the winner's result.
    assert other.run(CALL, handler=slow) == "done"
    assert runs == 1


def test_waiters_receive_the_winners_result(make_ledger: Callable[..., Ledger]) -> None:
    holder, waiter = make_ledger(), make_ledger()
    entered = threading.Event()
    runs = 0

    def slow(amount: int) -> dict[str, int]:
        nonlocal runs
        runs += 1
        entered.set()
        threading.Event().wait(0.3)
        return {"charged": amount}

    t = threading.Thread(target=lambda: holder.run(CALL, handler=slow))
    t.start()
    assert entered.wait(10)
    assert waiter.run(CALL, handler=slow, wait=10) == {"charged": 100}
    t.join()
    assert runs == 1


def test_waiters_get_the_winners_error_under_replay_policy(make_ledger: Callable[..., Ledger]) -> None:
    holder, waiter = make_ledger(), make_ledger()
    entered = threading.Event()
    runs = 0

    def failing(amount: int) -> None:
        nonlocal runs
        runs += 1
        entered.set()
        threading.Event().wait(0.2)
        raise ValueError("declined")

    def hold() -> None:
        with pytest.raises(ValueError):
            holder.run(CALL, handler=failing, on_error="replay")

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(10)
    with pytest.raises(RecordedError, match="declined"):
        waiter.run(CALL, handler=failing, on_error="replay", wait=10)
    t.join()
    assert runs == 1


def test_expired_lease_becomes_unknown_and_is_never_rerun(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    runs = 0

    def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "charged"

    for _ in range(3):
        with pytest.raises(OutcomeUnknown) as info:
            ledger.run(CALL, handler=charge)
    assert runs == 0
    err = info.value
    assert err.key == KEY and err.tool == "stripe.charge" and err.tool_args == {"amount": 100}
    assert err.owner == "elsewhere:4242:deadbeef" and "resolve" in str(err)
    (rec,) = ledger.history("order-1")
    assert rec.status is Status.UNKNOWN
    assert [e.kind for e in rec.events] == ["marked_unknown"]


def test_on_crash_retry_takes_over_with_the_same_idem_key(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    seen: list[Effect] = []

    def charge(amount: int, effect: Effect) -> str:
        seen.append(effect)
        return "charged"

    assert ledger.run(CALL, handler=charge, on_crash="retry") == "charged"
    assert ledger.run(CALL, handler=charge, on_crash="retry") == "charged"
    assert [(e.attempt, e.idem_key) for e in seen] == [(2, KEY)]
    (rec,) = ledger.history("order-1")
    takeover = next(e for e in rec.events if e.kind == "takeover")
    assert takeover.detail and takeover.detail["previous_owner"] == "elsewhere:4242:deadbeef"


def test_reconcile_found_returns_the_downstream_result_without_running(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    asked: list[Effect] = []
    runs = 0

    def lookup(effect: Effect) -> dict[str, str]:
        asked.append(effect)
        return {"charge": "ch_found"}

    def charge(amount: int) -> dict[str, str]:
        nonlocal runs
        runs += 1
        return {"charge": "ch_new"}

    assert ledger.run(CALL, handler=charge, reconcile=lookup) == {"charge": "ch_found"}
    assert ledger.run(CALL, handler=charge, reconcile=lookup) == {"charge": "ch_found"}
    assert runs == 0 and len(asked) == 1 and asked[0].idem_key == KEY


def test_reconcile_not_executed_runs_the_handler_once(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    runs = 0

    def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "ch_new"

    assert ledger.run(CALL, handler=charge, reconcile=lambda effect: NOT_EXECUTED) == "ch_new"
    assert ledger.run(CALL, handler=charge, reconcile=lambda effect: NOT_EXECUTED) == "ch_new"
    assert runs == 1
    (rec,) = ledger.history("order-1")
    assert rec.status is Status.SUCCEEDED
    assert [e.kind for e in rec.events] == ["reconcile", "reconciled", "succeeded", "replayed"]


def test_reconcile_that_raises_leaves_the_outcome_unknown(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)

    def broken(effect: Effect) -> Any:
        raise TimeoutError("downstream lookup timed out")

    with pytest.raises(OutcomeUnknown, match="reconcile raised"):
        ledger.run(CALL, handler=lambda amount: pytest.fail("ran"), reconcile=broken)
    (rec,) = ledger.history("order-1")
    assert rec.status is Status.UNKNOWN


@pytest.mark.parametrize("how", ["result", "error", "retry"])
def test_resolve_settles_an_unknown_effect(ledger: Ledger, how: str) -> None:
    stale_claim(ledger, CALL)
    with pytest.raises(OutcomeUnknown):
        ledger.run(CALL, handler=lambda amount: pytest.fail("ran"))
    runs = 0

    def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "ch_rerun"

    if how == "result":
        rec = ledger.resolve(KEY, result={"charge": "ch_manual"}, by="alice", reason="found in dashboard")
        assert rec.status is Status.SUCCEEDED
        assert ledger.run(CALL, handler=charge) == {"charge": "ch_manual"}
    elif how == "error":
        rec = ledger.resolve(KEY, error="card was declined", by="alice")
        assert rec.status is Status.FAILED
        with pytest.raises(RecordedError, match="card was declined"):
            ledger.run(CALL, handler=charge, on_error="replay")
    else:
        rec = ledger.resolve(KEY, retry=True, by="alice")
        assert rec.status is Status.PENDING
        assert ledger.run(CALL, handler=charge) == "ch_rerun"
        assert ledger.run(CALL, handler=charge) == "ch_rerun"
    assert runs == (1 if how == "retry" else 0)
    resolved = [e for e in ledger.history("order-1")[0].events if e.kind == "resolved"]
    assert len(resolved) == 1 and resolved[0].owner == "alice"


def test_resolve_refuses_bad_requests(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no effect"):
        ledger.resolve("v1:missing", retry=True, by="alice")
    key = stale_claim(ledger, CALL, ago=-60)  # a live lease held by another host
    with pytest.raises(LedgerError, match="live lease"):
        ledger.resolve(key, retry=True, by="alice")
    with pytest.raises(LedgerError, match="exactly one"):
        ledger.resolve(key, retry=True, result=1, by="alice")
    assert ledger.resolve(key, retry=True, by="alice", force=True).status is Status.PENDING
    ledger.run(CALL, handler=lambda amount: 1)
    with pytest.raises(LedgerError, match="succeeded"):
        ledger.resolve(key, retry=True, by="alice")


def test_interrupted_handler_is_recorded_unknown(ledger: Ledger) -> None:
    def interrupted(amount: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ledger.run(CALL, handler=interrupted)
    with pytest.raises(OutcomeUnknown):
        ledger.run(CALL, handler=lambda amount: pytest.fail("ran"))


async def test_cancelled_async_handler_is_recorded_unknown(ledger: Ledger) -> None:
    started = asyncio.Event()

    async def slow(amount: int) -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(ledger.run(CALL, handler=slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(OutcomeUnknown):
        await ledger.arun(CALL, handler=slow)
    await ledger.aclose()


async def test_async_heartbeat_keeps_a_long_call_alive(make_ledger: Callable[..., Ledger]) -> None:
    holder, other = make_ledger(lease=0.3), make_ledger(lease=0.3)
    runs = 0

    async def slow(amount: int) -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(1.2)  # four leases
        return "done"

    # Both ledgers make a first call before the race: a ledger's first call also sets itself up (schema
    # check, pooler detection, pools), which on a partitioned schema took longer than the 0.3 s lease
    # and let the holder's lease lapse; the test is about heartbeats during a long call, not about that.
    for led in (holder, other):
        await led.arun(ToolCall(workflow_id="warm-up", tool="noop", args={"n": id(led)}), handler=lambda n: n)
    task = asyncio.create_task(holder.run(CALL, handler=slow))
    await asyncio.sleep(0.05)
    refusals = 0
    while not task.done():
        with pytest.raises(InProgress):
            await other.arun(CALL, handler=slow, wait=0)
        refusals += 1
        await asyncio.sleep(0.1)
    assert await task == "done"
    assert await other.arun(CALL, handler=slow) == "done"
    assert runs == 1 and refusals >= 8
    await holder.aclose()
    await other.aclose()


def test_recover_marks_stale_effects_unknown_and_reconciles_registered_tools(ledger: Ledger) -> None:
    @ledger.tool("bank.transfer", reconcile=lambda effect: {"found": effect.args["n"]})
    def transfer(n: int) -> dict[str, int]:
        pytest.fail("must not run")

    @ledger.tool("mail.send", reconcile=lambda effect: NOT_EXECUTED)
    def send(n: int) -> str:
        return "sent"

    unknown = stale_claim(ledger, ToolCall(workflow_id="wf", tool="stripe.charge", args={"n": 1}))
    found = stale_claim(ledger, ToolCall(workflow_id="wf", tool="bank.transfer", args={"n": 2}))
    released = stale_claim(ledger, ToolCall(workflow_id="wf", tool="mail.send", args={"n": 3}))
    live = stale_claim(ledger, ToolCall(workflow_id="wf", tool="stripe.charge", args={"n": 4}), ago=-60)
    report = ledger.recover(batch_size=2)
    assert report.marked_unknown == [unknown]
    assert report.reconciled == [found]
    assert report.released == [released]
    status = {r.key: r.status for r in ledger.history("wf")}
    assert status == {unknown: Status.UNKNOWN, found: Status.SUCCEEDED, released: Status.PENDING, live: Status.RUNNING}
    with ledger.workflow("wf"):
        assert transfer(2) == {"found": 2}
        assert send(3) == "sent"
    assert ledger.recover().examined == 0


@pytest.mark.parametrize("driver", ["sync", "async"])
async def test_heartbeats_stop_once_the_claim_is_lost(
    make_ledger: Callable[..., Ledger], driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Both drivers' heartbeats keep a long call's lease alive, and stop (saying so once) when the claim
    is taken away from under them."""
    holder, other = make_ledger(lease=0.6), make_ledger(lease=0.6)
    runs = 0

    def steal_midway() -> None:
        import time

        time.sleep(0.9)  # beats every 0.2 s keep the 0.6 s lease alive past its first expiry
        assert other.effect(KEY).status is Status.RUNNING  # type: ignore[union-attr]
        other.resolve(KEY, retry=True, by="ops", force=True)  # the claim is gone: pending, no owner
        time.sleep(1.2)  # six more beat periods: a beat that did not stop would warn each time

    def slow(amount: int) -> str:
        nonlocal runs
        runs += 1
        steal_midway()
        return "done"

    async def aslow(amount: int) -> str:
        nonlocal runs
        runs += 1
        await asyncio.to_thread(steal_midway)
        return "done"

    caplog.set_level("WARNING", logger="agent_ledger")
    if driver == "sync":
        await asyncio.to_thread(holder.run, CALL, handler=slow)
    else:
        await holder.arun(CALL, handler=aslow)
    lost = [r for r in caplog.records if "lost the lease" in r.getMessage()]
    assert len(lost) == 1 and KEY in lost[0].getMessage()
    assert runs == 1
    await holder.aclose()
    await other.aclose()


# -- recovery through the flow, under either driver --------------------------------------------


def _reconcile_events(ledger: Ledger, key: str) -> list[dict[str, Any]]:
    return [dict(e.detail or {}) for e in ledger.events(key=key) if e.kind == "reconciled"]


def test_reconcile_details_reach_the_audit_trail_in_a_call(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    runs = 0

    def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "ch_new"

    assert ledger.run(CALL, handler=charge, reconcile=lambda effect: {"charge": "ch_found"}) == {"charge": "ch_found"}
    (found,) = _reconcile_events(ledger, KEY)
    assert found["reconciled"] is True and found["via"] == "call" and found["evidence"] == {"charge": "ch_found"}
    assert runs == 0


async def test_recover_inside_a_running_loop_refuses_and_arecover_reconciles(ledger: Ledger) -> None:
    """The bug: recover() in a running loop marked the effect unknown (asyncio.run() cannot run there)."""
    asked = runs = 0

    async def lookup(effect: Effect) -> dict[str, Any]:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0)
        return {"found": effect.args["n"], "attempt": effect.attempt}

    @ledger.tool("bank.transfer", reconcile=lookup)
    async def transfer(n: int) -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"ran": n}

    key = stale_claim(ledger, ToolCall(workflow_id="wf", tool="bank.transfer", args={"n": 2}))
    with pytest.raises(ConfigurationError, match="arecover"):
        ledger.recover()
    assert ledger.effect(key).status is Status.RUNNING  # type: ignore[union-attr]  # untouched, not unknown
    report = await ledger.arecover()
    assert report.reconciled == [key] and not report.failed and report.examined == 1
    (found,) = _reconcile_events(ledger, key)
    assert found["reconciled"] is True and found["via"] == "recover"
    assert found["evidence"] == {"found": 2, "attempt": 2}
    with ledger.workflow("wf"):
        assert await transfer(2) == {"found": 2, "attempt": 2}
    assert (asked, runs) == (1, 0)
    assert (await ledger.arecover()).examined == 0
    await ledger.aclose()


def test_recover_outside_a_loop_awaits_async_reconciles(ledger: Ledger) -> None:
    asked = 0

    async def lookup(effect: Effect) -> Any:
        nonlocal asked
        asked += 1
        return NOT_EXECUTED

    @ledger.tool("mail.send", reconcile=lookup)
    async def send(n: int) -> str:
        return "sent"

    key = stale_claim(ledger, ToolCall(workflow_id="wf", tool="mail.send", args={"n": 3}))
    report = ledger.recover()
    assert report.released == [key] and asked == 1
    assert ledger.effect(key).status is Status.PENDING  # type: ignore[union-attr]
    (note,) = _reconcile_events(ledger, key)
    assert note["reconciled"] is False and note["via"] == "recover"


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_recover_settles_each_outcome_through_the_flow(ledger: Ledger, driver: str) -> None:
    """found / NOT_EXECUTED / raised / no callback, each reconcile asked once and no handler run."""
    asked: dict[str, int] = {}
    runs = 0

    def asking(name: str, answer: Any) -> Callable[[Effect], Any]:
        def reconcile(effect: Effect) -> Any:
            asked[name] = asked.get(name, 0) + 1
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return reconcile

    def handler(n: int) -> str:
        nonlocal runs
        runs += 1
        return "ran"

    for name, answer in (
        ("found", {"receipt": "r-1"}),
        ("absent", NOT_EXECUTED),
        ("broken", TimeoutError("lookup timed out")),
    ):
        ledger.tool(f"t.{name}", reconcile=asking(name, answer), retention=3600)(handler)
    keys = {
        name: stale_claim(ledger, ToolCall(workflow_id="wf", tool=f"t.{name}", args={"n": 1}))
        for name in ("found", "absent", "broken", "plain")
    }

    async def arecover() -> Any:
        try:
            return await ledger.arecover(batch_size=3)
        finally:
            await ledger.aclose()

    report = ledger.recover(batch_size=3) if driver == "sync" else asyncio.run(arecover())
    assert report.reconciled == [keys["found"]] and report.released == [keys["absent"]]
    assert report.marked_unknown == [keys["plain"]] and report.examined == 4
    assert report.failed == {keys["broken"]: "TimeoutError: lookup timed out"}
    assert asked == {"found": 1, "absent": 1, "broken": 1} and runs == 0
    status = {r.key: r.status for r in ledger.history("wf")}
    assert status == {
        keys["found"]: Status.SUCCEEDED,
        keys["absent"]: Status.PENDING,
        keys["broken"]: Status.UNKNOWN,
        keys["plain"]: Status.UNKNOWN,
    }
    found = ledger.effect(keys["found"])
    assert found is not None and found.result == {"receipt": "r-1"}
    (ev,) = _reconcile_events(ledger, keys["found"])
    assert ev["via"] == "recover" and ev["evidence"] == {"receipt": "r-1"}
    broken = [e.detail for e in ledger.events(key=keys["broken"]) if e.kind == "unknown"]
    assert broken and broken[0] and broken[0]["via"] == "recover" and "lookup timed out" in broken[0]["reconcile_error"]
    assert ledger.recover().examined == 0
    assert asked == {"found": 1, "absent": 1, "broken": 1} and runs == 0
