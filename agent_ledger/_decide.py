"""The decision core: what should happen to a call, given what is stored. Pure: no I/O, no clock.

The state machine of an effect is the table ``TRANSITIONS`` (state -> event -> new state). Every state
change the storage layer performs is one of its entries, checked by ``transition()``; the drivers never
invent a move. ``decide()`` maps (stored row, request, time) to one ``Decision``; the drivers in
``_flow`` carry it out with one atomic, fenced statement and ask again when a race changed the row.

::

    (new) --claim--> running --succeed--> succeeded            (terminal)
                     running --fail-----> failed --retry--> running
                     running --mark_unknown--> unknown --reconcile / takeover--> running
                     running --takeover / reconcile--> running  (lease expired, attempt + 1)
                     unknown / failed / running --resolve_result--> succeeded
                     unknown / failed / running --resolve_error---> failed
                     unknown / failed / running --resolve_retry---> pending --retry--> running
                     pending --resolve_result / resolve_error--> succeeded / failed

An approval request has its own table, ``APPROVAL_TRANSITIONS``, checked by ``approval_transition()``:
every status the storage layer writes on an approval is one of its entries. ``judge_vote()`` decides
whether a human's vote may be recorded and what it does (pure, like ``decide``)::

    (new) --request--> pending --vote--> pending       (an approval short of the quorum)
                       pending --approve--> approved   (the approval that reaches the quorum)
                       pending --reject---> rejected   (one veto)
                       pending / approved --expire----> expired
                       pending / approved --supersede-> superseded (the key ran with another payload)
                       approved --consume--> consumed  (together with the claim)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ._keys import diff_fields
from ._models import ApprovalStatus, Status
from .errors import IllegalTransition

__all__ = [
    "APPROVAL_TRANSITIONS",
    "TRANSITIONS",
    "Charge",
    "Claim",
    "Decision",
    "MarkUnknown",
    "Policy",
    "Refuse",
    "Replay",
    "ReplayError",
    "Request",
    "Row",
    "Wait",
    "ApprovalStep",
    "Vote",
    "VoteRefused",
    "approval_sources",
    "approval_transition",
    "judge_vote",
    "decide",
    "decide_approval",
    "decide_limit",
    "error_matches",
    "lease_over",
    "transition",
]

ClaimEvent = Literal["claim", "retry", "takeover", "reconcile"]

TRANSITIONS: Mapping[Status | None, Mapping[str, Status]] = {
    None: {"claim": Status.RUNNING},
    Status.RUNNING: {
        "succeed": Status.SUCCEEDED,
        "fail": Status.FAILED,
        "takeover": Status.RUNNING,
        "reconcile": Status.RUNNING,
        "mark_unknown": Status.UNKNOWN,
        "resolve_result": Status.SUCCEEDED,
        "resolve_error": Status.FAILED,
        "resolve_retry": Status.PENDING,
    },
    Status.FAILED: {
        "retry": Status.RUNNING,
        "resolve_result": Status.SUCCEEDED,
        "resolve_error": Status.FAILED,
        "resolve_retry": Status.PENDING,
    },
    Status.UNKNOWN: {
        "takeover": Status.RUNNING,
        "reconcile": Status.RUNNING,
        "resolve_result": Status.SUCCEEDED,
        "resolve_error": Status.FAILED,
        "resolve_retry": Status.PENDING,
    },
    Status.PENDING: {
        "retry": Status.RUNNING,
        "resolve_result": Status.SUCCEEDED,
        "resolve_error": Status.FAILED,
    },
    Status.SUCCEEDED: {},
}


APPROVAL_TRANSITIONS: Mapping[ApprovalStatus | None, Mapping[str, ApprovalStatus]] = {
    None: {"request": ApprovalStatus.PENDING},
    ApprovalStatus.PENDING: {
        "vote": ApprovalStatus.PENDING,
        "approve": ApprovalStatus.APPROVED,
        "reject": ApprovalStatus.REJECTED,
        "expire": ApprovalStatus.EXPIRED,
        "supersede": ApprovalStatus.SUPERSEDED,
    },
    ApprovalStatus.APPROVED: {
        "consume": ApprovalStatus.CONSUMED,
        "expire": ApprovalStatus.EXPIRED,
        "supersede": ApprovalStatus.SUPERSEDED,
    },
    ApprovalStatus.REJECTED: {},
    ApprovalStatus.EXPIRED: {},
    ApprovalStatus.SUPERSEDED: {},
    ApprovalStatus.CONSUMED: {},
}


def approval_transition(state: ApprovalStatus | None, event: str) -> ApprovalStatus:
    """The approval status ``event`` leads to from ``state``; ``IllegalTransition`` if there is none."""
    try:
        return APPROVAL_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state.value if state else None, event) from None


def approval_sources(event: str) -> tuple[str, ...]:
    """The stored statuses (values) from which ``event`` may move an approval, for a fenced statement."""
    return tuple(s.value for s, moves in APPROVAL_TRANSITIONS.items() if s is not None and event in moves)


def transition(state: Status | None, event: str) -> Status:
    """The state ``event`` leads to from ``state``; raises ``IllegalTransition`` if there is none."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state.value if state else None, event) from None


@dataclass(slots=True)
class Row:
    """A snapshot of one stored effect, as much of it as decisions need (slotted, not frozen: one is
    built per lookup on the hot path; nothing mutates it)."""

    key: str
    workflow_id: str
    tool: str
    status: Status
    attempt: int
    payload_hash: str
    args: Mapping[str, Any] | None
    owner: str | None
    lease_expires_at: datetime | None
    started_at: datetime | None
    result: Any
    result_replayable: bool | None
    result_repr: str | None
    error: Mapping[str, Any] | None


@dataclass(frozen=True)
class Policy:
    """How a tool treats recorded failures and crashed attempts."""

    on_error: Literal["retry", "replay"] = "retry"
    retry_on: tuple[str, ...] = ()
    """Qualified names of exception classes that are retried even when failures are replayed."""
    on_crash: Literal["unknown", "retry"] = "unknown"
    has_reconcile: bool = False


@dataclass(slots=True)
class Request:
    """What the caller wants: this key, with this payload, under this policy (slotted, not frozen: one
    is built per call on the hot path; nothing mutates it)."""

    key: str
    payload_hash: str
    args: Mapping[str, Any]
    policy: Policy


@dataclass(frozen=True)
class Claim:
    """Take the key and run: a new row (``claim``) or a fenced update of the observed row (the
    storage layer fences on the row the decision was made from: its status, attempt and lease)."""

    event: ClaimEvent


@dataclass(frozen=True)
class Replay:
    """Return the recorded result without running the handler."""


@dataclass(frozen=True)
class ReplayError:
    """Raise the recorded failure without running the handler."""


@dataclass(frozen=True)
class Refuse:
    """Raise without running: a different payload, a result that cannot be replayed, an unknown outcome."""

    reason: Literal["mismatch", "not_replayable", "unknown"]
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Another worker holds a live lease: wait for its outcome (at most until the lease expires)."""

    lease_expires_at: datetime | None


@dataclass(frozen=True)
class MarkUnknown:
    """The owner is gone and the policy is honest uncertainty: record ``unknown`` for the observed attempt."""


Decision = Claim | Replay | ReplayError | Refuse | Wait | MarkUnknown


def error_matches(error: Mapping[str, Any] | None, names: tuple[str, ...]) -> bool:
    """Whether a recorded error is an instance of one of the named classes (by its recorded MRO)."""
    if error is None or not names:
        return False
    classes = error.get("classes") or [error.get("type")]
    return any(name in classes for name in names)


def lease_over(row: Row, now: datetime, owner_gone: bool) -> bool:
    """Whether the claim on ``row`` is over at ``now``: its lease ran out, or its owner is known gone.
    The one live-lease check (the flow's decisions and ``Ledger.resolve`` use it)."""
    return owner_gone or row.lease_expires_at is None or row.lease_expires_at <= now


def decide(row: Row | None, req: Request, now: datetime, *, owner_gone: bool = False) -> Decision:
    """Decide what to do with ``req`` given the stored ``row`` (or none) at time ``now``.

    ``owner_gone`` says the row's owner is known to be dead (same host, process gone), which ends its
    lease early. The result is a pure function of the inputs.
    """
    if row is None:
        return Claim("claim")
    if row.payload_hash != req.payload_hash:
        return Refuse("mismatch", tuple(diff_fields(row.args, req.args)))
    policy = req.policy
    status = row.status
    if status is Status.SUCCEEDED:
        return Replay() if row.result_replayable else Refuse("not_replayable")
    if status is Status.FAILED:
        retry = error_matches(row.error, policy.retry_on) if policy.retry_on else policy.on_error == "retry"
        return Claim("retry") if retry else ReplayError()
    if status is Status.PENDING:
        return Claim("retry")
    if status is Status.RUNNING:
        if not lease_over(row, now, owner_gone):
            return Wait(row.lease_expires_at)
        if policy.has_reconcile:
            return Claim("reconcile")
        if policy.on_crash == "retry":
            return Claim("takeover")
        return MarkUnknown()
    # Status.UNKNOWN
    if policy.has_reconcile:
        return Claim("reconcile")
    if policy.on_crash == "retry":
        return Claim("takeover")
    return Refuse("unknown")


ApprovalStep = Literal["use", "wait", "rejected", "expire", "request"]


def decide_approval(
    approval: Mapping[str, Any] | None, now: datetime, approvers: Collection[str] | None = None
) -> ApprovalStep:
    """What to do before executing a call that needs approval, given its newest request (or none).

    ``use``: approved, unexpired and unused: consume it together with the claim. ``wait``: pending.
    ``rejected``: refuse with the decision. ``expire``: its time ran out: record that, then ask again.
    ``request``: no usable request for this exact payload (none yet, the last one was used or expired,
    or it was approved by someone who is not among the call's current ``approvers``).
    """
    if approval is None:
        return "request"
    status = approval["status"]
    live = approval["expires_at"] > now
    if status == "approved":
        if not live:
            return "expire"
        deciders = approval.get("approved_by") or [approval["decided_by"]]
        if approvers is not None and any(name not in approvers for name in deciders):
            # Approved (by one of its quorum) under an older, looser allowlist: the current list governs.
            return "request"
        return "use"
    if status == "pending":
        return "wait" if live else "expire"
    if status == "rejected":
        return "rejected"
    return "request"  # consumed or expired


@dataclass(frozen=True)
class Vote:
    """A vote that may be recorded: ``event`` is ``vote`` (short of the quorum), ``approve`` (it reaches
    the quorum, as far as the stored snapshot shows: the storage layer counts again under the row's lock)
    or ``reject`` (a veto)."""

    event: Literal["vote", "approve", "reject"]


@dataclass(frozen=True)
class VoteRefused:
    """A vote that must not be recorded, and why (the ``ApprovalRefused`` message, audited)."""

    why: str


def judge_vote(
    approval: Mapping[str, Any],
    *,
    decision: Literal["approve", "reject"],
    by: str,
    now: datetime,
    ran_with: str | None,
) -> Vote | VoteRefused:
    """Whether ``by`` may approve or reject the stored request ``approval`` at ``now``, and what it does.

    ``ran_with`` is the payload hash the request's key executed with (None: it has not run). The rules,
    in order: a request whose key ran with other arguments is superseded; only an open (pending,
    unexpired) request takes votes; the requester never decides their own request; the stored
    approvers are an allowlist; one vote per person. One rejection rejects; ``quorum`` approvals approve.
    """
    status = ApprovalStatus(approval["status"])
    if status is ApprovalStatus.SUPERSEDED or (
        ran_with is not None and ran_with != approval["payload_hash"] and "supersede" in APPROVAL_TRANSITIONS[status]
    ):
        return VoteRefused("superseded: the call ran with other arguments")
    if status is not ApprovalStatus.PENDING:
        return VoteRefused(f"it is already {status.value} (by {approval['decided_by'] or 'nobody'})")
    if approval["expires_at"] <= now:
        return VoteRefused(f"it expired at {approval['expires_at'].isoformat()}")
    if approval.get("requested_by") is not None and by == approval["requested_by"]:
        return VoteRefused(f"{by!r} requested this call and may not decide on it (separation of duties)")
    approvers = approval["approvers"]
    if approvers is not None and by not in approvers:
        return VoteRefused(f"{by!r} may not decide on tool {approval['tool']!r}; its approvers are {approvers}")
    approved_by = list(approval.get("approved_by") or [])
    if by in approved_by:
        return VoteRefused(f"{by!r} already voted on it (each approver counts once)")
    if decision == "reject":
        return Vote("reject")
    quorum = int(approval.get("quorum") or 1)
    return Vote("approve" if len(approved_by) + 1 >= quorum else "vote")


@dataclass(frozen=True)
class Charge:
    """What one execution of a call consumes from one budget (a declared ``Limit`` applied to the call).

    The budget is the usage row (``name``, ``scope``, ``window_start``); ``amount`` is added to its
    ``used`` in the transaction that claims the key, and only if the sum stays within ``max`` (or
    unconditionally when ``forced``: a call a human approved past the limit).
    """

    name: str
    scope: str
    per: str
    """``workflow``, ``tool``, ``ledger`` or ``custom`` (a callable scope)."""
    tool: str | None
    """The tool the limit was declared on (None: the ledger's or a call's own limit covering any tool)."""
    window_start: datetime
    window_end: datetime | None
    amount: float
    max: float
    on_exceed: Literal["raise", "approval"] = "raise"
    forced: bool = False

    @property
    def budget(self) -> tuple[str, str, datetime]:
        """The usage row this charge goes to."""
        return (self.name, self.scope, self.window_start)


def decide_limit(charges: Collection[Charge], used: Mapping[tuple[str, str, datetime], float]) -> Charge | None:
    """The first charge that does not fit its budget, given what each budget has ``used`` (a missing
    budget has used nothing); None when every charge fits. A forced charge always fits."""
    for charge in charges:
        if charge.forced:
            continue
        if used.get(charge.budget, 0.0) + charge.amount > charge.max:
            return charge
    return None
