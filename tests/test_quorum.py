"""Approvals a payments or deploy team can run: M-of-N quorum with vetoes and distinct approvers,
separation of duties, routing rules, superseded requests, and the approval state machine."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import _workers
import pytest
import sqlalchemy as sa
from _workers import read_lines

from agent_ledger import (
    Approval,
    ApprovalPending,
    ApprovalRefused,
    ApprovalRejected,
    ApprovalStatus,
    ConfigurationError,
    IllegalTransition,
    InvalidArguments,
    Ledger,
    ToolCall,
)
from agent_ledger._decide import (
    APPROVAL_TRANSITIONS,
    Vote,
    VoteRefused,
    approval_sources,
    approval_transition,
    judge_vote,
)
from agent_ledger.approvals import CallbackChannel

ctx = mp.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
FINANCE = ["fay", "fred", "fiona"]
SUPPORT = ["sam", "sue"]


class Refunds:
    """A refund handler that counts its executions."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, order: str, amount: int) -> dict[str, Any]:
        self.calls.append((order, amount))
        return {"refunded": amount}


def refund_call(amount: int, order: str = "ord_1", workflow: str = "refund-1") -> ToolCall:
    return ToolCall(workflow_id=workflow, tool="refunds.issue", args={"order": order, "amount": amount})


def pending_id(ledger: Ledger, call: ToolCall, handler: Callable[..., Any], **options: Any) -> str:
    with pytest.raises(ApprovalPending) as info:
        ledger.run(call, handler=handler, requires_approval=True, **options)
    return info.value.approval_id


# -- the state machine, without a database ----------------------------------------------------

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def request_row(**over: Any) -> dict[str, Any]:
    row = {
        "id": "apr_1",
        "key": "v1:k",
        "tool": "refunds.issue",
        "payload_hash": "v1:p",
        "status": "pending",
        "expires_at": NOW + timedelta(hours=1),
        "approvers": None,
        "quorum": 2,
        "approved_by": [],
        "requested_by": None,
        "decided_by": None,
    }
    row.update(over)
    return row


def test_the_documented_approval_diagram_is_the_approval_table() -> None:
    text = (ROOT / "docs" / "approvals.md").read_text()
    diagram = text.split("stateDiagram-v2", 1)[1].split("```", 1)[0]
    drawn = set()
    for src, dst, label in re.findall(r"^\s*(\S+) --> (\S+): (.+)$", diagram, re.M):
        for event in re.sub(r"\(.*\)", "", label).split("/"):
            drawn.add((None if src == "[*]" else src, event.strip(), dst))
    table = {
        (s.value if s else None, e, n.value) for s, moves in APPROVAL_TRANSITIONS.items() for e, n in moves.items()
    }
    assert drawn == table


def test_approval_table_every_status_reachable_settled_ones_final() -> None:
    seen: set[ApprovalStatus | None] = {None}
    frontier: list[ApprovalStatus | None] = [None]
    while frontier:
        for nxt in APPROVAL_TRANSITIONS[frontier.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == {None, *ApprovalStatus}
    for final in (ApprovalStatus.REJECTED, ApprovalStatus.EXPIRED, ApprovalStatus.SUPERSEDED, ApprovalStatus.CONSUMED):
        assert APPROVAL_TRANSITIONS[final] == {}
    with pytest.raises(IllegalTransition):
        approval_transition(ApprovalStatus.CONSUMED, "approve")
    with pytest.raises(IllegalTransition):
        approval_transition(ApprovalStatus.REJECTED, "supersede")
    assert approval_transition(ApprovalStatus.PENDING, "vote") is ApprovalStatus.PENDING
    assert set(approval_sources("supersede")) == {"pending", "approved"}
    assert approval_sources("consume") == ("approved",)


def test_judge_vote_rules_without_a_database() -> None:
    def judge(row: dict[str, Any], by: str = "fay", decision: Any = "approve", ran_with: str | None = None) -> Any:
        return judge_vote(row, decision=decision, by=by, now=NOW, ran_with=ran_with)

    assert judge(request_row()) == Vote("vote")  # the first of two
    assert judge(request_row(approved_by=["fred"])) == Vote("approve")  # reaches the quorum
    assert judge(request_row(quorum=1)) == Vote("approve")
    assert judge(request_row(approved_by=["fred"]), decision="reject") == Vote("reject")  # a veto
    twice = judge(request_row(approved_by=["fay"]))
    assert isinstance(twice, VoteRefused) and "already voted" in twice.why
    assert isinstance(judge(request_row(approved_by=["fay"]), decision="reject"), VoteRefused)
    own = judge(request_row(requested_by="fay", approvers=["fay", "fred"]))
    assert isinstance(own, VoteRefused) and "separation of duties" in own.why
    other = judge(request_row(approvers=FINANCE), by="sam")
    assert isinstance(other, VoteRefused) and "may not decide" in other.why
    late = judge(request_row(expires_at=NOW))
    assert isinstance(late, VoteRefused) and "expired" in late.why
    gone = judge(request_row(), ran_with="v1:other")
    assert gone == VoteRefused("superseded: the call ran with other arguments")
    assert judge(request_row(), ran_with="v1:p") == Vote("vote")  # its own payload ran: not superseded
    assert judge(request_row(status="superseded")) == VoteRefused("superseded: the call ran with other arguments")
    settled = judge(request_row(status="approved", decided_by="fred"))
    assert isinstance(settled, VoteRefused) and "already approved (by fred)" in settled.why


# -- quorum, vetoes, distinct approvers ----------------------------------------------------------


def test_quorum_two_of_three_runs_once_after_the_second_distinct_approval(ledger: Ledger) -> None:
    refunds = Refunds()
    opts: dict[str, Any] = {"approvers": FINANCE, "quorum": 2}
    call = refund_call(2500)
    aid = pending_id(ledger, call, refunds, **opts)
    (pending,) = ledger.pending_approvals()
    assert pending.quorum == 2 and pending.approved_by == [] and pending.progress == "0 of 2 approvals"

    first = ledger.approve(aid, by="fred", reason="invoice checked")
    assert first.status is ApprovalStatus.PENDING and first.approved_by == ["fred"] and first.decided_by is None
    assert first.progress == "1 of 2 approvals: fred"
    with pytest.raises(ApprovalPending):  # short of the quorum: the call still waits
        ledger.run(call, handler=refunds, requires_approval=True, **opts)
    with pytest.raises(ApprovalRefused, match="already voted"):  # the same person counts once
        ledger.approve(aid, by="fred")
    assert ledger.approval(aid).approved_by == ["fred"]  # type: ignore[union-attr]

    done = ledger.approve(aid, by="fay", reason="ok")
    assert done.status is ApprovalStatus.APPROVED and done.approved_by == ["fred", "fay"]
    assert done.decided_by == "fay" and done.reason == "ok"
    with pytest.raises(ApprovalRefused, match="already approved"):  # a third vote comes too late
        ledger.approve(aid, by="fiona")
    assert ledger.run(call, handler=refunds, requires_approval=True, **opts) == {"refunded": 2500}
    assert ledger.run(call, handler=refunds, requires_approval=True, **opts) == {"refunded": 2500}
    assert refunds.calls == [("ord_1", 2500)]

    events = ledger.events(workflow_id="refund-1")
    votes = [
        (e.kind, e.owner, (e.detail or {}).get("reason")) for e in events if e.kind in ("approval_vote", "approved")
    ]
    assert votes == [("approval_vote", "fred", "invoice checked"), ("approved", "fay", "ok")]
    refused = [e for e in events if e.kind == "approval_refused"]
    assert [e.owner for e in refused] == ["fred", "fiona"] and all(e.at for e in refused)


def test_one_rejection_vetoes_a_partly_approved_request(ledger: Ledger) -> None:
    refunds = Refunds()
    call = refund_call(5000)
    aid = pending_id(ledger, call, refunds, approvers=FINANCE, quorum=2)
    ledger.approve(aid, by="fay")
    vetoed = ledger.reject(aid, by="fiona", reason="duplicate refund")
    assert vetoed.status is ApprovalStatus.REJECTED and vetoed.decided_by == "fiona"
    assert vetoed.approved_by == ["fay"]  # who approved before the veto stays on record
    with pytest.raises(ApprovalRejected, match="duplicate refund"):
        ledger.run(call, handler=refunds, requires_approval=True, approvers=FINANCE, quorum=2)
    with pytest.raises(ApprovalRefused, match="already rejected"):
        ledger.approve(aid, by="fred")
    assert refunds.calls == []


def test_a_veto_by_someone_not_allowed_is_refused(ledger: Ledger) -> None:
    aid = pending_id(ledger, refund_call(5000), Refunds(), approvers=FINANCE, quorum=2)
    with pytest.raises(ApprovalRefused, match="may not decide"):
        ledger.reject(aid, by="mallory", reason="no")
    assert ledger.approval(aid).status is ApprovalStatus.PENDING  # type: ignore[union-attr]


def test_three_processes_approve_one_quorum_two_request_at_once(db_url: str, ledger: Ledger, tmp_path: Path) -> None:
    ledger.migrate()
    refunds = Refunds()
    opts: dict[str, Any] = {"approvers": {"ann", "bob", "cat"}, "quorum": 2}
    aid = pending_id(ledger, refund_call(2500), refunds, **opts)
    log, barrier, results = str(tmp_path / "refunds.log"), ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_workers.approve_then_charge, args=(db_url, aid, who, barrier, results, log))
        for who in ("ann", "bob", "cat")
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    recorded = [o for o in outcomes if o[1] == "recorded"]
    assert len(recorded) == 2, outcomes  # exactly two votes land
    late = [o for o in outcomes if o[1] != "recorded"]
    # the third finds it approved, or already used by the call of the one whose vote reached the quorum
    assert len(late) == 1 and re.match(r"it is already (approved|consumed)", late[0][1]), outcomes
    final = ledger.approval(aid)
    assert final is not None and final.status is ApprovalStatus.CONSUMED
    assert sorted(final.approved_by) == sorted(o[0] for o in recorded) and final.decided_by == final.approved_by[1]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        votes = conn.execute(sa.text("SELECT approver FROM agent_ledger_approval_votes ORDER BY id")).scalars().all()
    engine.dispose()
    assert votes == final.approved_by  # one row per vote, in the order they landed
    kinds = [e.kind for e in ledger.events(workflow_id="refund-1")]
    assert kinds.count("approved") == 1 and kinds.count("approval_vote") == 1
    assert kinds.count("approval_consumed") == 1
    assert len(read_lines(log)) == 1  # the handler ran once, across all three processes
    assert sum(o[2] == {"refunded": 2500} for o in outcomes) + sum(o[2] == "pending" for o in outcomes) == 3
    assert ledger.run(refund_call(2500), handler=refunds, requires_approval=True, **opts) == {"refunded": 2500}
    assert refunds.calls == [] and len(read_lines(log)) == 1  # replayed here too


# -- separation of duties ----------------------------------------------------------------------


def test_the_requester_may_not_decide_their_own_request(ledger: Ledger) -> None:
    refunds = Refunds()

    @ledger.tool("refunds.issue", requires_approval=True, approvers=["alice", "bob"])
    def refund(order: str, amount: int) -> dict[str, Any]:
        return refunds(order, amount)

    with ledger.workflow("refund-1", on_behalf_of="alice"), pytest.raises(ApprovalPending) as info:
        refund("ord_1", 2500)
    aid = info.value.approval_id
    assert ledger.approval(aid).requested_by == "alice"  # type: ignore[union-attr]
    for decide in (lambda: ledger.approve(aid, by="alice"), lambda: ledger.reject(aid, by="alice", reason="x")):
        with pytest.raises(ApprovalRefused, match="separation of duties"):
            decide()  # alice is an approver, but not of her own request
    refused = [e for e in ledger.events(workflow_id="refund-1") if e.kind == "approval_refused"]
    assert [e.owner for e in refused] == ["alice", "alice"]
    assert ledger.approval(aid).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    ledger.approve(aid, by="bob")
    with ledger.workflow("refund-1", on_behalf_of="alice"):
        assert refund("ord_1", 2500) == {"refunded": 2500}
    assert refunds.calls == [("ord_1", 2500)]


async def test_on_behalf_of_holds_in_async_code(ledger: Ledger) -> None:
    refunds = Refunds()

    @ledger.tool("refunds.issue", requires_approval=True)
    async def refund(order: str, amount: int) -> dict[str, Any]:
        return refunds(order, amount)

    async with ledger.workflow("refund-2", on_behalf_of="carol"):
        with pytest.raises(ApprovalPending) as info:
            await asyncio.create_task(refund("ord_2", 100))  # a task inherits the context
    aid = info.value.approval_id
    assert ledger.approval(aid).requested_by == "carol"  # type: ignore[union-attr]
    with pytest.raises(ApprovalRefused, match="separation of duties"):
        ledger.approve(aid, by="carol")
    ledger.approve(aid, by="dave")
    async with ledger.workflow("refund-2"):
        assert await refund("ord_2", 100) == {"refunded": 100}
    assert refunds.calls == [("ord_2", 100)]


def test_on_behalf_of_is_checked(tmp_path: Path) -> None:
    led = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    for bad in ("", 7, "x" * 256):
        with pytest.raises(InvalidArguments, match="on_behalf_of"):
            led.workflow("w", on_behalf_of=bad)  # type: ignore[arg-type]


# -- routing rules -----------------------------------------------------------------------------


def test_routing_rule_picks_the_group_and_is_fixed_on_the_request(ledger: Ledger) -> None:
    groups = {"finance": list(FINANCE), "support": list(SUPPORT)}
    refunds = Refunds()

    def route(c: ToolCall) -> list[str]:
        return groups["finance"] if c.args["amount"] > 1000 else groups["support"]

    big = pending_id(ledger, refund_call(2500, "ord_big"), refunds, approvers=route)
    small = pending_id(ledger, refund_call(50, "ord_small"), refunds, approvers=route)
    assert ledger.approval(big).approvers == sorted(FINANCE)  # type: ignore[union-attr]
    assert ledger.approval(small).approvers == sorted(SUPPORT)  # type: ignore[union-attr]
    with pytest.raises(ApprovalRefused, match="may not decide"):
        ledger.approve(big, by="sam")  # support may not approve a big refund
    groups["finance"] = ["sam"]  # the rule changes later: open requests keep who may decide
    with pytest.raises(ApprovalRefused, match="may not decide"):
        ledger.approve(big, by="sam")
    assert ledger.approve(big, by="fay").status is ApprovalStatus.APPROVED
    assert ledger.approve(small, by="sue").status is ApprovalStatus.APPROVED
    groups["finance"] = list(FINANCE)  # using an approval needs its approvers to be allowed still
    assert ledger.run(refund_call(2500, "ord_big"), handler=refunds, requires_approval=True, approvers=route) == {
        "refunded": 2500
    }
    assert refunds.calls == [("ord_big", 2500)]


def test_quorum_as_a_rule_of_the_call(ledger: Ledger) -> None:
    refunds = Refunds()
    opts: dict[str, Any] = {"approvers": FINANCE, "quorum": lambda c: 2 if c.args["amount"] > 1000 else 1}
    big = pending_id(ledger, refund_call(2500, "ord_big"), refunds, **opts)
    small = pending_id(ledger, refund_call(50, "ord_small"), refunds, **opts)
    assert ledger.approval(big).quorum == 2 and ledger.approval(small).quorum == 1  # type: ignore[union-attr]
    assert ledger.approve(small, by="fay").status is ApprovalStatus.APPROVED
    assert ledger.approve(big, by="fay").status is ApprovalStatus.PENDING


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"requires_approval": True, "quorum": 0}, "at least 1"),
        ({"requires_approval": True, "quorum": True}, "at least 1"),
        ({"requires_approval": True, "quorum": 1.5}, "at least 1"),
        ({"requires_approval": True, "approvers": ["a", "b"], "quorum": 3}, "can never be reached"),
        ({"quorum": 2}, "need requires_approval"),
        ({"approvers": lambda c: ["a"]}, "need requires_approval"),
    ],
)
def test_quorum_options_are_checked(tmp_path: Path, options: dict[str, Any], match: str) -> None:
    led = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    with pytest.raises(ConfigurationError, match=match):
        led.tool("t", **options)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({"approvers": lambda c: "alice"}, "list of names"),
        ({"approvers": lambda c: []}, "non-empty"),
        ({"approvers": lambda c: 1 / 0}, "raised"),
        ({"quorum": lambda c: 0}, "at least 1"),
        ({"approvers": lambda c: ["a"], "quorum": lambda c: 2}, "can never be reached"),
    ],
)
def test_bad_routing_rules_are_configuration_errors_before_anything_is_stored(
    ledger: Ledger, rules: dict[str, Any], match: str
) -> None:
    refunds = Refunds()
    with pytest.raises(ConfigurationError, match=match):
        ledger.run(refund_call(10), handler=refunds, requires_approval=True, **rules)
    assert ledger.pending_approvals() == [] and ledger.events(workflow_id="refund-1") == []


# -- superseded requests -------------------------------------------------------------------------


class Told:
    """A channel that records every request and every update it is told about."""

    def __init__(self) -> None:
        self.requested: list[str] = []
        self.updates: list[tuple[str, str, str]] = []

    def request(self, approval: Approval) -> dict[str, str]:
        self.requested.append(approval.approval_id)
        return {"ts": approval.approval_id}

    def decided(self, approval: Approval, state: Any) -> None:
        self.updates.append((approval.approval_id, approval.status.value, approval.progress))


def test_a_request_whose_key_ran_with_other_arguments_is_superseded(make_ledger: Callable[..., Ledger]) -> None:
    told = Told()
    ledger = make_ledger(channels=[told])
    refunds = Refunds()
    # Keyed on the order only, asking when the amount is over 100: one refund per order.
    opts: dict[str, Any] = {"key": ["order"], "requires_approval": lambda c: c.args["amount"] > 100}
    with pytest.raises(ApprovalPending) as info:
        ledger.run(refund_call(5000), handler=refunds, **opts)
    stale = info.value.approval_id
    assert ledger.run(refund_call(50), handler=refunds, **opts) == {"refunded": 50}  # no approval needed
    superseded = ledger.approval(stale)
    assert superseded is not None and superseded.status is ApprovalStatus.SUPERSEDED
    assert ledger.pending_approvals() == []
    for decide in (lambda: ledger.approve(stale, by="fay"), lambda: ledger.reject(stale, by="fay", reason="x")):
        with pytest.raises(ApprovalRefused, match="superseded: the call ran with other arguments"):
            decide()
    assert (stale, "superseded", "0 of 1 approval") in told.updates
    events = [e for e in ledger.events(workflow_id="refund-1") if e.kind == "approval_superseded"]
    assert len(events) == 1 and events[0].detail and events[0].detail["approval_id"] == stale
    assert refunds.calls == [("ord_1", 50)]


def test_an_approved_but_unused_request_is_superseded_too(ledger: Ledger) -> None:
    refunds = Refunds()
    opts: dict[str, Any] = {"key": ["order"], "requires_approval": True}
    first = pending_id(ledger, refund_call(100), refunds, key=["order"])
    second = pending_id(ledger, refund_call(200), refunds, key=["order"])
    ledger.approve(first, by="fay")
    ledger.approve(second, by="fay")
    assert ledger.run(refund_call(200), handler=refunds, **opts) == {"refunded": 200}
    assert ledger.approval(first).status is ApprovalStatus.SUPERSEDED  # type: ignore[union-attr]
    assert ledger.approval(second).status is ApprovalStatus.CONSUMED  # type: ignore[union-attr]
    assert refunds.calls == [("ord_1", 200)]


def test_a_request_superseded_by_a_run_without_approval_is_found_when_read(ledger: Ledger) -> None:
    refunds = Refunds()
    stale = pending_id(ledger, refund_call(5000), refunds, key=["order"])
    # The same key runs from a call site that does not ask for approval at all: nothing is told at once,
    # but the request can no longer run, so it leaves the inbox when read and cannot be decided.
    assert ledger.run(refund_call(50), handler=refunds, key=["order"]) == {"refunded": 50}
    with pytest.raises(ApprovalRefused, match="superseded"):
        ledger.approve(stale, by="fay")
    assert ledger.approval(stale).status is ApprovalStatus.SUPERSEDED  # type: ignore[union-attr]
    other = pending_id(ledger, refund_call(5000, order="ord_2"), refunds, key=["order"])
    ledger.run(refund_call(60, order="ord_2"), handler=refunds, key=["order"])
    assert ledger.pending_approvals() == []
    assert ledger.approval(other).status is ApprovalStatus.SUPERSEDED  # type: ignore[union-attr]
    assert refunds.calls == [("ord_1", 50), ("ord_2", 60)]


# -- channels and the CLI -----------------------------------------------------------------------


def test_channels_hear_each_vote_and_the_outcome(make_ledger: Callable[..., Ledger]) -> None:
    told = Told()
    decided: list[Approval] = []
    ledger = make_ledger(channels=[told, CallbackChannel(lambda a: None, decided.append)])
    aid = pending_id(ledger, refund_call(2500), Refunds(), approvers=FINANCE, quorum=2)
    ledger.approve(aid, by="fred")
    ledger.approve(aid, by="fay")
    assert told.updates == [
        (aid, "pending", "1 of 2 approvals: fred"),
        (aid, "approved", "2 of 2 approvals: fred, fay"),
    ]
    assert [a.approved_by for a in decided] == [["fred"], ["fred", "fay"]]


def test_slack_message_shows_progress_and_keeps_buttons_until_settled() -> None:
    from agent_ledger.approvals._slack import decided_blocks

    base = {
        "approval_id": "apr_1",
        "workflow_id": "w",
        "key": "v1:k",
        "tool": "refunds.issue",
        "args": {"amount": 2500},
        "payload_hash": "v1:p",
        "quorum": 2,
        "requested_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "requested_by": "alice",
    }
    partly = Approval(**base, status=ApprovalStatus.PENDING, approved_by=["fred"])
    blocks = str(decided_blocks(partly))
    assert "1 of 2 approvals: fred" in blocks and "agent_ledger_approve" in blocks and "alice" in blocks
    done = Approval(**base, status=ApprovalStatus.APPROVED, approved_by=["fred", "fay"], decided_by="fay")
    blocks = str(decided_blocks(done))
    assert "2 of 2 approvals: fred, fay" in blocks and "agent_ledger_approve" not in blocks
    assert "{'type': 'text', 'text': 'Approved', 'style': {'bold': True}}" in blocks
    gone = Approval(**base, status=ApprovalStatus.SUPERSEDED)
    blocks = str(decided_blocks(gone))
    assert "Superseded" in blocks and "agent_ledger_approve" not in blocks


def test_cli_lists_progress_and_requester_and_follows_the_rules(ledger: Ledger, db_url: str) -> None:
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

    @ledger.tool("refunds.issue", requires_approval=True, approvers=FINANCE, quorum=2)
    def refund(order: str, amount: int) -> dict[str, Any]:
        return {"refunded": amount}

    with ledger.workflow("refund-1", on_behalf_of="fiona"), pytest.raises(ApprovalPending) as info:
        refund("ord_1", 2500)
    aid = info.value.approval_id
    ledger.approve(aid, by="fred")
    table = cli("list")
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if aid in x)
    assert "1 of 2 approvals: fred" in line and "fiona" in line
    (listed,) = json.loads(cli("list", "--json").stdout)
    assert listed["approved_by"] == ["fred"] and listed["quorum"] == 2 and listed["requested_by"] == "fiona"
    own = cli("approve", aid, "--by", "fiona")
    assert own.returncode == 1 and "separation of duties" in own.stderr
    again = cli("approve", aid, "--by", "fred")
    assert again.returncode == 1 and "already voted" in again.stderr
    done = cli("approve", aid, "--by", "fay")
    assert done.returncode == 0 and "approved by fay" in done.stdout and "2 of 2" in done.stdout


WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SLACK_SECRET = "slack-signing-secret"


def test_inbound_decisions_are_one_vote_each_and_channels_show_progress(make_ledger: Callable[..., Ledger]) -> None:
    import json
    import time
    import urllib.parse

    import httpx

    from agent_ledger.approvals import (
        SlackChannel,
        WebhookChannel,
        handle_slack,
        handle_webhook,
        sign_slack,
        signed_headers,
    )

    sent: list[tuple[str, dict[str, Any]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append((request.url.path, body))
        if request.url.path.endswith("chat.postMessage"):
            return httpx.Response(200, json={"ok": True, "channel": "C1", "ts": "1.0"})
        if request.url.path.endswith("chat.update"):
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(204)

    client = httpx.Client(transport=httpx.MockTransport(answer))
    hook = WebhookChannel(url="https://hooks.example/approvals", secret=WEBHOOK_SECRET, client=client)
    slack = SlackChannel("xoxb-test", "C1", client=client)
    ledger = make_ledger(channels=[slack, hook])
    refunds = Refunds()

    @ledger.tool("refunds.issue", requires_approval=True, approvers=["U0FAY", "U0FRED", "fiona"], quorum=2)
    def refund(order: str, amount: int) -> dict[str, Any]:
        return refunds(order, amount)

    with ledger.workflow("refund-1", on_behalf_of="fiona"), pytest.raises(ApprovalPending) as info:
        refund("ord_1", 2500)
    aid = info.value.approval_id
    approval = ledger.approval(aid)
    assert approval is not None

    def click(user: str) -> Any:
        payload = {
            "type": "block_actions",
            "user": {"id": user},
            "actions": [{"action_id": "agent_ledger_approve", "value": aid}],
        }
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        ts = str(int(time.time()))
        headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sign_slack(SLACK_SECRET, ts, body)}
        response = handle_slack(ledger, body, headers, SLACK_SECRET)
        if response.after is not None:
            response.after()
        return response

    def webhook(by: str, message_id: str) -> Any:
        body = json.dumps(
            {"approval_id": aid, "payload_hash": approval.payload_hash, "decision": "approve", "by": by, "reason": "ok"}
        )
        response = handle_webhook(
            ledger, body.encode(), signed_headers(WEBHOOK_SECRET, message_id, body), WEBHOOK_SECRET
        )
        if response.after is not None:
            response.after()
        return response

    first = click("U0FAY")
    assert (
        first.status == 200
        and first.body["status"] == "pending"
        and first.body["progress"] == "1 of 2 approvals: U0FAY"
    )
    again = click("U0FAY")  # the same person clicking twice counts once (Slack is answered 200 with the reason)
    assert again.body["ok"] is False and "already voted" in again.body["error"]
    own = webhook("fiona", "msg_1")  # the requester, through the webhook: refused
    assert own.status == 409 and "separation of duties" in own.body["error"]
    assert ledger.approval(aid).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    done = webhook("U0FRED", "msg_2")
    assert done.status == 200 and done.body["status"] == "approved"

    updates = [body for path, body in sent if path.endswith("chat.update")]
    assert "1 of 2 approvals: U0FAY" in json.dumps(updates[0]) and "agent_ledger_approve" in json.dumps(updates[0])
    assert "agent_ledger_approve" not in json.dumps(updates[-1]) and "Approved" in json.dumps(updates[-1])
    events = [body for path, body in sent if path == "/approvals"]
    assert [e["type"] for e in events] == ["approval.requested", "approval.voted", "approval.decided"]
    assert [e["progress"] for e in events] == [
        "0 of 2 approvals",
        "1 of 2 approvals: U0FAY",
        "2 of 2 approvals: U0FAY, U0FRED",
    ]
    assert events[0]["approval"]["requested_by"] == "fiona" and events[2]["approval"]["quorum"] == 2
    with ledger.workflow("refund-1"):
        assert refund("ord_1", 2500) == {"refunded": 2500}
    assert refunds.calls == [("ord_1", 2500)]


def test_requests_opened_before_the_upgrade_take_votes_after_it(db_url: str) -> None:
    """A 0004 database with an open request: after ``migrate`` it needs one approval, as before."""
    from agent_ledger._migrate import upgrade
    from agent_ledger._schema import build_tables

    engine = sa.create_engine(db_url)
    upgrade(engine, build_tables(), "0004")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO agent_ledger_approvals (id, key, workflow_id, tool, payload_hash, args, status, "
                "approvers, requested_at, expires_at) VALUES ('apr_old', 'v1:k', 'w', 'refunds.issue', 'v1:p', "
                "'{}', 'pending', NULL, :now, :later)"
            ),
            {"now": datetime.now(timezone.utc), "later": datetime.now(timezone.utc) + timedelta(hours=1)},
        )
    led = Ledger(db_url)
    led.migrate()
    old = led.approval("apr_old")
    assert old is not None and old.quorum == 1 and old.approved_by == [] and old.requested_by is None
    done = led.approve("apr_old", by="fay")
    assert done.status is ApprovalStatus.APPROVED and done.approved_by == ["fay"]
    led.close()
    engine.dispose()


async def test_async_calls_supersede_too(ledger: Ledger) -> None:
    refunds = Refunds()

    async def refund(order: str, amount: int) -> dict[str, Any]:
        return refunds(order, amount)

    ids = []
    for amount in (100, 200):
        with pytest.raises(ApprovalPending) as info:
            await ledger.arun(refund_call(amount), refund, key=["order"], requires_approval=True)
        ids.append(info.value.approval_id)
    ledger.approve(ids[0], by="fay")
    assert await ledger.arun(refund_call(100), refund, key=["order"], requires_approval=True) == {"refunded": 100}
    assert ledger.approval(ids[1]).status is ApprovalStatus.SUPERSEDED  # type: ignore[union-attr]
    assert refunds.calls == [("ord_1", 100)]


def test_prune_deletes_the_votes_with_their_request(ledger: Ledger, db_url: str) -> None:
    refunds = Refunds()
    opts: dict[str, Any] = {"approvers": FINANCE, "quorum": 2}
    aid = pending_id(ledger, refund_call(2500), refunds, **opts)
    ledger.approve(aid, by="fay")
    ledger.approve(aid, by="fred")
    ledger.run(refund_call(2500), handler=refunds, requires_approval=True, **opts)
    keep = pending_id(ledger, refund_call(3000, order="ord_2"), refunds, **opts)
    ledger.approve(keep, by="fay")  # an open request of an unsettled key keeps its vote
    engine = sa.create_engine(db_url)

    def votes() -> list[str]:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT approval_id FROM agent_ledger_approval_votes ORDER BY id"))
            return list(rows.scalars())

    assert votes() == [aid, aid, keep]
    assert ledger.prune(older_than=0) == 1
    assert votes() == [keep] and ledger.approval(aid) is None
    engine.dispose()


def test_hostile_names_and_ids_in_a_vote_are_refused_before_the_database(ledger: Ledger) -> None:
    aid = pending_id(ledger, refund_call(2500), Refunds(), approvers=FINANCE, quorum=2)
    for bad_by in ("", "fay\x00", "x" * 256, "\ud800", 7):
        with pytest.raises(InvalidArguments):
            ledger.approve(aid, by=bad_by)  # type: ignore[arg-type]
    with pytest.raises(InvalidArguments):
        ledger.reject(aid, by="fay", reason="no\x00")
    for bad_id in ("apr_\x00", "x" * 41, "\udcff"):
        with pytest.raises(InvalidArguments):
            ledger.approve(bad_id, by="fay")
    assert ledger.approval(aid).approved_by == []  # type: ignore[union-attr]
    assert ledger.approve(aid, by="fay").progress == "1 of 2 approvals: fay"


def test_a_reader_without_write_rights_still_leaves_superseded_requests_out(pg_url: str) -> None:
    ledger = Ledger(pg_url)
    ledger.migrate()
    refunds = Refunds()
    stale = pending_id(ledger, refund_call(5000), refunds, key=["order"])
    live = pending_id(ledger, refund_call(5000, order="ord_2"), refunds, key=["order"])
    ledger.run(refund_call(50), handler=refunds, key=["order"])  # a call site without approvals
    url = sa.engine.make_url(pg_url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE ROLE inbox_reader LOGIN PASSWORD 'reader-pw'"))
        conn.execute(sa.text("GRANT SELECT ON ALL TABLES IN SCHEMA public TO inbox_reader"))
    engine.dispose()
    reader = Ledger(url.set(username="inbox_reader", password="reader-pw").render_as_string(hide_password=False))
    assert [a.approval_id for a in reader.pending_approvals()] == [live]  # it cannot mark, but leaves it out
    reader.close()
    assert ledger.approval(stale).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    assert [a.approval_id for a in ledger.pending_approvals()] == [live]  # a writer marks it
    assert ledger.approval(stale).status is ApprovalStatus.SUPERSEDED  # type: ignore[union-attr]
    ledger.close()


def test_on_behalf_of_follows_a_call_submitted_to_a_thread_pool(ledger: Ledger) -> None:
    from concurrent.futures import ThreadPoolExecutor

    @ledger.tool("refunds.issue", requires_approval=True)
    def refund(order: str, amount: int) -> dict[str, Any]:
        return {"refunded": amount}

    with ledger.workflow("refund-3", on_behalf_of="alice") as wf, ThreadPoolExecutor(2) as pool:
        future = wf.submit(pool, refund, "ord_3", 700)
        with pytest.raises(ApprovalPending) as info:
            future.result(timeout=60)
    assert ledger.approval(info.value.approval_id).requested_by == "alice"  # type: ignore[union-attr]
    with pytest.raises(ApprovalRefused, match="separation of duties"):
        ledger.approve(info.value.approval_id, by="alice")


def test_an_approval_is_used_only_while_all_its_approvers_are_still_allowed() -> None:
    from agent_ledger._decide import decide_approval

    approved = request_row(status="approved", approved_by=["fay", "sam"], decided_by="sam")
    assert decide_approval(approved, NOW, ("fay", "sam")) == "use"
    assert decide_approval(approved, NOW, ("fay", "fred")) == "request"  # sam is no longer allowed
    assert decide_approval(approved, NOW, None) == "use"
    old = request_row(status="approved", approved_by=None, decided_by="fay")  # decided before quorums
    assert decide_approval(old, NOW, ("fay",)) == "use" and decide_approval(old, NOW, ("fred",)) == "request"
