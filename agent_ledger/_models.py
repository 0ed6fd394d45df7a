"""Public data types: the call, the effect handed to handlers, statuses and audit records."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Approval",
    "ApprovalStatus",
    "AuditEvent",
    "Effect",
    "EffectRecord",
    "ErrorInfo",
    "LimitUsage",
    "RecoveryReport",
    "Status",
    "ToolCall",
    "approval_from_row",
]


class Status(str, enum.Enum):
    """Where an effect stands. See ``agent_ledger.TRANSITIONS`` for the allowed moves."""

    RUNNING = "running"
    """Claimed by a worker (``owner``) whose lease runs until ``lease_expires_at``."""
    SUCCEEDED = "succeeded"
    """The handler returned; the result is recorded and replayed to later calls."""
    FAILED = "failed"
    """The last attempt raised; the error is recorded. The next call retries or replays it by policy."""
    UNKNOWN = "unknown"
    """A worker died or lost its lease mid-call; nobody knows whether the side effect happened."""
    PENDING = "pending"
    """Released for another run (``resolve(retry=True)``): the next call runs the handler again."""

    def __str__(self) -> str:
        return self.value


class ToolCall(BaseModel):
    """One call of a tool: which workflow, which tool, with which arguments.

    The key is derived from these three only: never from a model's per-attempt ``tool_call.id``.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    workflow_id: str = Field(min_length=1, max_length=255)
    tool: str = Field(min_length=1, max_length=255)
    args: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Effect:
    """What a handler learns about the call it is executing (declare a parameter named ``effect``).

    ``idem_key`` is stable across attempts and retries of the same call and at most 255 ASCII
    characters: pass it downstream (for example as Stripe's ``Idempotency-Key``) so the downstream
    system deduplicates too. ``attempt`` counts the claims of this key, starting at 1.
    """

    key: str
    idem_key: str
    attempt: int
    workflow_id: str
    tool: str
    args: Mapping[str, Any] = field(default_factory=dict)


class ErrorInfo(BaseModel):
    """A recorded exception."""

    type: str
    message: str
    traceback: str | None = None
    classes: list[str] = Field(default_factory=list)


class AuditEvent(BaseModel):
    """One row of the append-only audit trail."""

    id: int
    key: str
    workflow_id: str
    tool: str
    kind: str
    attempt: int | None
    owner: str | None
    at: datetime
    detail: dict[str, Any] | None = None


class EffectRecord(BaseModel):
    """The stored state of one key, with its audit events (oldest first)."""

    key: str
    workflow_id: str
    tool: str
    status: Status
    attempts: int
    payload_hash: str
    args: dict[str, Any]
    result: Any = None
    result_replayable: bool | None = None
    result_repr: str | None = None
    error: ErrorInfo | None = None
    owner: str | None = None
    lease_expires_at: datetime | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    replays: int = 0
    events: list[AuditEvent] = Field(default_factory=list)

    @property
    def duration(self) -> float | None:
        """Seconds the last attempt took, when it finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class RecoveryReport(BaseModel):
    """What one ``ledger.recover()`` pass did, key by key."""

    examined: int = 0
    marked_unknown: list[str] = Field(default_factory=list)
    """Stale effects with no reconcile callback here: their outcome is now ``unknown``."""
    reconciled: list[str] = Field(default_factory=list)
    """Stale effects whose tool's ``reconcile`` found the side effect: now ``succeeded``."""
    released: list[str] = Field(default_factory=list)
    """Stale effects whose ``reconcile`` found nothing happened: now ``pending`` (the next call runs)."""
    failed: dict[str, str] = Field(default_factory=dict)
    """Effects whose ``reconcile`` raised (they are marked ``unknown``), with the error."""
    skipped: int = 0
    """Rows on this host whose owner process is still alive (not stale after all)."""


class ApprovalStatus(str, enum.Enum):
    """Where an approval request stands."""

    PENDING = "pending"
    """Waiting for a human decision (until ``expires_at``)."""
    APPROVED = "approved"
    """Approved for exactly its payload; not used yet."""
    REJECTED = "rejected"
    """Rejected: calls with this payload raise ``ApprovalRejected``."""
    CONSUMED = "consumed"
    """Used by one execution; a later execution needs a new approval."""
    EXPIRED = "expired"
    """Not decided (or not used) in time; a later call makes a new request."""
    SUPERSEDED = "superseded"
    """Its key ran with other arguments: it can never run, and can no longer be decided."""

    def __str__(self) -> str:
        return self.value


class Approval(BaseModel):
    """An approval request, bound to one call's full payload hash."""

    approval_id: str
    workflow_id: str
    key: str
    tool: str
    args: dict[str, Any]
    payload_hash: str
    status: ApprovalStatus
    approvers: list[str] | None = None
    """Who may decide (``None``: anyone who can reach the API, CLI or channel), as resolved when the
    request was made (a routing rule changed later does not change it)."""
    quorum: int = 1
    """How many approvals from distinct approvers the request needs (one rejection rejects it)."""
    approved_by: list[str] = Field(default_factory=list)
    """Who approved so far, in the order their approvals landed."""
    requested_by: str | None = None
    """On whose behalf the agent asked (``ledger.workflow(..., on_behalf_of=...)``); they may not decide."""
    requested_at: datetime
    expires_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    """Whose decision settled the request (the approval reaching the quorum, or the veto)."""
    reason: str | None = None
    consumed_at: datetime | None = None

    @property
    def progress(self) -> str:
        """Quorum progress for people: ``"1 of 2 approvals: alice"``."""
        names = ", ".join(self.approved_by)
        noun = "approval" if self.quorum == 1 else "approvals"
        return f"{len(self.approved_by)} of {self.quorum} {noun}" + (f": {names}" if names else "")


def approval_from_row(m: Mapping[str, Any]) -> Approval:
    """An ``Approval`` from a row of the approvals table."""
    return Approval(
        approval_id=m["id"],
        workflow_id=m["workflow_id"],
        key=m["key"],
        tool=m["tool"],
        args=m["args"],
        payload_hash=m["payload_hash"],
        status=ApprovalStatus(m["status"]),
        approvers=m["approvers"],
        quorum=m.get("quorum") or 1,
        approved_by=m.get("approved_by") or [],
        requested_by=m.get("requested_by"),
        requested_at=m["requested_at"],
        expires_at=m["expires_at"],
        decided_at=m["decided_at"],
        decided_by=m["decided_by"],
        reason=m["reason"],
        consumed_at=m["consumed_at"],
    )


@dataclass(frozen=True)
class LimitUsage:
    """How much of one budget is used: the limit's ``name``, its ``scope`` (a workflow id, a tool,
    ``ledger`` or a custom scope), ``used`` of ``max`` (``remaining`` = what is left, never below 0),
    in the fixed window [``window_start``, ``window_end``) (``window_end`` None: a limit without a
    window, whose budget never starts again by itself)."""

    name: str
    scope: str
    used: float
    max: float
    remaining: float
    window_start: datetime
    window_end: datetime | None
