"""The story of a workflow, and the list of workflows: the one query layer of the CLI, the console and
``ledger.timeline`` / ``ledger.workflows``.

A timeline is read with three queries whatever the number of effects (the workflow's effect rows, its
audit events, its approval requests) and assembled here, without I/O (``build_timeline``). The
workflow list is one aggregate query over effects and approval requests (``workflows_query``), newest
activity first, paginated with an opaque keyset cursor.

Everything returned holds stored, attacker-controlled text (the model writes arguments and names):
callers escape it. Redacted arguments are shown as ``"[redacted]"``, never as their stored hash.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import and_, bindparam, case, func, literal, or_, select, union_all

from ._models import Approval, ApprovalStatus, ErrorInfo, Status, approval_from_row
from ._schema import Tables, UTCDateTime
from .errors import InvalidArguments

__all__ = [
    "MAX_LIMIT",
    "NEEDS_HUMAN",
    "REDACTED",
    "Timeline",
    "TimelineEffect",
    "TimelineEntry",
    "WorkflowPage",
    "WorkflowSummary",
    "build_timeline",
    "decode_cursor",
    "displayable",
    "effects_of_query",
    "encode_cursor",
    "summary_from_row",
    "workflows_query",
]

REDACTED = "[redacted]"
"""How a redacted argument is shown (its stored keyed hash is never shown)."""
NEEDS_HUMAN = "needs_human"
"""The ``status`` filter of ``ledger.workflows`` for workflows waiting for a person."""
MAX_LIMIT = 500
"""The most lines of one page of the workflow list."""


def displayable(value: Any) -> Any:
    """``value`` (stored JSON) with every redacted value (``{"$redacted": ...}``) replaced by
    ``"[redacted]"``, at any depth."""
    if isinstance(value, dict):
        if set(value) == {"$redacted"}:
            return REDACTED
        return {k: displayable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [displayable(v) for v in value]
    return value


class TimelineEntry(BaseModel):
    """One thing that happened in a workflow: an audit event, or a call read from its effect row."""

    at: datetime
    kind: str
    """The audit kind (``approval_requested``, ``approval_vote``, ``approved``, ``rejected``,
    ``approval_consumed``, ``retry``, ``succeeded``, ``failed``, ``unknown``, ``marked_unknown``,
    ``resolved``, ``refused``, ``limit_exceeded``, ``late_completion``, ``replayed``, ...) or ``called``
    (the first call of a key) and ``running`` (an attempt in progress), read from the effect row."""
    key: str
    tool: str
    attempt: int | None = None
    by: str | None = None
    """Who did it: the worker's owner id, or the person who decided or resolved."""
    approval_id: str | None = None
    duration_ms: float | None = None
    summary: str
    """One line for people (built from stored text: escape it before showing it in a page)."""
    detail: dict[str, Any] | None = None


class TimelineEffect(BaseModel):
    """One effect (key) of the workflow as it stands now."""

    key: str
    tool: str
    status: Status
    attempts: int
    replays: int = 0
    args: dict[str, Any]
    """The stored arguments, redacted values shown as ``"[redacted]"``."""
    result: Any = None
    result_replayable: bool | None = None
    result_repr: str | None = None
    error: ErrorInfo | None = None
    owner: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    """How long the last attempt took, when it finished."""


class Timeline(BaseModel):
    """The story of one workflow (``ledger.timeline``): its effects, its approval requests and every
    entry in time order."""

    workflow_id: str
    effects: list[TimelineEffect] = Field(default_factory=list)
    approvals: list[Approval] = Field(default_factory=list)
    """Every approval request of the workflow (any status), oldest first, with quorum progress."""
    entries: list[TimelineEntry] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    """Effects by status."""
    pending_approvals: int = 0
    unknown: int = 0
    needs_human: bool = False
    """A pending approval request or an unknown outcome waits for a person."""
    first_at: datetime | None = None
    last_at: datetime | None = None

    @property
    def empty(self) -> bool:
        """Nothing was ever recorded for this workflow id."""
        return not self.entries and not self.effects and not self.approvals


class WorkflowSummary(BaseModel):
    """One line of the workflow list."""

    workflow_id: str
    first_at: datetime
    last_at: datetime
    effects: int
    counts: dict[str, int]
    """Effects by status (statuses with none are left out)."""
    pending_approvals: int
    unknown: int
    needs_human: bool


class WorkflowPage(BaseModel):
    """A page of ``ledger.workflows``: newest activity first; pass ``next_cursor`` for the next page."""

    workflows: list[WorkflowSummary]
    next_cursor: str | None = None


# -- the timeline ----------------------------------------------------------------------------------


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 3)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(kind: str, d: Mapping[str, Any], attempt: int | None) -> str:
    """One line for people about an audit event (its stored detail)."""
    nth = f"attempt {attempt}" if attempt is not None else "call"
    if kind == "approval_requested":
        who = d.get("approvers")
        line = f"approval requested (quorum {d.get('quorum', 1)}"
        line += f", approvers {', '.join(map(str, who))}" if who else ", any approver"
        if d.get("requested_by"):
            line += f", on behalf of {d['requested_by']}"
        return line + f"), expires {d.get('expires_at', '?')}"
    if kind in ("approval_vote", "approved", "rejected"):
        verb = {"approval_vote": "voted to approve", "approved": "approved", "rejected": "rejected"}[kind]
        line = f"{verb} ({d['approvals']})" if d.get("approvals") and kind != "rejected" else verb
        return line + (f": {_short(d['reason'])}" if d.get("reason") else "")
    if kind == "approval_refused":
        what = {"approved": "approval", "rejected": "rejection"}.get(str(d.get("decision")), "decision")
        return f"{what} refused: {_short(d.get('why', ''))}"
    if kind == "approval_consumed":
        return f"approval used by {nth}"
    if kind == "approval_expired":
        return f"approval request expired (was {d.get('was', '?')})"
    if kind == "approval_superseded":
        return "approval request superseded: the key ran with other arguments"
    if kind == "succeeded":
        return f"{nth} succeeded" + (" (result not replayable)" if d.get("not_replayable") else "")
    if kind == "failed":
        err = d.get("error") or {}
        return f"{nth} failed: {_short(err.get('type', '?'))}: {_short(err.get('message', ''))}"
    if kind in ("marked_unknown", "unknown"):
        why = d.get("interrupted") or d.get("reason") or d.get("why")
        return f"{nth} outcome unknown" + (f" ({_short(why)})" if why else "") + ": a person must resolve it"
    if kind == "resolved":
        line = f"resolved by hand: {d.get('from', '?')} -> {d.get('to', '?')}"
        return line + (f": {_short(d['reason'])}" if d.get("reason") else "")
    if kind == "reconciled":
        return f"{nth} reconciled: {_short(d.get('outcome', d))}"
    if kind == "refused":
        reason = d.get("reason", "refused")
        if reason == "payload_mismatch":
            return f"refused: same key, other arguments (fields {', '.join(map(str, d.get('fields', [])))})"
        return f"refused: {_short(reason)}" + (f" ({_short(d['why'])})" if d.get("why") else "")
    if kind == "limit_exceeded":
        line = f"refused: over the limit {_short(d.get('limit', '?'))} ({_short(d.get('scope', '?'))}): "
        return line + f"{d.get('used', '?')} of {d.get('max', '?')} used, {d.get('requested', '?')} requested"
    if kind == "retry":
        return f"{nth} started (the previous attempt {d.get('previous_status', 'ended')})"
    if kind == "late_completion":
        return f"{nth} finished after losing its claim (late completion); its outcome was not recorded"
    if kind == "replayed":
        count = int(d.get("count", 1))
        line = "recorded result replayed" + (f" {count} times" if count > 1 else "")
        return line + (" (not replayable)" if d.get("replayable") is False else "")
    if kind in ("notified", "notification_failed"):
        line = f"channel {d.get('channel', '?')} {'told' if kind == 'notified' else 'failed'} ({d.get('hook', '?')})"
        return line + (f": {_short(d['error'])}" if d.get("error") else "")
    return kind.replace("_", " ") + (f": {_short(dict(d))}" if d else "")


def _entry(m: Mapping[str, Any]) -> TimelineEntry:
    detail = m["detail"] if isinstance(m["detail"], dict) else None
    d = detail or {}
    duration = d.get("duration_ms")
    return TimelineEntry(
        at=m["at"],
        kind=m["kind"],
        key=m["key"],
        tool=m["tool"],
        attempt=m["attempt"],
        by=m["owner"],
        approval_id=d.get("approval_id") if isinstance(d.get("approval_id"), str) else None,
        duration_ms=float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else None,
        summary=_summary(m["kind"], d, m["attempt"]),
        detail=displayable(detail) if detail is not None else None,
    )


def _effect(m: Mapping[str, Any], replays: int) -> TimelineEffect:
    error = m["error"]
    return TimelineEffect(
        key=m["key"],
        tool=m["tool"],
        status=Status(m["status"]),
        attempts=m["attempt"],
        replays=replays,
        args=displayable(m["args"]) if isinstance(m["args"], dict) else {},
        result=displayable(m["result"]),
        result_replayable=m["result_replayable"],
        result_repr=m["result_repr"],
        error=ErrorInfo.model_validate(error) if error else None,
        owner=m["owner"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        duration_ms=_ms(m["started_at"], m["finished_at"]),
    )


def build_timeline(
    workflow_id: str,
    effects: Sequence[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]],
    approvals: Iterable[Mapping[str, Any]],
    now: datetime,
) -> Timeline:
    """Assemble a workflow's timeline from its rows (no I/O): effect rows, audit event rows and
    approval rows. Entries are in time order; ties keep the stored order."""
    entries = [_entry(e) for e in events]
    replays: dict[str, int] = {}
    for entry in entries:
        if entry.kind == "replayed":
            replays[entry.key] = replays.get(entry.key, 0) + int((entry.detail or {}).get("count", 1))
    for m in effects:  # what the effect row itself records: the first call, a success, a running attempt
        args = displayable(m["args"]) if isinstance(m["args"], dict) else {}
        entries.append(
            TimelineEntry(
                at=m["created_at"], kind="called", key=m["key"], tool=m["tool"], summary=f"called with {_short(args)}"
            )
        )
        if m["status"] == Status.SUCCEEDED.value and m["owner"] is not None and m["finished_at"] is not None:
            not_replayable = m["result_replayable"] is False
            took = _ms(m["started_at"], m["finished_at"])
            entries.append(
                TimelineEntry(
                    at=m["finished_at"],
                    kind="succeeded",
                    key=m["key"],
                    tool=m["tool"],
                    attempt=m["attempt"],
                    by=m["owner"],
                    duration_ms=took,
                    summary=_summary("succeeded", {"not_replayable": not_replayable}, m["attempt"]),
                    detail={"duration_ms": took} if took is not None else None,
                )
            )
        if m["status"] == Status.RUNNING.value and m["started_at"] is not None:
            until = m["lease_expires_at"].isoformat() if m["lease_expires_at"] is not None else "?"
            entries.append(
                TimelineEntry(
                    at=m["started_at"],
                    kind="running",
                    key=m["key"],
                    tool=m["tool"],
                    attempt=m["attempt"],
                    by=m["owner"],
                    summary=f"attempt {m['attempt']} running (lease until {until})",
                )
            )
    entries.sort(key=lambda e: e.at)
    shown = [_effect(m, replays.get(m["key"], 0)) for m in effects]
    requests = [approval_from_row(r) for r in approvals]
    for a in requests:
        a.args = displayable(a.args)
    counts: dict[str, int] = {}
    for eff in shown:
        counts[eff.status.value] = counts.get(eff.status.value, 0) + 1
    pending = sum(1 for a in requests if a.status is ApprovalStatus.PENDING and a.expires_at > now)
    unknown = counts.get(Status.UNKNOWN.value, 0)
    times = [e.at for e in entries]
    return Timeline(
        workflow_id=workflow_id,
        effects=shown,
        approvals=requests,
        entries=entries,
        counts=counts,
        pending_approvals=pending,
        unknown=unknown,
        needs_human=bool(pending or unknown),
        first_at=min(times) if times else None,
        last_at=max(times) if times else None,
    )


# -- the workflow list -------------------------------------------------------------------------------


def encode_cursor(last_at: datetime, workflow_id: str) -> str:
    """The opaque cursor of the page after the line (``last_at``, ``workflow_id``)."""
    raw = json.dumps([last_at.isoformat(), workflow_id], ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(last activity, workflow id) of a cursor from ``WorkflowPage.next_cursor``; ``InvalidArguments``
    for anything else."""
    try:
        if not isinstance(cursor, str) or len(cursor) > 2000:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, workflow_id = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or not isinstance(workflow_id, str):
            raise ValueError("not a cursor")
        return when, workflow_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArguments("cursor is not a cursor returned by workflows()") from None


def workflows_query(
    tables: Tables,
    *,
    now: datetime,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> Any:
    """One aggregate query: a line per workflow id (from its effects and its approval requests), with
    first and last activity and counts, filtered, newest activity first, at most ``limit`` lines."""
    e, ap = tables.effects, tables.approvals
    zero, one = literal(0), literal(1)

    def is_status(value: str) -> Any:
        return case((e.c.status == value, one), else_=zero)

    statuses = [s.value for s in Status]
    effect_rows = select(
        e.c.workflow_id.label("workflow_id"),
        e.c.created_at.label("first_at"),
        func.coalesce(e.c.finished_at, e.c.started_at, e.c.created_at).label("last_at"),
        one.label("effects"),
        *[is_status(s).label(f"n_{s}") for s in statuses],
        zero.label("n_approvals"),
    )
    open_request = and_(ap.c.status == ApprovalStatus.PENDING.value, ap.c.expires_at > now)
    approval_rows = select(
        ap.c.workflow_id,
        ap.c.requested_at,
        func.coalesce(ap.c.consumed_at, ap.c.decided_at, ap.c.requested_at),
        zero,
        *[zero for _ in statuses],
        case((open_request, one), else_=zero),
    )
    rows = union_all(effect_rows, approval_rows).subquery("activity")
    last = func.max(rows.c.last_at).label("last_at")
    counts = [func.sum(rows.c[f"n_{s}"]).label(f"n_{s}") for s in statuses]
    pending = func.sum(rows.c.n_approvals).label("n_approvals")
    stmt = select(
        rows.c.workflow_id,
        func.min(rows.c.first_at).label("first_at"),
        last,
        func.sum(rows.c.effects).label("effects"),
        *counts,
        pending,
    ).group_by(rows.c.workflow_id)
    max_last = func.max(rows.c.last_at)
    if status == NEEDS_HUMAN:
        stmt = stmt.having(or_(func.sum(rows.c.n_approvals) > 0, func.sum(rows.c[f"n_{Status.UNKNOWN.value}"]) > 0))
    elif status is not None:
        stmt = stmt.having(func.sum(rows.c[f"n_{status}"]) > 0)
    if since is not None:
        stmt = stmt.having(max_last >= _bound(since, "since"))
    if until is not None:
        stmt = stmt.having(max_last < _bound(until, "until"))
    if after is not None:
        at, workflow_id = after
        stmt = stmt.having(
            or_(
                max_last < _bound(at, "after_at"),
                and_(max_last == _bound(at, "after_at2"), rows.c.workflow_id > workflow_id),
            )
        )
    return stmt.order_by(max_last.desc(), rows.c.workflow_id).limit(limit)


def effects_of_query(tables: Tables, workflow_ids: Sequence[str], per_workflow: int) -> Any:
    """One query: the latest ``per_workflow`` effects of each of these workflows (newest first)."""
    e = tables.effects
    rank = func.row_number().over(partition_by=e.c.workflow_id, order_by=(e.c.created_at.desc(), e.c.key)).label("rank")
    inner = select(e.c.workflow_id, e.c.tool, e.c.status, e.c.created_at, e.c.key, rank).where(
        e.c.workflow_id.in_(list(workflow_ids))
    )
    ranked = inner.subquery("ranked")
    return (
        select(ranked.c.workflow_id, ranked.c.tool, ranked.c.status, ranked.c.created_at, ranked.c.key)
        .where(ranked.c.rank <= per_workflow)
        .order_by(ranked.c.workflow_id, ranked.c.created_at.desc())
    )


def _bound(value: datetime, name: str) -> Any:
    return bindparam(f"wf_{name}", value, type_=UTCDateTime())


def summary_from_row(m: Mapping[str, Any]) -> WorkflowSummary:
    """A ``WorkflowSummary`` from a line of ``workflows_query``."""
    counts = {s.value: int(m[f"n_{s.value}"] or 0) for s in Status if m[f"n_{s.value}"]}
    pending = int(m["n_approvals"] or 0)
    unknown = counts.get(Status.UNKNOWN.value, 0)
    return WorkflowSummary(
        workflow_id=m["workflow_id"],
        first_at=_aware(m["first_at"]),
        last_at=_aware(m["last_at"]),
        effects=int(m["effects"] or 0),
        counts=counts,
        pending_approvals=pending,
        unknown=unknown,
        needs_human=bool(pending or unknown),
    )


def _aware(value: Any) -> datetime:
    """A datetime from an aggregate (SQLite may hand back the stored text), as aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
