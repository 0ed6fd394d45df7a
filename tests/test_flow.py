"""The flow driven by hand: no database, no clock, no processes.

Like httpx's ``tests/test_auth.py`` drives ``auth_flow``, each test takes ``execute(plan)`` (or the
sweeper, ``recover(sweep)``), answers every operation it yields with a canned value, and checks the
operations it asked for. The ledger's race paths (a lost claim, a fenced completion, a takeover, the
approval wait, the waiter backoff) are each a few lines of script and run in milliseconds. The store only
builds statements here; nothing executes them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from agent_ledger import _flow
from agent_ledger._decide import Policy
from agent_ledger._flow import (
    NOT_EXECUTED,
    ApprovalPolicy,
    Beat,
    Db,
    Invoke,
    NewId,
    Notify,
    Now,
    OwnerGone,
    Plan,
    Ran,
    Replayed,
    Sleep,
    StopBeat,
    Sweep,
    Unit,
    _AwaitableInSyncCall,
    execute,
    recover,
)
from agent_ledger._keys import normalise, payload_hash
from agent_ledger._schema import build_tables
from agent_ledger._store import ClaimOrLoad, Finish, Store, Work
from agent_ledger.errors import ApprovalPending, InProgress, OutcomeUnknown

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
ME = "here:100:mine"
OTHER = "here:200:other"
STORE = Store(build_tables("agent_ledger", None), "sqlite")


@pytest.fixture(autouse=True)
def no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow must not read the clock, the process table or make ids itself: those are operations."""

    def forbidden(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the flow did I/O of its own")

    for name in ("utcnow", "owner_gone", "make_owner"):
        monkeypatch.setattr(_flow, name, forbidden)
    monkeypatch.setattr(_flow, "uuid", SimpleNamespace(uuid4=forbidden))
    monkeypatch.setattr(_flow, "os", SimpleNamespace(getpid=forbidden, kill=forbidden))


def plan(**kw: Any) -> Plan:
    values: dict[str, Any] = {
        "store": STORE,
        "key": "v1:k",
        "workflow_id": "wf",
        "tool": "charge",
        "args": {"amount": 100},
        "call_args": {"amount": 100},
        "payload_hash": "h1",
        "invoke": lambda effect: pytest.fail("the scripted driver never calls functions"),
        "policy": Policy(),
        "owner": ME,
        "lease": 30.0,
        "wait": 30.0,
        "now": T0,
    }
    values.update(kw)
    return Plan(**values)


def row(status: str, **kw: Any) -> dict[str, Any]:
    """A stored effect as the store returns it."""
    values: dict[str, Any] = {
        "key": "v1:k",
        "workflow_id": "wf",
        "tool": "charge",
        "status": status,
        "attempt": 1,
        "payload_hash": "h1",
        "args": {"amount": 100},
        "owner": OTHER,
        "lease_expires_at": T0 + timedelta(seconds=30) if status == "running" else None,
        "started_at": T0,
        "result": None,
        "result_replayable": None,
        "result_repr": None,
        "error": None,
    }
    values.update(kw)
    return values


def params(work: Work, step: int = 0) -> Mapping[str, Any]:
    p = work.statements()[step][1]
    assert isinstance(p, Mapping)
    return p


def audit(work: Work) -> Mapping[str, Any]:
    """The audit row a unit of work writes (its last step)."""
    return params(work, len(work.statements()) - 1)


class Script:
    """Drives a flow by hand: ``expect`` the next operation, ``send`` its answer."""

    def __init__(self, flow: Generator[Any, Any, Any]) -> None:
        self.flow = flow
        self.op: Any = next(flow)
        self.done = False
        self.result: Any = None
        self.ops: list[Any] = [self.op]

    def expect(self, kind: type, label: str | None = None) -> Any:
        assert isinstance(self.op, kind), f"expected {kind.__name__}, the flow yielded {self.op!r}"
        if label is not None:
            assert self.op.work.label == label, self.op.work.label
        return self.op

    def send(self, answer: Any = None) -> Any:
        return self._step(lambda: self.flow.send(answer))

    def throw(self, error: BaseException) -> Any:
        return self._step(lambda: self.flow.throw(error))

    def _step(self, move: Any) -> Any:
        assert not self.done
        try:
            self.op = move()
        except StopIteration as stop:
            self.done, self.result, self.op = True, stop.value, None
            return None
        self.ops.append(self.op)
        return self.op


def ran(value: Any = None, error: BaseException | None = None, at: datetime = T0, took: float = 0.25) -> Ran:
    return (value, error, at, took)


# -- new calls and replays ----------------------------------------------------------------------


def test_a_new_call_claims_runs_and_records_in_one_pass() -> None:
    s = Script(execute(plan()))
    claim = s.expect(Db, "claim").work
    assert isinstance(claim.fast, ClaimOrLoad) and params(claim)["p_now"] == T0
    assert params(claim)["p_lease_expires_at"] == T0 + timedelta(seconds=30)
    s.send({"claimed": True})
    beat = s.expect(Beat)
    assert (beat.key, beat.owner, beat.attempt) == ("v1:k", ME, 1)
    s.send("handle")
    invoke = s.expect(Invoke)
    assert invoke.effect.attempt == 1 and invoke.effect.idem_key == "v1:k" and invoke.role == "handler"
    done = T0 + timedelta(seconds=1)
    s.send(ran({"ok": True}, at=done))
    finish = s.expect(Db, "succeed").work
    assert params(finish)["p_now"] == done and params(finish)["p_result"] == {"ok": True}
    s.send(1)
    assert s.expect(StopBeat).handle == "handle"
    s.send()
    assert s.done and s.result == {"ok": True}
    assert not any(isinstance(op, (Now, Sleep, OwnerGone)) for op in s.ops)  # nothing extra on the hot path


def test_a_replay_is_one_read_and_a_buffered_record() -> None:
    s = Script(execute(plan()))
    s.expect(Db, "claim")
    s.send({"claimed": False, **row("succeeded", result={"ok": 1}, result_replayable=True)})
    replayed = s.expect(Replayed)
    assert replayed.event["kind"] == "replayed" and replayed.event["at"] == T0
    s.send()
    assert s.done and s.result == {"ok": 1} and len(s.ops) == 2


def test_without_a_plan_time_the_flow_asks_the_driver() -> None:
    s = Script(execute(plan(now=None)))
    s.expect(Now)
    later = T0 + timedelta(hours=1)
    s.send((later, 5.0))
    assert params(s.expect(Db, "claim").work)["p_now"] == later


# -- races ----------------------------------------------------------------------------------


def test_a_claim_lost_to_a_racing_worker_waits_for_and_returns_its_result() -> None:
    s = Script(execute(plan()))
    s.expect(Db, "claim")
    s.send(None)  # a concurrent claim won between our lookup and our insert
    s.expect(Db, "claim")  # decide again on nothing: claim again
    s.send(None)  # lost again
    s.expect(Db, "load")
    s.send(row("running"))  # the winner is running, with a live lease
    assert s.expect(OwnerGone).owner == OTHER
    s.send(False)
    s.expect(Now)
    s.send((T0, 50.0))
    assert s.expect(Sleep).seconds == pytest.approx(0.002)
    s.send((T0 + timedelta(milliseconds=2), 50.002))
    s.expect(Db, "load")
    s.send(row("succeeded", result="theirs", result_replayable=True))
    s.expect(Replayed)
    s.send()
    assert s.done and s.result == "theirs"
    assert not any(isinstance(op, (Invoke, Beat)) for op in s.ops)  # the handler never ran here


def test_a_retry_lost_to_a_racing_worker_looks_again() -> None:
    failed = row("failed", error={"type": "builtins.ValueError", "message": "x", "classes": []}, owner=None)
    s = Script(execute(plan()))
    s.send({"claimed": False, **failed})
    retry = s.expect(Db, "retry").work
    assert params(retry)["p_expected_attempt"] == 1 and params(retry)["p_expected_status"] == "failed"
    s.send(0)  # someone else retried first
    s.expect(Db, "load")
    s.send(row("succeeded", attempt=2, result=7, result_replayable=True))
    s.expect(Replayed)
    s.send()
    assert s.result == 7 and not any(isinstance(op, Invoke) for op in s.ops)


@pytest.mark.parametrize("outcome", ["succeed", "fail"])
def test_a_fenced_completion_becomes_a_late_completion(outcome: str) -> None:
    s = Script(execute(plan()))
    s.send({"claimed": True})
    s.expect(Beat)
    s.send(1)
    s.expect(Invoke)
    done = T0 + timedelta(seconds=40)
    if outcome == "succeed":
        s.send(ran("mine", at=done, took=40.0))
    else:
        s.send(ran(error=ValueError("declined"), at=done, took=40.0))
    assert isinstance(s.expect(Db, outcome).work.fast, Finish)
    s.send(0)  # fenced off: our lease was taken over while the handler ran
    late = s.expect(Db, "late_completion").work
    detail = audit(late)["p_detail"]
    assert detail["outcome"] == outcome and detail["duration_ms"] == 40000.0
    assert audit(late)["p_attempt"] == 1 and audit(late)["p_at"] == done
    if outcome == "succeed":
        assert detail["result"] == "mine"
    else:
        assert detail["error"]["message"] == "declined"
    s.send(1)
    s.expect(StopBeat)
    if outcome == "succeed":
        s.send()
        assert s.done and s.result == "mine"  # the late caller still gets its own result
    else:
        with pytest.raises(ValueError, match="declined"):
            s.send()


# -- crashes --------------------------------------------------------------------------------


def test_a_dead_claim_is_taken_over_under_on_crash_retry() -> None:
    s = Script(execute(plan(policy=Policy(on_crash="retry"))))
    s.send({"claimed": False, **row("running")})  # lease still live, but its process is gone
    s.expect(OwnerGone)
    s.send(True)
    takeover = s.expect(Db, "takeover").work
    assert params(takeover)["p_observed_lease"] == T0 + timedelta(seconds=30)
    assert audit(takeover)["p_detail"]["reason"] == "owner process gone"
    assert audit(takeover)["p_attempt"] == 2
    s.send(1)
    assert s.expect(Beat).attempt == 2
    s.send(1)
    effect = s.expect(Invoke).effect
    assert effect.attempt == 2 and effect.idem_key == "v1:k"
    s.send(ran("again"))
    s.expect(Db, "succeed")
    s.send(1)
    s.expect(StopBeat)
    s.send()
    assert s.result == "again"


def test_a_dead_claim_is_marked_unknown_under_the_default_policy() -> None:
    s = Script(execute(plan()))
    s.send({"claimed": False, **row("running")})
    s.expect(OwnerGone)
    s.send(True)
    marked = s.expect(Db, "mark_unknown").work
    assert audit(marked)["p_detail"] == {"by": ME, "reason": "its process is gone"}
    assert audit(marked)["p_owner"] == OTHER  # the worker that vanished
    s.send(1)
    s.expect(Db, "load")
    with pytest.raises(OutcomeUnknown):
        s.send(row("unknown", lease_expires_at=None))
    assert not any(isinstance(op, Invoke) for op in s.ops)


def test_an_expired_lease_needs_no_liveness_check_when_local_detection_is_off() -> None:
    expired = row("running", lease_expires_at=T0 - timedelta(seconds=1))
    s = Script(execute(plan(policy=Policy(on_crash="retry"), detect_local_crashes=False)))
    s.send({"claimed": False, **expired})
    takeover = s.expect(Db, "takeover").work
    assert "reason" not in audit(takeover)["p_detail"]


def test_a_reconciled_result_is_recorded_with_its_evidence_in_the_same_unit() -> None:
    s = Script(execute(plan(policy=Policy(has_reconcile=True), reconcile=lambda e: None)))
    s.send({"claimed": False, **row("unknown", lease_expires_at=None)})
    s.expect(Db, "reconcile")
    s.send(1)
    s.expect(Beat)
    s.send(1)
    assert s.expect(Invoke).role == "reconcile"
    s.send(ran({"charge": "ch_1"}))
    work = s.expect(Db, "reconciled").work
    assert params(work)["p_status"] == "succeeded" and params(work)["p_result"] == {"charge": "ch_1"}
    detail = audit(work)["p_detail"]
    assert detail["reconciled"] is True and detail["via"] == "call" and detail["evidence"] == {"charge": "ch_1"}
    s.send(1)
    s.expect(StopBeat)
    s.send()
    assert s.result == {"charge": "ch_1"}
    assert sum(isinstance(op, Invoke) for op in s.ops) == 1  # the handler was not run


def test_reconcile_not_executed_is_noted_then_the_handler_runs() -> None:
    s = Script(execute(plan(policy=Policy(has_reconcile=True), reconcile=lambda e: None)))
    s.send({"claimed": False, **row("unknown", lease_expires_at=None)})
    s.send(1)
    s.send(1)
    s.send(ran(NOT_EXECUTED))
    note = s.expect(Db, "reconciled").work
    assert audit(note)["p_detail"]["reconciled"] is False and audit(note)["p_detail"]["via"] == "call"
    s.send(1)
    assert s.expect(Invoke).role == "handler"
    s.send(ran("new"))
    s.expect(Db, "succeed")
    s.send(1)
    s.expect(StopBeat)
    s.send()
    assert s.result == "new"


# -- the sync driver's refusal of awaitables ----------------------------------------------------


@pytest.mark.parametrize("started", [False, True])
def test_an_awaitable_in_a_sync_call_is_recorded_honestly(started: bool) -> None:
    s = Script(execute(plan()))
    s.send({"claimed": True})
    s.send(1)
    s.expect(Invoke)
    refused = _AwaitableInSyncCall("charge", "handler", object(), started)
    s.send(ran(error=refused))
    if started:  # a task or future may be running: nobody knows whether the side effect happens
        assert isinstance(s.expect(Db, "mark_unknown").work.fast, Finish)
    else:  # an unstarted coroutine was closed: nothing ran, the next call runs the handler
        released = s.expect(Db, "resolve_retry").work
        assert params(released)["p_expected_status"] == "running" and params(released)["p_status"] == "pending"
    s.send(1)
    s.expect(StopBeat)
    with pytest.raises(_AwaitableInSyncCall):
        s.send()


# -- waiting ----------------------------------------------------------------------------------


def test_the_waiter_backs_off_on_schedule_then_gives_up() -> None:
    """2 ms doubling to 5 ms for the first second, 10 ms until two seconds, then doubling to 100 ms."""
    live = row("running", lease_expires_at=T0 + timedelta(hours=1))
    s = Script(execute(plan(wait=3.0)))
    s.send({"claimed": False, **live})
    s.expect(OwnerGone)
    s.send(False)
    s.expect(Now)
    mono = 1000.0
    s.send((T0, mono))
    sleeps: list[float] = []
    with pytest.raises(InProgress) as info:
        while True:
            pause = s.expect(Sleep).seconds
            sleeps.append(pause)
            mono += pause
            s.send((T0 + timedelta(seconds=mono - 1000.0), mono))
            s.expect(Db, "load")
            s.send(live)
            s.expect(OwnerGone)
            s.send(False)
    assert info.value.owner == OTHER
    assert sleeps[:4] == pytest.approx([0.002, 0.004, 0.005, 0.005])
    first_second = [p for i, p in enumerate(sleeps) if sum(sleeps[:i]) < 1.0]
    assert max(first_second) == pytest.approx(0.005)
    after_two = [p for i, p in enumerate(sleeps) if sum(sleeps[:i]) >= 2.0]
    assert after_two[:6] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1])
    assert sum(sleeps) == pytest.approx(3.0)  # the last pause ends exactly at the wait budget
    assert len(sleeps) < 420  # backing off: far fewer polls than 3 s at 5 ms


def test_a_waiter_wakes_when_the_lease_ends_and_decides_again() -> None:
    soon = T0 + timedelta(milliseconds=1.5)
    s = Script(execute(plan(policy=Policy(on_crash="retry"))))
    s.send({"claimed": False, **row("running", lease_expires_at=soon)})
    s.send(False)  # owner alive
    s.send((T0, 0.0))
    assert s.expect(Sleep).seconds == pytest.approx(0.002)  # min(backoff 2 ms, lease end + 1 ms = 2.5 ms)
    s.send((T0 + timedelta(milliseconds=3), 0.003))
    s.send(row("running", lease_expires_at=soon))
    s.send(False)
    s.expect(Db, "takeover")  # decided with the time the Sleep answer brought: the lease is over


# -- approvals --------------------------------------------------------------------------------


def approval(status: str, **kw: Any) -> dict[str, Any]:
    values = {
        "id": "apr_1",
        "key": "v1:k",
        "workflow_id": "wf",
        "tool": "charge",
        "status": status,
        "expires_at": T0 + timedelta(hours=1),
        "decided_by": None,
        "reason": None,
        "channel_state": None,
    }
    values.update(kw)
    return values


def approval_plan(wait: float) -> Plan:
    return plan(
        approval=ApprovalPolicy(ttl=3600.0, approvers=("alice",), wait=wait),
        payload_hash=payload_hash("charge", normalise({"amount": 100}, "args")),  # checked before running
    )


def test_the_approval_loop_requests_notifies_waits_and_runs_once_approved() -> None:
    s = Script(execute(approval_plan(wait=10.0)))
    s.expect(Db, "load")
    s.send(None)
    s.expect(Now)
    s.send((T0, 0.0))
    assert not s.expect(Db, "approval").work.write  # the latest approval of this payload
    s.send(None)
    assert s.expect(NewId).prefix == "apr_"
    s.send("apr_1")
    request = s.expect(Db, "approval").work
    assert request.write and params(request)["p_id"] == "apr_1" and params(request)["p_approvers"] == ["alice"]
    assert params(request)["p_expires_at"] == T0 + timedelta(hours=1)
    s.send({"id": "apr_1"})
    s.expect(Db, "approval")  # the fresh row, for the channels
    s.send(approval("pending"))
    assert s.expect(Notify).approval["id"] == "apr_1"
    s.send()
    s.expect(Now)
    s.send((T0, 0.001))
    sleeps = []
    mono = 0.001
    for _ in range(3):
        s.expect(Db, "approval")
        s.send(approval("pending"))
        sleeps.append(s.expect(Sleep).seconds)
        mono += sleeps[-1]
        s.send((T0 + timedelta(seconds=mono), mono))
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])
    s.expect(Db, "approval")
    s.send(approval("approved", decided_by="alice"))
    claim = s.expect(Db, "claim").work
    assert claim.all_or_nothing  # the claim consumes the approval in the same unit, or neither happens
    s.send({"attempt": 1})
    s.expect(Beat)
    s.send(1)
    s.expect(Invoke)
    s.send(ran("charged"))
    s.expect(Db, "succeed")
    s.send(1)
    s.send()
    assert s.result == "charged"


def test_the_approval_loop_hands_a_pending_request_back_after_its_wait() -> None:
    s = Script(execute(approval_plan(wait=0.05)))
    s.send(None)  # load
    s.send((T0, 0.0))  # Now
    mono = 0.0
    with pytest.raises(ApprovalPending) as info:
        while True:
            s.expect(Db, "approval")
            s.send(approval("pending"))
            pause = s.expect(Sleep).seconds
            mono += pause
            s.send((T0, mono))
    assert info.value.approval_id == "apr_1"
    assert mono == pytest.approx(0.05)
    assert not any(isinstance(op, (Invoke, NewId)) for op in s.ops)


# -- the sweeper ------------------------------------------------------------------------------


def drive_unit(unit: Unit, answers: Iterator[Any]) -> tuple[Any, list[Any]]:
    """Run a Unit's steps against scripted answers (as the driver would inside one transaction)."""
    seen: list[Any] = []
    steps = unit.steps
    try:
        item = next(steps)
        while True:
            seen.append(item)
            item = steps.send(next(answers))
    except StopIteration as stop:
        return stop.value, seen


def test_the_sweeper_claims_in_one_unit_and_reconciles_through_the_flow() -> None:
    sweep = Sweep(
        store=STORE,
        owner=ME,
        lease=30.0,
        host_prefix="here:%",
        batch_size=10,
        tools={"bank.transfer": (lambda e: None, None)},
    )
    expired = T0 - timedelta(seconds=5)
    stale = [
        row("running", key="v1:a", tool="charge", lease_expires_at=expired, owner="far:1:x"),
        row("running", key="v1:b", tool="bank.transfer", lease_expires_at=expired, owner="far:1:x"),
        row("running", key="v1:c", tool="charge", lease_expires_at=T0 + timedelta(seconds=60), owner=OTHER),
    ]
    s = Script(recover(sweep))
    s.expect(Now)
    s.send((T0, 0.0))
    unit = s.expect(Unit)
    batch, seen = drive_unit(unit, iter([stale, False, 1, False, 1, False]))
    assert [getattr(w, "label", type(w).__name__) for w in seen] == [
        "recover",
        "OwnerGone",
        "mark_unknown",
        "OwnerGone",
        "reconcile",
        "OwnerGone",
    ]
    assert audit(seen[2])["p_detail"]["via"] == "recover"
    s.send(batch)
    assert s.expect(Beat).key == "v1:b"
    s.send(1)
    invoke = s.expect(Invoke)
    assert invoke.role == "reconcile" and invoke.effect.attempt == 2
    s.send(ran({"found": True}))
    work = s.expect(Db, "reconciled").work
    assert audit(work)["p_detail"]["via"] == "recover" and audit(work)["p_detail"]["evidence"] == {"found": True}
    s.send(1)
    s.expect(StopBeat)
    s.send()
    assert s.done
    report = s.result
    assert report.marked_unknown == ["v1:a"] and report.reconciled == ["v1:b"]
    assert report.skipped == 1 and report.examined == 2 and not report.failed


def test_the_sweeper_reports_a_reconcile_that_raised_and_leaves_it_unknown() -> None:
    sweep = Sweep(STORE, ME, 30.0, "here:%", 10, {"charge": (lambda e: None, None)}, detect_local_crashes=False)
    stale = [row("running", lease_expires_at=T0 - timedelta(seconds=5), owner="far:1:x")]
    s = Script(recover(sweep))
    s.send((T0, 0.0))
    batch, _ = drive_unit(s.expect(Unit), iter([stale, 1]))
    s.send(batch)
    s.send(1)  # Beat
    s.send(ran(error=TimeoutError("provider down")))
    marked = s.expect(Db, "mark_unknown").work
    detail = audit(marked)["p_detail"]
    assert detail["reconcile_error"] == "TimeoutError: provider down" and detail["via"] == "recover"
    s.send(1)
    s.expect(StopBeat)
    s.send()
    assert s.result.failed == {"v1:k": "TimeoutError: provider down"}


# -- limits ---------------------------------------------------------------------------------


def _charges(*, on_exceed: str = "raise") -> tuple[Any, ...]:
    from agent_ledger._decide import Charge
    from agent_ledger._limits import EPOCH

    return (
        Charge("calls", "wf", "workflow", None, EPOCH, None, 1.0, 10.0),
        Charge("spend", "wf", "workflow", "charge", EPOCH, None, 100.0, 250.0, on_exceed),  # type: ignore[arg-type]
    )


def test_a_claim_over_budget_is_refused_audited_and_runs_nothing() -> None:
    from agent_ledger._limits import EPOCH
    from agent_ledger._store import EXCEEDED
    from agent_ledger.errors import LimitExceeded

    charges = _charges()
    s = Script(execute(plan(charges=charges)))
    claim = s.expect(Db, "claim").work
    assert claim.fast.charges == charges and len(claim.charges) == 2  # the claim carries its charges
    s.send(EXCEEDED)  # nothing was written
    s.expect(Db, "usage")
    s.send(
        [
            {"name": "calls", "scope": "wf", "window_start": EPOCH, "used": 3.0},
            {"name": "spend", "scope": "wf", "window_start": EPOCH, "used": 200.0},
        ]
    )
    event = s.expect(Db, "limit_exceeded").work
    detail = audit(event)["p_detail"]
    assert (detail["limit"], detail["used"], detail["max"], detail["requested"]) == ("spend", 200.0, 250.0, 100.0)
    with pytest.raises(LimitExceeded) as refused:
        s.send(1)
    assert str(refused.value).startswith("budget spend/wf used 200 of 250; this call needs 100.")
    assert not any(isinstance(op, (Invoke, Beat)) for op in s.ops)


def test_a_budget_freed_in_between_claims_again() -> None:
    """The claim was refused but the budgets read back have room (a reset, a new window): claim again."""
    from agent_ledger._store import EXCEEDED

    s = Script(execute(plan(charges=_charges())))
    s.expect(Db, "claim")
    s.send(EXCEEDED)
    s.expect(Db, "usage")
    s.send([])  # reset in between: nothing used
    s.expect(Db, "load")
    s.send(None)
    claim = s.expect(Db, "claim").work
    assert len(claim.charges) == 2 and not any(c.forced for c in claim.fast.charges)
    s.send({"attempt": 1})
    s.expect(Beat)


def test_over_budget_with_on_exceed_approval_asks_and_the_approved_claim_is_forced() -> None:
    from agent_ledger._limits import EPOCH
    from agent_ledger._store import EXCEEDED

    policy = ApprovalPolicy(ttl=3600.0, approvers=None, wait=0.0)
    s = Script(execute(plan(charges=_charges(on_exceed="approval"), limit_approval=policy)))
    s.expect(Db, "claim")
    s.send(EXCEEDED)
    s.expect(Db, "usage")
    s.send([{"name": "spend", "scope": "wf", "window_start": EPOCH, "used": 200.0}])
    s.expect(Db, "limit_exceeded")
    s.send(1)
    s.expect(Now)
    s.send((T0, 0.0))
    s.expect(Db, "approval")  # the newest request for this exact payload
    approved = {"id": "apr_1", "status": "approved", "expires_at": T0 + timedelta(hours=1), "decided_by": "boss"}
    s.send(approved)
    s.expect(Db, "load")
    s.send(None)
    claim = s.expect(Db, "claim").work
    # The approved call runs past the limit: its charges are forced, the approval consumed with the claim.
    assert claim.fast is None and claim.all_or_nothing and len(claim.charges) == 2
    assert all(stmt is STORE._charge_forced for stmt, _ in claim.charges)
    s.send({"attempt": 1})
    s.expect(Beat)
