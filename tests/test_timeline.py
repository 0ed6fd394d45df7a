"""The one query layer (issue 15): ``ledger.timeline`` tells a workflow's whole story in time order,
``ledger.workflows`` lists workflows newest first with counts, filters and a cursor, on SQLite and
Postgres, with a fixed number of queries whatever the number of effects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event

from agent_ledger import (
    ApprovalPending,
    ApprovalRefused,
    InvalidArguments,
    Ledger,
    PayloadMismatch,
    Status,
    ToolCall,
)
from agent_ledger._timeline import build_timeline, displayable

REFUND = ToolCall(workflow_id="order-1", tool="payments.refund", args={"amount": 10000, "card": "4242"})
KEY = "k" * 32


class Runs:
    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def refund(self, amount: int, card: str) -> dict[str, Any]:
        self.n["refund"] = self.n.get("refund", 0) + 1
        return {"refund_id": "re_1", "amount": amount}

    def flaky(self, n: int) -> str:
        self.n["flaky"] = self.n.get("flaky", 0) + 1
        if self.n["flaky"] == 1:
            raise ValueError("upstream timeout")
        return "ok"

    def crash(self, order: str) -> None:
        self.n["crash"] = self.n.get("crash", 0) + 1
        raise KeyboardInterrupt  # the worker dies mid-call: the outcome is unknown


def _story(ledger: Ledger, runs: Runs) -> str:
    """A workflow with a quorum approval, a replay, a refusal, a failure then a retry, an unknown
    outcome resolved by hand. Returns the approval id."""
    opts: dict[str, Any] = {"requires_approval": True, "approvers": ["alice", "bob"], "quorum": 2, "redact": ["card"]}
    with pytest.raises(ApprovalPending) as info:
        ledger.run(REFUND, runs.refund, **opts)
    approval_id = info.value.approval_id
    ledger.approve(approval_id, by="alice", reason="customer called")
    with pytest.raises(ApprovalRefused):
        ledger.approve(approval_id, by="mallory")
    ledger.approve(approval_id, by="bob")
    assert ledger.run(REFUND, runs.refund, **opts) == {"refund_id": "re_1", "amount": 10000}
    assert ledger.run(REFUND, runs.refund, **opts) == {"refund_id": "re_1", "amount": 10000}
    flaky = ToolCall(workflow_id="order-1", tool="inventory.reserve", args={"n": 1})
    with pytest.raises(ValueError):
        ledger.run(flaky, runs.flaky, on_error="retry")
    assert ledger.run(flaky, runs.flaky, on_error="retry") == "ok"
    crash = ToolCall(workflow_id="order-1", tool="email.send", args={"order": "o1"})
    with pytest.raises(KeyboardInterrupt):
        ledger.run(crash, runs.crash)
    unknown = ledger.effects(workflow_id="order-1", status="unknown")
    assert len(unknown) == 1
    ledger.resolve(unknown[0].key, result={"sent": True}, by="carol", reason="checked the mail log")
    return approval_id


def test_timeline_tells_the_whole_story_in_time_order(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(redaction_key=KEY)
    runs = Runs()
    approval_id = _story(ledger, runs)
    ledger.flush()
    assert runs.n == {"refund": 1, "flaky": 2, "crash": 1}
    t = ledger.timeline("order-1")
    kinds = [(e.kind, e.tool) for e in t.entries]
    refund = [k for k, tool in kinds if tool == "payments.refund"]
    # request -> votes (a refusal in between) -> approval -> its use -> the execution -> a replay
    assert refund == [
        "approval_requested",
        "approval_vote",
        "approval_refused",
        "approved",
        "approval_consumed",
        "called",
        "succeeded",
        "replayed",
    ]
    assert [k for k, tool in kinds if tool == "inventory.reserve"] == ["called", "failed", "retry", "succeeded"]
    assert [k for k, tool in kinds if tool == "email.send"] == ["called", "unknown", "resolved"]
    assert [e.at for e in t.entries] == sorted(e.at for e in t.entries)
    vote = next(e for e in t.entries if e.kind == "approval_vote")
    assert vote.by == "alice" and vote.approval_id == approval_id and "1 of 2" in vote.summary
    assert "customer called" in vote.summary
    refused = next(e for e in t.entries if e.kind == "approval_refused")
    assert refused.by == "mallory" and refused.summary.startswith("approval refused: 'mallory' may not decide")
    failed = next(e for e in t.entries if e.kind == "failed")
    assert failed.attempt == 1 and "upstream timeout" in failed.summary and failed.duration_ms is not None
    resolved = next(e for e in t.entries if e.kind == "resolved")
    assert resolved.by == "carol" and "unknown -> succeeded" in resolved.summary
    # effects, with replays, attempts and durations; the redacted card never shows its stored hash
    by_tool = {e.tool: e for e in t.effects}
    assert by_tool["payments.refund"].replays == 1 and by_tool["payments.refund"].args == {
        "amount": 10000,
        "card": "[redacted]",
    }
    assert by_tool["inventory.reserve"].attempts == 2 and by_tool["inventory.reserve"].status is Status.SUCCEEDED
    assert by_tool["payments.refund"].duration_ms is not None
    assert "4242" not in t.model_dump_json() and "hmac-sha256" not in t.model_dump_json()
    # quorum progress on the request
    (request,) = t.approvals
    assert request.approved_by == ["alice", "bob"] and request.progress == "2 of 2 approvals: alice, bob"
    assert t.counts == {"succeeded": 3} and not t.needs_human
    assert t.first_at is not None and t.last_at is not None and t.first_at <= t.last_at


def test_timeline_of_a_payload_mismatch_and_a_pending_request(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    n = {"calls": 0}

    def charge(order: str, amount: int) -> int:
        n["calls"] += 1
        return amount

    charge_1 = ToolCall(workflow_id="w", tool="charge", args={"order": "o1", "amount": 1})
    ledger.run(charge_1, charge, key=["order"])
    with pytest.raises(PayloadMismatch):
        ledger.run(charge_1.model_copy(update={"args": {"order": "o1", "amount": 2}}), charge, key=["order"])
    with pytest.raises(ApprovalPending):
        wire = ToolCall(workflow_id="w", tool="wire", args={"order": "o2", "amount": 5})
        ledger.run(wire, charge, requires_approval=True)
    assert n["calls"] == 1
    t = ledger.timeline("w")
    refusal = next(e for e in t.entries if e.kind == "refused")
    assert "other arguments" in refusal.summary and "amount" in refusal.summary
    assert t.pending_approvals == 1 and t.needs_human
    empty = ledger.timeline("nobody")
    assert empty.empty and empty.entries == [] and not empty.needs_human
    assert ledger.timeline("a\x00b").empty  # a name that could never be stored finds nothing


def test_build_timeline_reads_late_completions_and_running_attempts() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row = {
        "key": "v1:a",
        "workflow_id": "w",
        "tool": "t",
        "status": "running",
        "attempt": 2,
        "args": {"pin": {"$redacted": "hmac-sha256:ab"}},
        "result": None,
        "result_replayable": None,
        "result_repr": None,
        "error": None,
        "owner": "host:2:x",
        "lease_expires_at": now + timedelta(seconds=30),
        "created_at": now - timedelta(seconds=10),
        "started_at": now - timedelta(seconds=1),
        "finished_at": None,
    }
    late = {
        "key": "v1:a",
        "workflow_id": "w",
        "tool": "t",
        "kind": "late_completion",
        "attempt": 1,
        "owner": "host:1:y",
        "at": now,
        "detail": {"status": "succeeded", "result": {"pin": {"$redacted": "hmac-sha256:cd"}}},
    }
    t = build_timeline("w", [row], [late], [], now)
    assert [e.kind for e in t.entries] == ["called", "running", "late_completion"]
    assert "late completion" in t.entries[2].summary and t.entries[2].attempt == 1
    assert t.entries[2].detail == {"status": "succeeded", "result": {"pin": "[redacted]"}}
    assert t.effects[0].args == {"pin": "[redacted]"} and t.counts == {"running": 1}
    over = dict(
        late,
        kind="limit_exceeded",
        attempt=None,
        detail={"limit": "refunds", "scope": "w", "used": 3.0, "max": 3.0, "requested": 1.0},
    )
    (entry,) = build_timeline("w", [], [over], [], now).entries
    assert entry.summary == "refused: over the limit refunds (w): 3.0 of 3.0 used, 1.0 requested"
    assert displayable([{"$redacted": "x"}, {"$redacted": "x", "other": 1}]) == [
        "[redacted]",
        {"$redacted": "x", "other": 1},
    ]


@contextmanager
def _statements(ledger: Ledger) -> Iterator[list[str]]:
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    engine = ledger._rt.engine
    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)


def test_timeline_and_list_take_a_fixed_number_of_queries(make_ledger: Callable[..., Ledger]) -> None:
    """No query per effect: a workflow of 2 effects and one of 30 take the same number of SELECTs."""
    ledger = make_ledger()
    calls = {"n": 0}

    def work(i: int) -> int:
        calls["n"] += 1
        return i

    for i in range(2):
        ledger.run(ToolCall(workflow_id="small", tool="t", args={"i": i}), work)
    for i in range(30):
        ledger.run(ToolCall(workflow_id="large", tool="t", args={"i": i}), work)
    assert calls["n"] == 32
    ledger.timeline("small")  # warm: schema checks, pool
    counts = []
    for workflow_id in ("small", "large"):
        with _statements(ledger) as seen:
            t = ledger.timeline(workflow_id)
        counts.append(len(seen))
        assert len(t.effects) == (2 if workflow_id == "small" else 30)
    assert counts[0] == counts[1] <= 3
    with _statements(ledger) as seen:
        page = ledger.workflows()
    assert len(seen) == 1 and [w.workflow_id for w in page.workflows] == ["large", "small"]


def test_workflows_filters_orders_and_pages(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(redaction_key=KEY)
    runs = Runs()
    _story(ledger, runs)  # order-1: three succeeded effects, nothing waiting
    ledger.run(ToolCall(workflow_id="order-2", tool="t", args={}), lambda: 1)
    with pytest.raises(KeyboardInterrupt):
        ledger.run(ToolCall(workflow_id="order-3", tool="email.send", args={"order": "o3"}), runs.crash)
    with pytest.raises(ApprovalPending):
        ledger.run(ToolCall(workflow_id="order-4", tool="wire", args={"n": 1}), lambda n: n, requires_approval=True)
    page = ledger.workflows()
    assert [w.workflow_id for w in page.workflows] == ["order-4", "order-3", "order-2", "order-1"]
    assert page.next_cursor is None
    by_id = {w.workflow_id: w for w in page.workflows}
    assert by_id["order-1"].counts == {"succeeded": 3} and by_id["order-1"].effects == 3
    assert not by_id["order-1"].needs_human and by_id["order-1"].first_at < by_id["order-1"].last_at
    assert by_id["order-3"].unknown == 1 and by_id["order-3"].needs_human
    assert by_id["order-4"].pending_approvals == 1 and by_id["order-4"].effects == 0 and by_id["order-4"].needs_human
    assert [w.workflow_id for w in ledger.workflows(status="needs_human").workflows] == ["order-4", "order-3"]
    assert [w.workflow_id for w in ledger.workflows(status=Status.UNKNOWN).workflows] == ["order-3"]
    assert [w.workflow_id for w in ledger.workflows(status="succeeded").workflows] == ["order-2", "order-1"]
    assert len(ledger.workflows(since=timedelta(hours=1)).workflows) == 4
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert ledger.workflows(since=future).workflows == []
    assert len(ledger.workflows(until=future).workflows) == 4
    # pages of one, following the cursor, give every workflow once, in the same order
    seen, cursor = [], None
    while True:
        one = ledger.workflows(limit=1, cursor=cursor)
        seen += [w.workflow_id for w in one.workflows]
        cursor = one.next_cursor
        if cursor is None:
            break
    assert seen == ["order-4", "order-3", "order-2", "order-1"]
    for bad in ("nonsense", "", "x" * 3000, "WyJ4Il0"):
        with pytest.raises(InvalidArguments):
            ledger.workflows(cursor=bad)
    for bad_limit in (0, 501, True):
        with pytest.raises(InvalidArguments):
            ledger.workflows(limit=bad_limit)
    with pytest.raises(InvalidArguments):
        ledger.workflows(status="exploded")
    with pytest.raises(InvalidArguments):
        ledger.workflows(since=datetime(2026, 1, 1))  # naive
