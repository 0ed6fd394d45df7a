"""Human approval: a charge waits for a person, is approved from code, and runs once.

Run: python examples/approvals_callback.py

Offline: approval requests go to a ``CallbackChannel`` (your function; in production Slack or a
webhook, see docs/channels.md), and the decision is made with ``ledger.approve(...)`` from code.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from agent_ledger import Approval, ApprovalPending, ApprovalRefused, ApprovalRejected, Ledger
from agent_ledger.approvals import CallbackChannel

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect
inbox: list[Approval] = []  # what the channel delivered to the humans


def announce(approval: Approval) -> None:
    """The channel: in real life, post to a chat or a ticket queue."""
    print(f"  [channel] please approve {approval.tool} {approval.args} ({approval.approval_id})")
    inbox.append(approval)


def announce_decision(approval: Approval) -> None:
    print(f"  [channel] {approval.approval_id} was {approval.status.value} by {approval.decided_by}")


ledger = Ledger(URL, channels=[CallbackChannel(announce, announce_decision)])


# Charges over 50 need a human; only alice may decide.
@ledger.tool("stripe.charge", requires_approval=lambda call: call.args["amount"] > 50, approvers={"alice"})
def charge(customer: str, amount: int) -> dict[str, Any]:
    """The side effect. In real life: a call to the payment provider."""
    charges.append(amount)
    return {"charge_id": f"ch_{len(charges)}", "customer": customer, "amount": amount}


def agent(run: int, amount: int) -> str:
    """One run of the agent: it tries to charge, and stops when the charge awaits a decision."""
    print(f"agent run {run}: charge {amount}")
    with ledger.workflow("order-123"):
        try:
            result = charge("cus_123", amount)
        except ApprovalPending as e:
            # Pause: stop the agent here and resume it (with the same arguments) after the decision.
            return f"waiting for approval {e.approval_id}"
        except ApprovalRejected as e:
            return f"rejected, told the model: {e}"
    return f"charged: {result}"


def main() -> int:
    print(f"  -> {agent(1, 100)}")
    request = inbox[-1]

    # Only the listed approvers may decide; a refused decision is audited.
    try:
        ledger.approve(request.approval_id, by="mallory")
    except ApprovalRefused as e:
        print(f"decision by mallory refused: {e.why}")
    ledger.approve(request.approval_id, by="alice", reason="matches invoice 123")

    print(f"  -> {agent(2, 100)}")  # resumed: the approved call runs once
    print(f"  -> {agent(3, 100)}")  # again: replayed, no new approval needed

    # The approval covered exactly amount=100: other arguments are a new request.
    print(f"  -> {agent(4, 10_000)}")
    ledger.reject(inbox[-1].approval_id, by="alice", reason="amount does not match the invoice")
    print(f"  -> {agent(5, 10_000)}")

    print("audit trail:")
    # Replay records are written in batches, after the events around them: sort by time.
    for event in sorted(ledger.events(workflow_id="order-123"), key=lambda e: e.at):
        print(f"  {event.at:%H:%M:%S.%f} {event.kind:<20} by {event.owner}")
    ledger.close()

    print(f"inspect it: agent-ledger history order-123 --url {URL}")
    print(f"charge ran {len(charges)} time(s)")
    if charges != [100]:
        print("FAIL: expected exactly one charge of 100")
        return 1
    print("OK: the charge ran once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
