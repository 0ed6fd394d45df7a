"""Approvals bound to the exact payload: single use, expiring, allowlisted, first decision wins."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _workers
import pytest
from _workers import read_lines

from agent_ledger import (
    Approval,
    ApprovalMismatch,
    ApprovalPending,
    ApprovalRefused,
    ApprovalRejected,
    ApprovalStatus,
    Ledger,
    PayloadMismatch,
    ToolCall,
    compute_key,
)
from agent_ledger.approvals import CallbackChannel

ctx = mp.get_context("spawn")
CHARGE = ToolCall(workflow_id="order-456", tool="stripe.charge", args={"amount": 100, "customer": "cus_123"})


class Charges:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, amount: int, customer: str) -> dict[str, Any]:
        self.calls.append({"amount": amount, "customer": customer})
        return {"charged": amount}


def test_approval_is_requested_then_runs_once_then_replays(ledger: Ledger) -> None:
    charge = Charges()
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=charge, requires_approval=True)
    err = info.value
    assert err.key == compute_key("order-456", "stripe.charge", CHARGE.args) and err.tool == "stripe.charge"
    assert err.tool_args == CHARGE.args and "approval" in str(err)
    (pending,) = ledger.pending_approvals()
    assert pending.approval_id == err.approval_id and pending.args == CHARGE.args
    assert pending.workflow_id == "order-456" and pending.key == err.key and pending.payload_hash.startswith("v1:")
    assert pending.requested_at < pending.expires_at
    # Asking again does not open a second request.
    with pytest.raises(ApprovalPending) as again:
        ledger.run(CHARGE, handler=charge, requires_approval=True)
    assert again.value.approval_id == err.approval_id and len(ledger.pending_approvals()) == 1
    assert charge.calls == []

    approved = ledger.approve(err.approval_id, by="alice", reason="looks right")
    assert approved.status is ApprovalStatus.APPROVED and approved.decided_by == "alice"
    assert ledger.run(CHARGE, handler=charge, requires_approval=True) == {"charged": 100}
    for _ in range(3):  # a succeeded key replays without asking again
        assert ledger.run(CHARGE, handler=charge, requires_approval=True) == {"charged": 100}
    assert charge.calls == [{"amount": 100, "customer": "cus_123"}]
    assert ledger.approval(err.approval_id).status is ApprovalStatus.CONSUMED  # type: ignore[union-attr]
    assert ledger.pending_approvals() == []
    kinds = [e.kind for e in ledger.history("order-456")[0].events]
    assert kinds[:4] == ["approval_requested", "approved", "approval_consumed", "succeeded"]
    decided = ledger.history("order-456")[0].events[1]
    assert decided.owner == "alice" and decided.detail and decided.detail["reason"] == "looks right"


def test_you_approved_100_the_agent_charged_10000(ledger: Ledger) -> None:
    """The product page's scenario: changed args are a new request; the old approval cannot authorise them."""
    charge = Charges()
    with pytest.raises(ApprovalPending) as first:
        ledger.run(CHARGE, handler=charge, requires_approval=True)
    ledger.approve(first.value.approval_id, by="alice")
    bigger = ToolCall(workflow_id="order-456", tool="stripe.charge", args={"amount": 10_000, "customer": "cus_123"})
    with pytest.raises(ApprovalPending) as second:
        ledger.run(bigger, handler=charge, requires_approval=True)
    assert second.value.approval_id != first.value.approval_id
    assert charge.calls == []
    assert ledger.run(CHARGE, handler=charge, requires_approval=True) == {"charged": 100}
    with pytest.raises(ApprovalPending):
        ledger.run(bigger, handler=charge, requires_approval=True)
    assert charge.calls == [{"amount": 100, "customer": "cus_123"}]


def test_key_subset_cannot_smuggle_a_changed_payload(ledger: Ledger) -> None:
    charge = Charges()
    opts: dict[str, Any] = {"requires_approval": True, "key": ["customer"]}
    with pytest.raises(ApprovalPending) as first:
        ledger.run(CHARGE, handler=charge, **opts)
    ledger.approve(first.value.approval_id, by="alice")
    bigger = ToolCall(workflow_id="order-456", tool="stripe.charge", args={"amount": 10_000, "customer": "cus_123"})
    # Same key (same customer), different payload: the $100 approval does not cover it.
    with pytest.raises(ApprovalPending) as second:
        ledger.run(bigger, handler=charge, **opts)
    assert second.value.key == first.value.key and second.value.approval_id != first.value.approval_id
    ledger.approve(second.value.approval_id, by="alice")  # even approved, the key now belongs to the first payload
    assert ledger.run(CHARGE, handler=charge, **opts) == {"charged": 100}
    with pytest.raises(PayloadMismatch, match="amount"):
        ledger.run(bigger, handler=charge, **opts)
    assert charge.calls == [{"amount": 100, "customer": "cus_123"}]


def test_predicate_asks_only_when_it_says_so(ledger: Ledger) -> None:
    charge = Charges()

    @ledger.tool("stripe.charge", requires_approval=lambda call: call.args["amount"] > 100)
    def tool(amount: int, customer: str) -> dict[str, Any]:
        return charge(amount, customer)

    with ledger.workflow("wf"):
        assert tool(50, "cus_1") == {"charged": 50}
        with pytest.raises(ApprovalPending):
            tool(500, "cus_1")
    assert charge.calls == [{"amount": 50, "customer": "cus_1"}]


def test_rejection_is_final_for_that_payload(ledger: Ledger) -> None:
    charge = Charges()
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=charge, requires_approval=True)
    ledger.reject(info.value.approval_id, by="bob", reason="customer asked for a refund instead")
    for _ in range(2):
        with pytest.raises(ApprovalRejected) as rejected:
            ledger.run(CHARGE, handler=charge, requires_approval=True)
    err = rejected.value
    assert err.by == "bob" and err.reason == "customer asked for a refund instead"
    assert "rejected by bob" in str(err) and "Do not retry" in str(err)
    with pytest.raises(ApprovalRefused, match="already rejected"):
        ledger.approve(info.value.approval_id, by="alice")
    assert charge.calls == []


def test_unlisted_approver_is_refused_and_audited(ledger: Ledger) -> None:
    charge = Charges()
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=charge, requires_approval=True, approvers={"alice", "U123"})
    with pytest.raises(ApprovalRefused, match="'mallory' may not decide"):
        ledger.approve(info.value.approval_id, by="mallory")
    assert ledger.approval(info.value.approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    ledger.approve(info.value.approval_id, by="U123")
    assert ledger.run(CHARGE, handler=charge, requires_approval=True, approvers={"alice", "U123"}) == {"charged": 100}
    events = ledger.history("order-456")[0].events
    refused = [e for e in events if e.kind == "approval_refused"]
    assert len(refused) == 1 and refused[0].owner == "mallory"
    assert len(charge.calls) == 1


def test_requests_and_unused_approvals_expire(ledger: Ledger) -> None:
    charge = Charges()
    opts: dict[str, Any] = {"requires_approval": True, "approval_ttl": 0.3}
    with pytest.raises(ApprovalPending) as first:
        ledger.run(CHARGE, handler=charge, **opts)
    time.sleep(0.4)
    with pytest.raises(ApprovalRefused, match="expired"):
        ledger.approve(first.value.approval_id, by="alice")
    assert ledger.approval(first.value.approval_id).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]
    with pytest.raises(ApprovalPending) as second:
        ledger.run(CHARGE, handler=charge, **opts)
    assert second.value.approval_id != first.value.approval_id
    ledger.approve(second.value.approval_id, by="alice")
    time.sleep(0.4)  # approved but not used in time
    with pytest.raises(ApprovalPending) as third:
        ledger.run(CHARGE, handler=charge, **opts)
    assert third.value.approval_id not in (first.value.approval_id, second.value.approval_id)
    assert ledger.approval(second.value.approval_id).status is ApprovalStatus.EXPIRED  # type: ignore[union-attr]
    assert charge.calls == []
    assert ledger.history("order-456") == []  # no effect was ever claimed
    kinds = [e.kind for e in ledger.events(workflow_id="order-456")]
    assert kinds == [
        "approval_requested",
        "approval_expired",
        "approval_refused",  # the late decision
        "approval_requested",
        "approved",
        "approval_expired",  # approved, but not used in time
        "approval_requested",
    ]
    assert len(ledger.pending_approvals()) == 1


def test_an_approval_is_used_once(ledger: Ledger) -> None:
    attempts = 0

    def flaky(amount: int, customer: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("gateway timeout")
        return "charged"

    with pytest.raises(ApprovalPending) as first:
        ledger.run(CHARGE, handler=flaky, requires_approval=True)
    ledger.approve(first.value.approval_id, by="alice")
    with pytest.raises(ConnectionError):
        ledger.run(CHARGE, handler=flaky, requires_approval=True)
    # The retry of a failed attempt needs a new decision: the first approval was consumed.
    with pytest.raises(ApprovalPending) as second:
        ledger.run(CHARGE, handler=flaky, requires_approval=True)
    assert second.value.approval_id != first.value.approval_id
    with pytest.raises(ApprovalRefused, match="already consumed"):
        ledger.approve(first.value.approval_id, by="alice")
    ledger.approve(second.value.approval_id, by="alice")
    assert ledger.run(CHARGE, handler=flaky, requires_approval=True) == "charged"
    assert attempts == 2


def test_args_mutated_after_approval_are_refused(ledger: Ledger) -> None:
    charge_calls: list[Any] = []
    meta = {"note": "monthly"}
    call = ToolCall(workflow_id="order-9", tool="stripe.charge", args={"amount": 100, "meta": meta})
    outcome: list[BaseException | Any] = []

    def charge(amount: int, meta: dict[str, str]) -> str:
        charge_calls.append((amount, dict(meta)))
        return "charged"

    def agent() -> None:
        try:
            outcome.append(ledger.run(call, handler=charge, requires_approval=True, approval_wait=20))
        except Exception as e:
            outcome.append(e)

    t = threading.Thread(target=agent)
    t.start()
    deadline = time.monotonic() + 20
    while not ledger.pending_approvals() and time.monotonic() < deadline:
        time.sleep(0.01)
    (pending,) = ledger.pending_approvals()
    meta["note"] = "and also buy a yacht"  # bait and switch while the approver reads
    ledger.approve(pending.approval_id, by="alice")
    t.join(30)
    assert isinstance(outcome[0], ApprovalMismatch)
    assert charge_calls == []
    (rec,) = ledger.history("order-9")
    assert rec.error is not None and rec.error.type == "agent_ledger.errors.ApprovalMismatch"


def test_blocking_wait_returns_once_approved(make_ledger: Callable[..., Ledger]) -> None:
    charge = Charges()
    seen: list[Approval] = []
    led = make_ledger(channels=[CallbackChannel(seen.append)])

    def approver() -> None:
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        led.approve(seen[0].approval_id, by="alice")

    t = threading.Thread(target=approver)
    t.start()
    assert led.run(CHARGE, handler=charge, requires_approval=True, approval_wait=20) == {"charged": 100}
    t.join()
    assert len(charge.calls) == 1 and seen[0].args == CHARGE.args


async def test_async_wait_returns_once_approved(ledger: Ledger) -> None:
    runs = 0

    async def charge(amount: int, customer: str) -> str:
        nonlocal runs
        runs += 1
        return "charged"

    async def approver() -> None:
        while not ledger.pending_approvals():
            await asyncio.sleep(0.01)
        ledger.approve(ledger.pending_approvals()[0].approval_id, by="alice")

    result, _ = await asyncio.gather(
        ledger.run(CHARGE, handler=charge, requires_approval=True, approval_wait=20), approver()
    )
    assert result == "charged" and runs == 1
    with pytest.raises(ApprovalPending):
        await ledger.arun(
            ToolCall(workflow_id="o", tool="t", args={"amount": 1, "customer": "c"}),
            handler=charge,
            requires_approval=True,
        )
    assert runs == 1
    await ledger.aclose()


def test_failing_channel_never_loses_the_request(make_ledger: Callable[..., Ledger]) -> None:
    def broken(approval: Approval) -> None:
        raise ConnectionError("slack is down")

    led = make_ledger(channels=[CallbackChannel(broken, name="pager")])
    with pytest.raises(ApprovalPending) as info:
        led.run(CHARGE, handler=Charges(), requires_approval=True)
    events = [e for e in led.events(workflow_id="order-456") if e.kind == "notification_failed"]
    assert events and events[0].detail and "slack is down" in events[0].detail["error"]
    assert led.approve(info.value.approval_id, by="alice").status is ApprovalStatus.APPROVED


def test_concurrent_decisions_exactly_one_wins(db_url: str, ledger: Ledger) -> None:
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=Charges(), requires_approval=True)
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(
            target=_workers.decide_approval,
            args=(db_url, info.value.approval_id, "approve" if i % 2 else "reject", f"user{i}", barrier, results),
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(30)
    winners = [o for o in outcomes if o[2] == "won"]
    assert len(winners) == 1
    assert all(o[2].startswith("it is already") for o in outcomes if o[2] != "won")
    final = ledger.approval(info.value.approval_id)
    assert final is not None and final.decided_by == winners[0][0]
    assert final.status is (ApprovalStatus.APPROVED if winners[0][1] == "approve" else ApprovalStatus.REJECTED)
    assert ledger.history("order-456") == []  # nothing ran
    events = ledger.events(workflow_id="order-456")
    decisions = [e.kind for e in events if e.kind in ("approved", "rejected")]
    assert len(decisions) == 1 and sum(e.kind == "approval_refused" for e in events) == n - 1


def test_approval_in_one_process_execution_in_another(db_url: str, ledger: Ledger, tmp_path: Path) -> None:
    ledger.migrate()
    log, results = str(tmp_path / "charges.log"), ctx.Queue()
    first = ctx.Process(target=_workers.approval_call, args=(db_url, log, 100, results))
    first.start()
    kind, approval_id = results.get(timeout=120)
    first.join(30)
    assert kind == "pending"
    ledger.approve(approval_id, by="alice")
    second = ctx.Process(target=_workers.approval_call, args=(db_url, log, 100, results))
    second.start()
    assert results.get(timeout=120) == ("ok", {"charged": 100})
    second.join(30)
    third = ctx.Process(target=_workers.approval_call, args=(db_url, log, 100, results))
    third.start()
    assert results.get(timeout=120) == ("ok", {"charged": 100})
    third.join(30)
    assert len(read_lines(log)) == 1


def test_cli_lists_approves_and_rejects(ledger: Ledger, db_url: str) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent_ledger", "approvals", *args, "--url", db_url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    ids = []
    for amount in (100, 200):
        call = ToolCall(workflow_id="cli", tool="stripe.charge", args={"amount": amount, "customer": "c"})
        with pytest.raises(ApprovalPending) as info:
            ledger.run(call, handler=Charges(), requires_approval=True, approvers={"alice"})
        ids.append(info.value.approval_id)
    listed = json.loads(cli("list", "--json").stdout)
    assert [a["approval_id"] for a in listed] == ids
    table = cli("list")
    assert ids[0] in table.stdout and "stripe.charge" in table.stdout
    assert cli("approve", ids[0], "--by", "alice").returncode == 0
    refused = cli("reject", ids[1], "--by", "mallory", "--reason", "no")
    assert refused.returncode == 1 and "may not decide" in refused.stderr
    assert cli("reject", ids[1], "--by", "alice", "--reason", "too much").returncode == 0
    statuses: Callable[[str], Any] = lambda i: ledger.approval(i).status  # type: ignore[union-attr]  # noqa: E731
    assert (statuses(ids[0]), statuses(ids[1])) == (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)


class Announcer:
    """A channel that counts what it is told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requested: list[str] = []
        self.decided_ids: list[str] = []

    def request(self, approval: Approval) -> dict[str, str]:
        self.requested.append(approval.approval_id)
        return {"seen": self.name}

    def decided(self, approval: Approval, state: Any) -> None:
        assert state == {"seen": self.name}  # what request() returned is handed back
        self.decided_ids.append(approval.approval_id)


def test_the_approval_service_is_what_the_ledger_delegates_to(make_ledger: Callable[..., Ledger]) -> None:
    pager = Announcer("pager")
    led = make_ledger(channels=[pager])
    charge = Charges()
    with pytest.raises(ApprovalPending) as info:
        led.run(CHARGE, handler=charge, requires_approval=True, approvers=["alice"])
    approval_id = info.value.approval_id
    service = led.approvals
    assert [a.approval_id for a in service.pending()] == [approval_id]
    assert service.pending() == led.pending_approvals()
    assert service.pending(tool="another.tool") == [] and service.pending(workflow_id="order-456") != []
    assert service.get(approval_id) == led.approval(approval_id) and service.get("apr_nope") is None
    with pytest.raises(ApprovalRefused, match="'mallory' may not decide"):
        service.approve(approval_id, by="mallory")
    # An inbound endpoint decides first and announces after answering: notify=False, then announce.
    approved = service.approve(approval_id, by="alice", reason="ok", notify=False)
    assert approved.status is ApprovalStatus.APPROVED and pager.decided_ids == []
    service.announce_decision(approval_id)
    assert pager.requested == pager.decided_ids == [approval_id]
    with pytest.raises(ApprovalRefused, match="already approved"):
        service.reject(approval_id, by="alice", reason="too late")
    assert led.run(CHARGE, handler=charge, requires_approval=True, approvers=["alice"]) == {"charged": 100}
    assert led.run(CHARGE, handler=charge, requires_approval=True, approvers=["alice"]) == {"charged": 100}
    assert len(charge.calls) == 1
    kinds = [e.kind for e in led.events(workflow_id="order-456")]
    assert kinds.count("approval_refused") == 2 and kinds.count("approved") == 1
    assert kinds.count("notified") == 2  # the request and the decision, one channel each


async def test_ledger_channels_are_exactly_the_channels_notified(make_ledger: Callable[..., Ledger]) -> None:
    first, second = Announcer("first"), Announcer("second")
    led = make_ledger(channels=[first, second])
    assert led.channels == (first, second) and led.channels is led.approvals.channels
    with pytest.raises(AttributeError):
        led.channels.append(Announcer("third"))  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        led.channels = ()  # type: ignore[misc]
    charge = Charges()
    with pytest.raises(ApprovalPending) as sync_info:
        led.run(CHARGE, handler=charge, requires_approval=True)
    other = ToolCall(workflow_id="order-789", tool="stripe.charge", args={"amount": 5, "customer": "cus_9"})

    async def acharge(amount: int, customer: str) -> dict[str, Any]:
        return charge(amount, customer)

    with pytest.raises(ApprovalPending) as async_info:
        await led.arun(other, handler=acharge, requires_approval=True)
    expected = [sync_info.value.approval_id, async_info.value.approval_id]
    assert [c.requested for c in led.channels] == [expected, expected]
    led.reject(expected[0], by="bob", reason="no")
    assert [c.decided_ids for c in led.channels] == [[expected[0]], [expected[0]]]
    assert charge.calls == []
    await led.aclose()
