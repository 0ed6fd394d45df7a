"""Statement builders, one per state change. No I/O: they return ``Work`` that a driver executes.

Every write is fenced: it names the state it expects (status, attempt, and for takeovers the observed
lease; for completions the owner too), so a change lands only if nobody else moved the row first. The
state-change statements are built once per ``Store`` with bind parameters and executed with fresh
values; filtered reads and maintenance (``effects``, ``approvals``, ``stale``, ``prunable``,
``delete_keys``, ``remember_inbound``) are built per call. The statements' dialect differences (the
upserts, ``FOR UPDATE SKIP LOCKED``) are made here; the connection's are not (SQLite's pragmas and
``BEGIN IMMEDIATE`` are set in ``_runtime``, and ``_fast`` runs the hot statements through each
driver's own connections).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Executable,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from ._decide import Charge, Row, Vote, VoteRefused, approval_sources, approval_transition, transition
from ._models import ApprovalStatus, Status
from ._schema import Tables

__all__ = [
    "EXCEEDED",
    "LIMIT_MARK",
    "EVENT_COLUMNS",
    "WAKE_LOCK_CLASS",
    "LOOKUP_COLUMNS",
    "AppendEvents",
    "ClaimNew",
    "ClaimOrLoad",
    "Finish",
    "HotOp",
    "HotStatements",
    "Lookup",
    "Store",
    "Work",
    "notify_channel",
    "row_from_mapping",
]

Returns = Literal["row", "rows", "rowcount", "none", "claim_or_row"]

LOOKUP_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Row))
"""The effect columns a lookup returns: exactly what the decision core's ``Row`` reads (``args`` only
when the stored payload hash is not the caller's; ``lease_expires_at`` and ``started_at`` only for a
running row, the one status whose decisions read them)."""

WAKE_LOCK_CLASS = 0x4C454447
"""Postgres: the first key of the advisory locks that mark a waited-on key (the second is
``hashtext(key)``). A waiting process holds the shared lock; a completion that cannot take the exclusive
one (``pg_try_advisory_xact_lock``: no wait, no WAL) knows someone waits and sends ``NOTIFY``. A hash
collision, or another application's lock on the same pair, only costs a needless notification."""


def notify_channel(tables: Tables) -> str:
    """The Postgres ``NOTIFY`` channel on which completions of these tables' waited-on keys are announced."""
    return f"{tables.effects.name[:56]}_done"


EVENT_COLUMNS: tuple[str, ...] = ("key", "workflow_id", "tool", "kind", "attempt", "owner", "at", "detail")
"""The audit columns a writer sets (the others have defaults)."""


class _Exceeded:
    """The answer of a claim that would have run the handler but did not fit a budget of its charges:
    nothing was written (the claim and every charge were rolled back together)."""

    _instance: _Exceeded | None = None

    def __new__(cls) -> _Exceeded:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EXCEEDED"


EXCEEDED = _Exceeded()

LIMIT_MARK = "agent_ledger:limit_exceeded:"
"""Postgres: the text of the deliberate cast error that aborts a limited claim over budget (the claim
and its charges are one statement; the error rolls all of it back)."""


def charge_binds(charge: Charge, now: datetime, i: int | None = None) -> dict[str, Any]:
    """Values of a charge statement (``Store.charge_statement``), or of the ``i``-th charge of a limited
    claim (``HotStatements.limited_claim``)."""
    n = "" if i is None else str(i)
    return {
        f"p_name{n}": charge.name,
        f"p_scope{n}": charge.scope,
        f"p_window_start{n}": charge.window_start,
        f"p_window_end{n}": charge.window_end,
        f"p_used{n}": charge.amount,
        f"p_cap{n}": charge.max,
        f"p_per{n}": charge.per,
        f"p_tool{n}": charge.tool,
        "p_now": now,
    }


# -- the hot operations ------------------------------------------------------------------------
#
# Each hot unit of work carries one of these typed operations (``Work.fast``). Two implementations run
# them: the reference, ``Work.steps`` executed through SQLAlchemy Core (``_runtime.Runtime`` with
# ``use_hot_path`` off), and the prebuilt one in ``_fast.Hot``, which reads only these fields and the
# statements in ``Store.hot``. tests/test_hot_contract.py runs the same operation sequences through both
# on both backends and compares every row and every answer. Slotted, not frozen: one is built per call.


@dataclass(slots=True)
class Lookup:
    """Read the row of ``key`` (in ``workflow_id``, which the key determines: the shard to ask). Answer:
    a mapping of ``LOOKUP_COLUMNS``, or None when absent."""

    key: str
    workflow_id: str

    def binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.lookup``, under their bound names (no known payload: the stored
        arguments always come back)."""
        return {"p_key": self.key, "p_workflow_id": self.workflow_id, "p_known_hash": None}

    lookup_binds = binds
    """The same (the read of ``ClaimOrLoad`` is this lookup)."""


@dataclass(slots=True)
class ClaimNew:
    """Insert ``key`` as ``running`` (attempt 1) for ``owner``.

    Answer: ``{"attempt": 1}`` to the one caller that wins; None when the key already exists.
    """

    key: str
    workflow_id: str
    tool: str
    payload_hash: str
    args: Any
    owner: str
    lease_expires_at: datetime
    now: datetime
    charges: tuple[Charge, ...] = ()
    """Budgets the claim consumes (declared limits): the winner's claim and every charge commit together,
    or nothing is written and the answer is ``EXCEEDED``."""
    _binds: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def limited_binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.limited_claim(len(charges))``: the claim's and each charge's."""
        out = dict(self.binds())
        for i, charge in enumerate(self.charges):
            out.update(charge_binds(charge, self.now, i))
        return out

    def binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.claim``, under their bound names (built once: the reference's steps
        and the fast path share them, and neither mutates them)."""
        out = self._binds
        if out is None:
            out = self._binds = {
                "p_key": self.key,
                "p_workflow_id": self.workflow_id,
                "p_tool": self.tool,
                "p_payload_hash": self.payload_hash,
                "p_args": self.args,
                "p_owner": self.owner,
                "p_lease_expires_at": self.lease_expires_at,
                "p_now": self.now,
            }
        return out

    def lookup_binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.lookup`` for this key (``ClaimOrLoad``'s read, a lost claim's): the
        stored ``args`` come back only when the stored payload hash differs from this claim's (else None:
        they are this claim's own)."""
        return {"p_key": self.key, "p_workflow_id": self.workflow_id, "p_known_hash": self.payload_hash}


@dataclass(slots=True)
class ClaimOrLoad(ClaimNew):
    """Claim the key as ``ClaimNew`` does when it is absent, or read its stored row.

    Answer: ``{"claimed": True}`` (we won the claim); ``{"claimed": False, **row}`` (the key exists; the
    row as ``Lookup`` answers it); or None (a concurrent claim won in between: look again).
    """


@dataclass(slots=True)
class Finish:
    """Record the outcome of our own attempt, fenced on key, owner, attempt and ``running``.

    With ``audited`` (every outcome but a success, whose effect row is its record) the audit row
    (kind = the new status, at = ``now``, this ``detail``) is written in the same transaction, and only
    when the outcome was. Answer: the number of effect rows changed (0: fenced off).
    """

    key: str
    workflow_id: str
    tool: str
    owner: str
    attempt: int
    status: str
    now: datetime
    result: Any
    result_replayable: bool | None
    result_repr: str | None
    error: Mapping[str, Any] | None
    retain_until: datetime | None
    detail: Mapping[str, Any] | None
    audited: bool
    started_at: datetime | None
    """When the handler started (replaces the claim's time); None keeps the claim's."""
    _binds: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.complete``, under their bound names (built once, as for
        ``ClaimNew``)."""
        out = self._binds
        if out is None:
            out = self._binds = {
                "p_key": self.key,
                "p_workflow_id": self.workflow_id,
                "p_owner": self.owner,
                "p_attempt": self.attempt,
                "p_status": self.status,
                "p_result": self.result,
                "p_result_replayable": self.result_replayable,
                "p_result_repr": self.result_repr,
                "p_error": self.error,
                "p_now": self.now,
                "p_retain_until": self.retain_until,
                "p_started_at": self.started_at,
            }
        return out

    def audit_binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.event`` for the audit row."""
        return {
            "p_key": self.key,
            "p_workflow_id": self.workflow_id,
            "p_tool": self.tool,
            "p_kind": self.status,
            "p_attempt": self.attempt,
            "p_owner": self.owner,
            "p_at": self.now,
            "p_detail": self.detail,
        }

    def audited_binds(self) -> dict[str, Any]:
        """Values of ``HotStatements.complete_audited`` (the update's, plus what the audit row adds)."""
        return {**self.binds(), "p_tool": self.tool, "p_detail": self.detail}


@dataclass(slots=True)
class AppendEvents:
    """Append audit rows (batched replay records), in one transaction. Answer: None (drivers do not all
    report an executemany's row count)."""

    rows: Sequence[Mapping[str, Any]]
    """Each with the events columns: key, workflow_id, tool, kind, attempt, owner, at, detail."""

    def binds(self) -> list[dict[str, Any]]:
        """One value set of ``HotStatements.event`` per row."""
        return [_p(r) for r in self.rows]


HotOp = Lookup | ClaimNew | ClaimOrLoad | Finish | AppendEvents
"""A typed hot operation (``ClaimOrLoad`` is a ``ClaimNew`` too: dispatch on the exact type)."""


@dataclass(frozen=True)
class HotStatements:
    """The statements of the hot operations: the public interface a prebuilt implementation compiles."""

    lookup: Select[Any]
    """``Lookup``: ``LOOKUP_COLUMNS`` of one key (and its workflow)."""
    claim: Insert
    """``ClaimNew``: insert-if-absent, returning the attempt only to the winner."""
    complete: Update
    """``Finish``: the fenced update."""
    event: Insert
    """One audit row (``Finish``'s, and each row of ``AppendEvents``)."""
    complete_audited: Insert | None
    """Postgres: ``Finish`` with its audit row as one statement (a data-modifying CTE that inserts the
    audit row only if the update matched), announcing the key to its waiters as ``complete_waking``
    does; None on SQLite (two statements in one transaction)."""
    complete_waking: Select[Any] | None
    """Postgres: ``Finish`` without an audit row (a success), which also sends ``NOTIFY`` on
    ``notify_channel`` when a process waits for the key (it holds the shared advisory lock
    ``WAKE_LOCK_CLASS``, ``hashtext(key)``). Answer: one row, the number of effect rows changed."""
    charge: Insert
    """One charge of a ``ClaimNew`` with ``charges``: add the amount to its budget if it fits (an upsert
    returning the new ``used``; no row: it does not fit). SQLite runs it after the claim, in its
    ``BEGIN IMMEDIATE`` transaction."""
    limited_claim: Callable[[int], Select[Any]]
    """Postgres: a ``ClaimNew`` with n charges as one statement (data-modifying CTEs: the claim, then
    each charge only for the claim's winner; a winner whose charges do not all fit raises a cast error
    marked ``LIMIT_MARK``, which rolls the whole statement back). Answer: the attempt, or no row."""


Steps = tuple[tuple[Executable, Mapping[str, Any] | Sequence[Mapping[str, Any]]], ...]
"""Statements of a unit of work, each with its bound values (a list of them: executemany)."""


@dataclass(slots=True)
class Work:
    """Statements to run in one transaction.

    The first statement's outcome is returned (a row mapping, all rows, or the rowcount). The rest run
    only when the first one matched (a row came back or the rowcount was positive): they are the audit
    rows of a fenced state change, written atomically with it or not at all. ``claim_or_row`` is the
    other way round (``ClaimOrLoad``): a claim that returns a row answers ``{"claimed": True}``; when it
    returns none, the second statement (a lookup) runs and its row is answered as not claimed.
    """

    steps: Steps
    """The statements with their values (read them with ``statements()``: hot units defer them)."""
    returns: Returns = "rowcount"
    write: bool = True
    label: str = field(default="", compare=False)
    fast: HotOp | None = None
    """Set on the hot units: the typed operation that ``steps`` implement, run by ``_fast.Hot``."""
    all_or_nothing: bool = False
    """Every later step must change a row too, or the whole transaction rolls back (nothing matched)."""
    then: Callable[[Any], tuple[Sequence[tuple[Executable, Mapping[str, Any]]], Any]] | None = None
    """Decide the later steps from the first step's outcome, inside the same transaction: returns the
    steps to run (none: nothing to write) and the unit's result. With ``all_or_nothing`` every one of
    them must change a row. Used where the decision needs the row read under its lock (a vote)."""
    charges: tuple[tuple[Executable, Mapping[str, Any]], ...] = ()
    """Charge statements of a claim with declared limits: run right after the claim won (before the
    other steps), each must return a row, or the transaction rolls back and the answer is ``EXCEEDED``."""
    build: Callable[[], Steps] | None = None
    """Hot units: builds ``steps`` when the reference first asks for them (``statements``); the fast
    path reads only ``fast``, so a call pays nothing for statements it does not run."""

    def statements(self) -> Steps:
        """The unit's statements (``steps``, built now if they were deferred)."""
        if self.build is not None:
            self.steps, self.build = self.build(), None
        return self.steps


def _p(params: Mapping[str, Any]) -> dict[str, Any]:
    return {f"p_{k}": v for k, v in params.items()}


def _equal(stmt: Any, table: Any, **filters: Any) -> Any:
    """``stmt`` restricted to rows whose columns equal the given filters (None: no restriction)."""
    for name, value in filters.items():
        if value is not None:
            stmt = stmt.where(table.c[name] == value)
    return stmt


_STATUSES: dict[Any, Status] = {s.value: s for s in Status}


def row_from_mapping(m: Mapping[str, Any]) -> Row:
    """Build a decision-core ``Row`` from a result mapping of the effects table."""
    status = m["status"]
    return Row(  # positionally, in Row's field order (cheaper than keywords on the hot path)
        m["key"],
        m["workflow_id"],
        m["tool"],
        _STATUSES.get(status) or Status(status),  # a dict lookup; Status() only to reject a bad one
        m["attempt"],
        m["payload_hash"],
        m["args"],
        m["owner"],
        m["lease_expires_at"],
        m["started_at"],
        m["result"],
        m["result_replayable"],
        m["result_repr"],
        m["error"],
    )


class Store:
    """Prebuilt statements for one set of tables on one dialect (``postgresql`` or ``sqlite``)."""

    def __init__(self, tables: Tables, dialect: str) -> None:
        self.tables = tables
        self.dialect = dialect
        e = tables.effects
        ev = tables.events

        def b(name: str, **kw: Any) -> Any:
            # Prefixed: bind names equal to column names are reserved in INSERT/UPDATE statements.
            return bindparam(f"p_{name}", **kw)

        # Shard-ready: every statement on a workflow's rows names its workflow_id (the distribution
        # column) whenever the caller knows it; only key-only reads (``load_record``, ``events_for_keys``)
        # and maintenance (``stale``, ``prunable``, ``delete_keys``) ask every shard. See docs/scaling.md.
        this = and_(e.c.key == b("key"), e.c.workflow_id == b("workflow_id"))
        self._load = select(e).where(e.c.key == b("key"))
        # The stored arguments only when the caller's payload differs (``p_known_hash``: the payload hash
        # the caller holds, or None): equal hashes mean equal canonical arguments, the caller's own, so a
        # replay does not fetch and decode them again.
        args = type_coerce(
            case((e.c.payload_hash == b("known_hash", type_=e.c.payload_hash.type), null()), else_=e.c.args),
            e.c.args.type,
        )
        # A lease and a start time only for a running row: decisions read them for no other status (the
        # lease to wait or take over, the start for ``InProgress``), and a replay then decodes neither.
        running = e.c.status == literal_column(f"'{Status.RUNNING.value}'")
        only_running = {
            n: type_coerce(case((running, e.c[n]), else_=null()), e.c[n].type).label(n)
            for n in ("lease_expires_at", "started_at")
        }
        shown = {"args": args.label("args"), **only_running}
        self._lookup = select(*(shown.get(n, e.c[n]) for n in LOOKUP_COLUMNS)).where(this)

        ins = postgresql.insert(e) if dialect == "postgresql" else sqlite.insert(e)
        base_claim = ins.values(
            key=b("key"),
            workflow_id=b("workflow_id"),
            tool=b("tool"),
            status=literal(transition(None, "claim").value),
            attempt=literal(1),
            payload_hash=b("payload_hash"),
            args=b("args", type_=e.c.args.type),
            owner=b("owner"),
            lease_expires_at=b("lease_expires_at", type_=e.c.lease_expires_at.type),
            created_at=b("now", type_=e.c.created_at.type),
            started_at=b("now", type_=e.c.started_at.type),
        ).on_conflict_do_nothing(index_elements=[e.c.key, e.c.workflow_id])
        self._claim_new = base_claim.returning(e.c.attempt)

        # A new claim of an existing key: fenced on the status and attempt that were observed, and for
        # a running row on the observed lease too, so a heartbeat that lands first wins the race.
        self._claim_again = (
            update(e)
            .where(
                this,
                e.c.status == b("expected_status"),
                e.c.attempt == b("expected_attempt"),
            )
            .values(
                status=Status.RUNNING.value,
                attempt=e.c.attempt + 1,
                owner=b("owner"),
                lease_expires_at=b("lease_expires_at", type_=e.c.lease_expires_at.type),
                started_at=b("now", type_=e.c.started_at.type),
                finished_at=None,
                result=None,
                result_replayable=None,
                result_repr=None,
            )
        )
        self._claim_running = self._claim_again.where(
            e.c.lease_expires_at == b("observed_lease", type_=e.c.lease_expires_at.type)
        )

        owned = and_(
            this,
            e.c.owner == b("owner"),
            e.c.attempt == b("attempt"),
            e.c.status == Status.RUNNING.value,
        )
        self._heartbeat = (
            update(e).where(owned).values(lease_expires_at=b("lease_expires_at", type_=e.c.lease_expires_at.type))
        )
        self._complete = (
            update(e)
            .where(owned)
            .values(
                status=b("status"),
                result=b("result", type_=e.c.result.type),
                result_replayable=b("result_replayable"),
                result_repr=b("result_repr"),
                error=b("error", type_=e.c.error.type),
                lease_expires_at=None,
                # When the handler started (the claim's time until then): the duration of an attempt
                # is the handler's, not the first call's warm-up (engine, schema check, migration).
                started_at=func.coalesce(b("started_at", type_=e.c.started_at.type), e.c.started_at),
                finished_at=b("now", type_=e.c.finished_at.type),
                retain_until=b("retain_until", type_=e.c.retain_until.type),
            )
        )
        self._mark_unknown = (
            update(e)
            .where(
                this,
                e.c.status == Status.RUNNING.value,
                e.c.attempt == b("expected_attempt"),
                e.c.lease_expires_at == b("observed_lease", type_=e.c.lease_expires_at.type),
            )
            .values(
                status=transition(Status.RUNNING, "mark_unknown").value,
                lease_expires_at=None,
                finished_at=b("now", type_=e.c.finished_at.type),
            )
        )
        self._resolve = (
            update(e)
            .where(this, e.c.status == b("expected_status"), e.c.attempt == b("expected_attempt"))
            .values(
                status=b("status"),
                result=b("result", type_=e.c.result.type),
                result_replayable=b("result_replayable"),
                result_repr=b("result_repr"),
                error=b("error", type_=e.c.error.type),
                owner=None,
                lease_expires_at=None,
                finished_at=b("now", type_=e.c.finished_at.type),
            )
        )
        self._event = insert(ev).values(
            key=b("key"),
            workflow_id=b("workflow_id"),
            tool=b("tool"),
            kind=b("kind"),
            attempt=b("attempt"),
            owner=b("owner"),
            at=b("at", type_=ev.c.at.type),
            detail=b("detail", type_=ev.c.detail.type),
        )
        ap = tables.approvals
        self._latest_approval = (
            select(ap)
            .where(ap.c.key == b("key"), ap.c.workflow_id == b("workflow_id"), ap.c.payload_hash == b("payload_hash"))
            .order_by(ap.c.requested_at.desc())
            .limit(1)
        )
        this_ap = and_(ap.c.id == b("id"), ap.c.workflow_id == b("workflow_id"))
        self._approval = select(ap).where(ap.c.id == b("id"))
        self._approval_in = select(ap).where(this_ap)
        ap_ins = postgresql.insert(ap) if dialect == "postgresql" else sqlite.insert(ap)
        self._request_approval = (
            ap_ins.values(
                id=b("id"),
                key=b("key"),
                workflow_id=b("workflow_id"),
                tool=b("tool"),
                payload_hash=b("payload_hash"),
                args=b("args", type_=ap.c.args.type),
                status=literal(approval_transition(None, "request").value),
                approvers=b("approvers", type_=ap.c.approvers.type),
                quorum=b("quorum"),
                approved_count=literal(0),
                approved_by=b("approved_by", type_=ap.c.approved_by.type),
                requested_by=b("requested_by"),
                requested_at=b("now", type_=ap.c.requested_at.type),
                expires_at=b("expires_at", type_=ap.c.expires_at.type),
            )
            .on_conflict_do_nothing()
            .returning(ap.c.id)
        )
        self._expire_approval = (
            update(ap)
            .where(
                this_ap,
                ap.c.status.in_(approval_sources("expire")),
                ap.c.expires_at <= b("now", type_=ap.c.expires_at.type),
            )
            .values(status=approval_transition(ApprovalStatus.PENDING, "expire").value)
        )
        self._supersede_approval = (
            update(ap)
            .where(this_ap, ap.c.status.in_(approval_sources("supersede")))
            .values(status=approval_transition(ApprovalStatus.PENDING, "supersede").value)
        )
        e_ran = e.c.payload_hash.label("ran_with")
        same_key = and_(e.c.key == ap.c.key, e.c.workflow_id == ap.c.workflow_id)  # a colocated join
        self._approval_for_vote = select(ap, e_ran).select_from(ap.outerjoin(e, same_key)).where(this_ap)
        if dialect == "postgresql":  # voters queue on the request's row; SQLite's BEGIN IMMEDIATE does it
            self._approval_for_vote = self._approval_for_vote.with_for_update(of=ap)
        self._open_superseded = (
            select(ap, e_ran)
            .select_from(ap.join(e, same_key))
            .where(ap.c.status.in_(approval_sources("supersede")), e.c.payload_hash != ap.c.payload_hash)
        )
        self._cast_vote = (
            update(ap)
            .where(
                this_ap,
                ap.c.status == ApprovalStatus.PENDING.value,
                ap.c.approved_count == b("observed_count"),
                ap.c.expires_at > b("now", type_=ap.c.expires_at.type),
            )
            .values(
                status=b("status"),
                approved_count=b("approved_count"),
                approved_by=b("approved_by", type_=ap.c.approved_by.type),
                decided_at=b("decided_at", type_=ap.c.decided_at.type),
                decided_by=b("decided_by"),
                reason=b("reason"),
            )
        )
        vt = tables.votes
        vt_ins = postgresql.insert(vt) if dialect == "postgresql" else sqlite.insert(vt)
        self._insert_vote = vt_ins.values(
            workflow_id=b("workflow_id"),
            approval_id=b("id"),
            approver=b("by"),
            decision=b("decision"),
            reason=b("reason"),
            at=b("now", type_=vt.c.at.type),
        ).on_conflict_do_nothing(index_elements=[vt.c.approval_id, vt.c.approver, vt.c.workflow_id])
        self._consume_approval = (
            update(ap)
            .where(
                this_ap,
                ap.c.status.in_(approval_sources("consume")),
                ap.c.payload_hash == b("payload_hash"),
                ap.c.expires_at > b("now", type_=ap.c.expires_at.type),
            )
            .values(
                status=approval_transition(ApprovalStatus.APPROVED, "consume").value,
                consumed_at=b("now", type_=ap.c.consumed_at.type),
            )
        )
        self._set_channel_state = (
            update(ap).where(this_ap).values(channel_state=b("state", type_=ap.c.channel_state.type))
        )
        self._events_for_workflow = select(ev).where(ev.c.workflow_id == b("workflow_id")).order_by(ev.c.id)

        us = tables.usage
        self._usage = us

        def charge_stmt(n: str, source: Any = None, forced: bool = False) -> Any:
            """The upsert of one charge (binds suffixed ``n``), selected from ``source`` (a CTE) if given."""
            values = select(
                b(f"name{n}", type_=us.c.name.type),
                b(f"scope{n}", type_=us.c.scope.type),
                b(f"window_start{n}", type_=us.c.window_start.type),
                b(f"window_end{n}", type_=us.c.window_end.type),
                b(f"used{n}", type_=us.c.used.type),
                b(f"cap{n}", type_=us.c.cap.type),
                b(f"per{n}", type_=us.c.per.type),
                b(f"tool{n}", type_=us.c.tool.type),
                b("now", type_=us.c.updated_at.type),
            )
            if source is not None:
                values = values.select_from(source)
            fits = b(f"used{n}", type_=us.c.used.type) <= b(f"cap{n}", type_=us.c.cap.type)
            # SQLite needs a WHERE on an INSERT ... SELECT with an upsert clause (a parsing ambiguity).
            values = values.where(literal(1) == literal(1) if forced else fits)
            ins_u = postgresql.insert(us) if dialect == "postgresql" else sqlite.insert(us)
            columns = ["name", "scope", "window_start", "window_end", "used", "cap", "per", "tool", "updated_at"]
            up = ins_u.from_select(columns, values)
            total = us.c.used + up.excluded.used
            return up.on_conflict_do_update(
                index_elements=[us.c.name, us.c.scope, us.c.window_start],
                set_={
                    "used": total,
                    "cap": up.excluded.cap,
                    "window_end": up.excluded.window_end,
                    "updated_at": up.excluded.updated_at,
                },
                where=None if forced else total <= up.excluded.cap,
            ).returning(us.c.used)

        self._charge = charge_stmt("")
        self._charge_forced = charge_stmt("", forced=True)
        self._limited: dict[int, Select[Any]] = {}

        def limited_claim(n: int) -> Select[Any]:
            stmt = self._limited.get(n)
            if stmt is None:
                claimed = base_claim.returning(e.c.attempt, e.c.key).cte("claimed")
                paid = [charge_stmt(str(i), claimed).cte(f"charge{i}") for i in range(n)]
                count = sum((select(func.count()).select_from(p).scalar_subquery() for p in paid), literal(0))
                # A winner whose charges did not all fit: a cast error that aborts (and so rolls back)
                # the whole statement. Built from a column so the planner cannot fold it ahead of time.
                refuse = cast(literal(LIMIT_MARK) + claimed.c.key, Integer)
                built: Select[Any] = select(
                    claimed.c.attempt, case((count < n, refuse), else_=literal(0)).label("fits")
                ).select_from(claimed)
                stmt = self._limited[n] = built
            return stmt

        complete_audited = complete_waking = None
        if dialect == "postgresql":
            # A completion announces its key (NOTIFY, payload the key) only when a process waits for it:
            # then that process holds the shared advisory lock on (WAKE_LOCK_CLASS, hashtext(key)) and
            # this statement's exclusive try fails (``_fast.Listener``). No wait, no WAL otherwise.
            def waking(done: Any) -> Any:
                tried = func.pg_try_advisory_xact_lock(
                    literal(WAKE_LOCK_CLASS), func.hashtext(done.c.key), type_=Boolean
                )
                notify = (
                    select(func.pg_notify(literal(notify_channel(tables)), done.c.key))
                    .where(not_(tried))
                    .correlate(done)
                )
                return done.outerjoin(notify.lateral("wake"), true())

            done = self._complete.returning(e.c.key).cte("done")
            complete_waking = select(func.count()).select_from(waking(done))
            # One round trip for an outcome and its audit row: the update runs in a data-modifying CTE
            # and the audit row is selected from what it returned, so it exists only if the update
            # matched. Its values are the update's own binds where they coincide (key, owner, attempt,
            # status as the kind, now as the time).
            audit = select(
                done.c.key,
                b("workflow_id", type_=ev.c.workflow_id.type),
                b("tool", type_=ev.c.tool.type),
                b("status", type_=ev.c.kind.type),
                b("attempt", type_=ev.c.attempt.type),
                b("owner", type_=ev.c.owner.type),
                b("now", type_=ev.c.at.type),
                b("detail", type_=ev.c.detail.type),
            ).select_from(waking(done))
            complete_audited = insert(ev).from_select(list(EVENT_COLUMNS), audit)
        self.hot = HotStatements(
            lookup=self._lookup,
            claim=self._claim_new,
            complete=self._complete,
            event=self._event,
            complete_audited=complete_audited,
            complete_waking=complete_waking,
            charge=self._charge,
            limited_claim=limited_claim,
        )
        """The hot operations' statements (for ``_fast.Hot``; the reference runs them in ``Work.steps``)."""

    # -- reads -------------------------------------------------------------------------------

    def load(self, key: str, workflow_id: str) -> Work:
        """The stored row of ``key`` in ``workflow_id`` (or None): the ``LOOKUP_COLUMNS`` the decision
        core reads."""
        op = Lookup(key, workflow_id)
        return Work((), returns="row", write=False, label="load", fast=op, build=lambda: ((self._lookup, op.binds()),))

    def load_record(self, key: str) -> Work:
        """The stored row of ``key`` with every column converted (for audit and admin reads). By key
        alone: on a sharded database, a query of every shard."""
        return Work(((self._load, _p({"key": key})),), returns="row", write=False, label="load")

    def events_for_workflow(self, workflow_id: str) -> Work:
        """Every audit event of a workflow, oldest first."""
        return Work(((self._events_for_workflow, _p({"workflow_id": workflow_id})),), "rows", False, "events")

    def stale(self, *, now: datetime, host_prefix: str, limit: int) -> Work:
        """Running effects whose lease expired (or whose owner ran on this host), locked for one sweeper.

        On Postgres the rows are locked ``FOR UPDATE SKIP LOCKED``, so concurrent sweepers each get
        different rows; SQLite's write transaction (BEGIN IMMEDIATE) serialises sweepers instead.
        """
        e = self.tables.effects
        stmt = (
            select(e)
            .where(
                e.c.status == Status.RUNNING.value,
                or_(
                    e.c.lease_expires_at <= bindparam("p_now", type_=e.c.lease_expires_at.type),
                    e.c.owner.like(bindparam("p_host_prefix")),
                ),
            )
            .order_by(e.c.lease_expires_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        return Work(((stmt, _p({"now": now, "host_prefix": host_prefix})),), "rows", True, "recover")

    # -- approvals -------------------------------------------------------------------------

    def latest_approval(self, key: str, workflow_id: str, payload_hash: str) -> Work:
        """The newest approval request for exactly this key (of ``workflow_id``) and payload (or None)."""
        params = _p({"key": key, "workflow_id": workflow_id, "payload_hash": payload_hash})
        return Work(((self._latest_approval, params),), "row", False, "approval")

    def approval(self, approval_id: str, workflow_id: str | None = None) -> Work:
        """One approval by id (or None), in ``workflow_id`` when the caller knows it (else, on a sharded
        database, a query of every shard)."""
        if workflow_id is None:
            return Work(((self._approval, _p({"id": approval_id})),), "row", False, "approval")
        return Work(
            ((self._approval_in, _p({"id": approval_id, "workflow_id": workflow_id})),), "row", False, "approval"
        )

    def approvals(
        self,
        *,
        status: str | None,
        workflow_id: str | None,
        tool: str | None,
        now: datetime | None,
        runnable: bool = False,
    ) -> Work:
        """Approvals filtered by status / workflow / tool (pending ones still open at ``now``); with
        ``runnable``, only those whose key does not already hold a call with another payload."""
        ap = self.tables.approvals
        stmt = _equal(select(ap).order_by(ap.c.requested_at), ap, status=status, workflow_id=workflow_id, tool=tool)
        if now is not None:
            stmt = stmt.where(ap.c.expires_at > now)
        if runnable:
            e = self.tables.effects
            other = select(e.c.key).where(
                e.c.key == ap.c.key, e.c.workflow_id == ap.c.workflow_id, e.c.payload_hash != ap.c.payload_hash
            )
            stmt = stmt.where(~other.exists())
        return Work(((stmt, {}),), "rows", False, "approvals")

    def request_approval(
        self,
        *,
        approval_id: str,
        key: str,
        workflow_id: str,
        tool: str,
        payload_hash: str,
        args: Any,
        approvers: list[str] | None,
        now: datetime,
        expires_at: datetime,
        actor: str,
        quorum: int = 1,
        requested_by: str | None = None,
    ) -> Work:
        """Open a request for this payload; returns a row unless one is already pending for it."""
        params = {
            "id": approval_id,
            "key": key,
            "workflow_id": workflow_id,
            "tool": tool,
            "payload_hash": payload_hash,
            "args": args,
            "approvers": approvers,
            "quorum": quorum,
            "approved_by": [],
            "requested_by": requested_by,
            "now": now,
            "expires_at": expires_at,
        }
        audit = self._event_params(
            key,
            workflow_id,
            tool,
            "approval_requested",
            None,
            actor,
            now,
            {
                "approval_id": approval_id,
                "payload_hash": payload_hash,
                "expires_at": expires_at.isoformat(),
                "quorum": quorum,
                "approvers": approvers,
                "requested_by": requested_by,
            },
        )
        return Work(((self._request_approval, _p(params)), (self._event, _p(audit))), "row", label="approval")

    def expire_approval(self, row: Mapping[str, Any], *, now: datetime, actor: str) -> Work:
        """Mark an approval whose time ran out (pending, or approved but unused) as expired."""
        audit = self._event_params(
            row["key"],
            row["workflow_id"],
            row["tool"],
            "approval_expired",
            None,
            actor,
            now,
            {"approval_id": row["id"], "was": row["status"], "expires_at": row["expires_at"].isoformat()},
        )
        return Work(
            (
                (self._expire_approval, _p({"id": row["id"], "workflow_id": row["workflow_id"], "now": now})),
                (self._event, _p(audit)),
            ),
            label="approval",
        )

    def vote(
        self,
        approval_id: str,
        workflow_id: str,
        *,
        judge: Callable[[Mapping[str, Any]], Vote | VoteRefused],
        by: str,
        reason: str | None,
        now: datetime,
    ) -> Work:
        """One human's vote, in one transaction: read the request under its row lock (with the payload
        its key ran with), let ``judge`` (the pure core's ``judge_vote``) rule on that row, then write
        the vote row (unique per approver), the request's new state and the audit row together.

        Returns ``(row, verdict)``: the row as read (None: no such request) and the ``Vote`` recorded
        or the ``VoteRefused``; None when a concurrent write won (ask again).
        """

        def then(found: Any) -> tuple[list[tuple[Executable, Mapping[str, Any]]], Any]:
            if found is None:
                return [], (None, None)
            row = dict(found)
            verdict = judge(row)
            if isinstance(verdict, VoteRefused):
                return [], (row, verdict)
            settles = verdict.event != "vote"
            approved_by = list(row["approved_by"] or [])
            if verdict.event != "reject":
                approved_by.append(by)
            params = {
                "id": row["id"],
                "workflow_id": row["workflow_id"],
                "observed_count": row["approved_count"],
                "now": now,
                "status": approval_transition(ApprovalStatus(row["status"]), verdict.event).value,
                "approved_count": len(approved_by),
                "approved_by": approved_by,
                "decided_at": now if settles else row["decided_at"],
                "decided_by": by if settles else row["decided_by"],
                "reason": reason if settles else row["reason"],
            }
            decision = "reject" if verdict.event == "reject" else "approve"
            kind = {"vote": "approval_vote", "approve": "approved", "reject": "rejected"}[verdict.event]
            detail = {
                "approval_id": row["id"],
                "payload_hash": row["payload_hash"],
                "decision": decision,
                "reason": reason,
                "approvals": f"{len(approved_by)} of {row['quorum']}",
                "approved_by": approved_by,
            }
            audit = self._event_params(row["key"], row["workflow_id"], row["tool"], kind, None, by, now, detail)
            vote = {
                "id": row["id"],
                "workflow_id": row["workflow_id"],
                "by": by,
                "decision": decision,
                "reason": reason,
                "now": now,
            }
            steps: list[tuple[Executable, Mapping[str, Any]]] = [
                (self._cast_vote, _p(params)),
                (self._insert_vote, _p(vote)),
                (self._event, _p(audit)),
            ]
            return steps, (row, verdict)

        return Work(
            ((self._approval_for_vote, _p({"id": approval_id, "workflow_id": workflow_id})),),
            "row",
            label="approval",
            all_or_nothing=True,
            then=then,
        )

    def open_for_other_payloads(self, key: str, workflow_id: str, payload_hash: str) -> Work:
        """Open requests (pending or approved) for ``key`` (of ``workflow_id``) with another payload than
        ``payload_hash``."""
        ap = self.tables.approvals
        stmt = select(ap).where(
            ap.c.key == key,
            ap.c.workflow_id == workflow_id,
            ap.c.payload_hash != payload_hash,
            ap.c.status.in_(approval_sources("supersede")),
        )
        return Work(((stmt, {}),), "rows", False, "approval")

    def open_superseded(self) -> Work:
        """Open requests (pending or approved) whose key ran with another payload (column ``ran_with``)."""
        return Work(((self._open_superseded, {}),), "rows", False, "approval")

    def supersede_approval(self, row: Mapping[str, Any], *, ran_with: str, now: datetime, actor: str) -> Work:
        """Mark an open request superseded (its key ran with the payload ``ran_with``), with its audit row."""
        audit = self._event_params(
            row["key"],
            row["workflow_id"],
            row["tool"],
            "approval_superseded",
            None,
            actor,
            now,
            {"approval_id": row["id"], "was": row["status"], "payload_hash": row["payload_hash"], "ran_with": ran_with},
        )
        return Work(
            (
                (self._supersede_approval, _p({"id": row["id"], "workflow_id": row["workflow_id"]})),
                (self._event, _p(audit)),
            ),
            label="approval",
        )

    def set_channel_state(self, approval_id: str, workflow_id: str, state: Mapping[str, Any]) -> Work:
        """Remember where channels posted a request (e.g. a Slack message), to update it later."""
        params = _p({"id": approval_id, "workflow_id": workflow_id, "state": dict(state)})
        return Work(((self._set_channel_state, params),), label="approval")

    def consuming(
        self,
        work: Work,
        *,
        approval_id: str,
        payload_hash: str,
        now: datetime,
        actor: str,
        plan_event: Mapping[str, Any],
    ) -> Work:
        """``work`` (a claim) that also uses up the approval, atomically: both happen or neither does."""
        consume = _p(
            {"id": approval_id, "workflow_id": plan_event["workflow_id"], "payload_hash": payload_hash, "now": now}
        )
        audit = self._event_params(
            plan_event["key"],
            plan_event["workflow_id"],
            plan_event["tool"],
            "approval_consumed",
            plan_event.get("attempt"),
            actor,
            now,
            {"approval_id": approval_id, "payload_hash": payload_hash},
        )
        steps = (*work.statements(), (self._consume_approval, consume), (self._event, _p(audit)))
        return Work(steps, work.returns, work.write, work.label, all_or_nothing=True, charges=work.charges)

    # -- limits ------------------------------------------------------------------------------

    def usage_of(self, charges: Sequence[Charge]) -> Work:
        """The usage rows of these charges' budgets (to explain a refusal)."""
        us = self._usage
        wanted = [(c.name, c.scope, c.window_start) for c in charges]
        stmt = select(us).where(tuple_(us.c.name, us.c.scope, us.c.window_start).in_(wanted))
        return Work(((stmt, {}),), "rows", False, "usage")

    def usage(self, *, now: datetime, workflow_id: str | None = None, tool: str | None = None) -> Work:
        """Usage rows of the windows open at ``now``: with ``workflow_id``, the budgets that constrain
        that workflow (its own, and the shared per-tool and per-ledger ones; a custom scope, such as a
        tenant, is not tied to a workflow); with ``tool``, the budgets of limits that cover that tool."""
        us = self._usage
        stmt = select(us).where(or_(us.c.window_end.is_(None), us.c.window_end > now)).order_by(us.c.name, us.c.scope)
        if workflow_id is not None:
            stmt = stmt.where(or_(us.c.per.in_(("tool", "ledger")), us.c.scope == workflow_id))
        if tool is not None:
            stmt = stmt.where(
                or_(us.c.tool == tool, and_(us.c.tool.is_(None), or_(us.c.per != "tool", us.c.scope == tool)))
            )
        return Work(((stmt, {}),), "rows", False, "usage")

    def reset_usage(self, *, name: str, scope: str, by: str, now: datetime) -> Work:
        """Start a budget again (delete its usage rows, every window) with its audit row
        (``limit_reset``, on the workflow id ``scope``); rowcount 0: nothing to reset."""
        us = self._usage
        audit = self._event_params("limits", scope, name, "limit_reset", None, by, now, {"limit": name, "scope": scope})
        return Work(
            ((delete(us).where(us.c.name == name, us.c.scope == scope), {}), (self._event, _p(audit))),
            label="usage",
        )

    def remember_inbound(self, *, message_id: str, source: str, now: datetime) -> Work:
        """Record a signed inbound message id; returns a row only the first time that id is seen."""
        ib = self.tables.inbound
        ins = postgresql.insert(ib) if self.dialect == "postgresql" else sqlite.insert(ib)
        stmt = (
            ins.values(message_id=message_id, source=source, received_at=now)
            .on_conflict_do_nothing()
            .returning(ib.c.message_id)
        )
        return Work(((stmt, {}),), "row", True, "inbound")

    def effects(
        self,
        *,
        workflow_id: str | None = None,
        tool: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> Work:
        """Effects matching every given filter (created in [since, until)), oldest first."""
        e = self.tables.effects
        stmt = _equal(select(e).order_by(e.c.created_at, e.c.key), e, workflow_id=workflow_id, tool=tool, status=status)
        if since is not None:
            stmt = stmt.where(e.c.created_at >= since)
        if until is not None:
            stmt = stmt.where(e.c.created_at < until)
        if limit is not None:
            stmt = stmt.limit(limit)
        return Work(((stmt, {}),), "rows", False, "effects")

    def events_for_keys(self, keys: Sequence[str], workflow_ids: Sequence[str] | None = None) -> Work:
        """The audit events of these keys, oldest first; ``workflow_ids``: the keys' workflows, when the
        caller knows them (the shards to ask; None: every shard)."""
        ev = self.tables.events
        stmt = select(ev).where(ev.c.key.in_(list(keys))).order_by(ev.c.id)
        if workflow_ids is not None:
            stmt = stmt.where(ev.c.workflow_id.in_(list(workflow_ids)))
        return Work(((stmt, {}),), "rows", False, "events")

    def prunable(self, *, now: datetime, finished_before: datetime | None, limit: int, after: Any = None) -> Work:
        """One batch of settled effects to delete: past their retention (``finished_before`` None), or
        finished before the cutoff. Each batch reads an index range from where the last one stopped
        (``after``: the last row's ``retain_until``, or its key for a cutoff), so pruning a million rows
        costs one pass over them, not a scan and a sort per batch."""
        e = self.tables.effects
        settled = e.c.status.in_([Status.SUCCEEDED.value, Status.FAILED.value])
        if finished_before is None:  # the retention index, in its order
            stmt = select(e.c.key, e.c.retain_until).where(settled, e.c.retain_until <= now)
            if after is not None:
                stmt = stmt.where(e.c.retain_until >= after)  # >=: ties with the last row; deleted rows are gone
            stmt = stmt.order_by(e.c.retain_until)
        else:  # no index on finished_at: walk the primary key
            stmt = select(e.c.key).where(settled, e.c.finished_at < finished_before)
            if after is not None:
                stmt = stmt.where(e.c.key > after)
            stmt = stmt.order_by(e.c.key)
        return Work(((stmt.limit(limit), {}),), "rows", False, "prune")

    def delete_keys(self, keys: Sequence[str]) -> Work:
        """Delete effects (still settled), their events, approvals and votes, in one transaction."""
        t = self.tables
        keys = list(keys)
        settled = [Status.SUCCEEDED.value, Status.FAILED.value]
        if self.dialect == "postgresql":
            # One array parameter (``key = ANY(...)``), not hundreds of expanded ones: expanding and
            # parsing an IN list of a batch in each of the statements cost more than running them.
            array = bindparam("keys", keys, type_=postgresql.ARRAY(t.effects.c.key.type))

            def among(col: Any) -> Any:
                return col == any_(array)

        else:

            def among(col: Any) -> Any:
                return col.in_(keys)

        # Events and approvals go only with an effect row that was really deleted here: a key that was
        # retried (and is running again) since it was selected keeps its row and its audit trail.
        e = t.effects
        gone = ~select(e.c.key).where(e.c.key == t.events.c.key, e.c.workflow_id == t.events.c.workflow_id).exists()
        gone_approvals = ~(
            select(e.c.key).where(e.c.key == t.approvals.c.key, e.c.workflow_id == t.approvals.c.workflow_id).exists()
        )
        doomed = and_(among(t.approvals.c.key), gone_approvals)
        doomed_ids = select(t.approvals.c.id).where(doomed, t.approvals.c.workflow_id == t.votes.c.workflow_id)
        return Work(
            (
                (delete(t.effects).where(among(e.c.key), e.c.status.in_(settled)), {}),
                (delete(t.events).where(among(t.events.c.key), gone), {}),
                (delete(t.votes).where(t.votes.c.approval_id.in_(doomed_ids)), {}),
                (delete(t.approvals).where(doomed), {}),
            ),
            label="prune",
        )

    def forget_inbound(self, *, message_id: str) -> Work:
        """Drop a recorded inbound id (its processing failed before deciding anything)."""
        ib = self.tables.inbound
        return Work(((delete(ib).where(ib.c.message_id == message_id), {}),), label="inbound")

    # -- state changes ---------------------------------------------------------------------

    def claim_new(
        self,
        *,
        key: str,
        workflow_id: str,
        tool: str,
        payload_hash: str,
        args: Any,
        owner: str,
        lease_expires_at: datetime,
        now: datetime,
        charges: tuple[Charge, ...] = (),
    ) -> Work:
        """Insert the row as ``running`` for ``owner``; returns a row only to the one caller that wins.

        With ``charges`` the winner also consumes them, atomically: ``EXCEEDED`` (nothing written) when
        one does not fit its budget. A forced charge (an approved call past its limit) always fits."""
        return self.claim_new_op(
            ClaimNew(key, workflow_id, tool, payload_hash, args, owner, lease_expires_at, now, charges)
        )

    def claim_new_op(self, op: ClaimNew) -> Work:
        """``claim_new`` of an operation already built (the flow builds it positionally)."""
        charges, now = op.charges, op.now
        if not charges:
            return Work((), returns="row", label="claim", fast=op, build=lambda: ((self._claim_new, op.binds()),))
        return Work(
            ((self._claim_new, op.binds()),),
            returns="row",
            label="claim",
            # A forced charge (an approved call past its limit) is never on the hot path: the claim
            # that carries it also consumes the approval, which only the reference runs.
            fast=None if any(c.forced for c in charges) else op,
            charges=self.charge_steps(charges, now),
        )

    def charge_steps(
        self, charges: tuple[Charge, ...], now: datetime
    ) -> tuple[tuple[Executable, Mapping[str, Any]], ...]:
        """The charge statements of a claim (``Work.charges``), one per charge."""
        return tuple((self._charge_forced if c.forced else self._charge, charge_binds(c, now)) for c in charges)

    def claim_or_load(self, **claim: Any) -> Work:
        """Return the stored row of the key, or claim the key as ``claim_new`` would when it is absent
        (it takes ``claim_new``'s arguments).

        The result has ``claimed`` (True: we won the claim; False: the stored row follows), or is None
        when a concurrent claim won in between (look again).
        """
        return self.claim_or_load_op(ClaimOrLoad(**claim))

    def claim_or_load_op(self, op: ClaimOrLoad) -> Work:
        """``claim_or_load`` of an operation already built (the flow builds it positionally: a replay's
        only unit of work, so it skips passing the claim's values by name twice)."""

        def steps() -> Steps:
            return ((self._claim_new, op.binds()), (self._lookup, op.lookup_binds()))

        if not op.charges:
            return Work((), "claim_or_row", True, "claim", fast=op, build=steps)
        charges = self.charge_steps(op.charges, op.now)
        return Work((), "claim_or_row", True, "claim", fast=op, charges=charges, build=steps)

    def claim_again(
        self,
        *,
        event: str,
        row: Row,
        owner: str,
        lease_expires_at: datetime,
        now: datetime,
        detail: Mapping[str, Any] | None = None,
        charges: tuple[Charge, ...] = (),
    ) -> Work:
        """Claim an existing key for a retry, takeover or reconciliation; rowcount 1 only for the winner
        (with ``charges``: consumed by the winner in the same transaction, or ``EXCEEDED``)."""
        transition(row.status, event)
        params: dict[str, Any] = {
            "key": row.key,
            "workflow_id": row.workflow_id,
            "expected_status": row.status.value,
            "expected_attempt": row.attempt,
            "owner": owner,
            "lease_expires_at": lease_expires_at,
            "now": now,
        }
        stmt = self._claim_again
        if row.status is Status.RUNNING:
            stmt = self._claim_running
            params["observed_lease"] = row.lease_expires_at
        audit = self._event_params(
            row.key,
            row.workflow_id,
            row.tool,
            event,
            row.attempt + 1,
            owner,
            now,
            {"previous_status": row.status.value, "previous_owner": row.owner, **(detail or {})},
        )
        return Work(
            ((stmt, _p(params)), (self._event, _p(audit))), label=event, charges=self.charge_steps(charges, now)
        )

    def heartbeat(self, *, key: str, workflow_id: str, owner: str, attempt: int, lease_expires_at: datetime) -> Work:
        """Extend the lease of a live claim; rowcount 0 means the claim was lost."""
        params = {
            "key": key,
            "workflow_id": workflow_id,
            "owner": owner,
            "attempt": attempt,
            "lease_expires_at": lease_expires_at,
        }
        return Work(((self._heartbeat, _p(params)),), label="heartbeat")

    def finish(
        self,
        *,
        event: Literal["succeed", "fail", "mark_unknown"],
        key: str,
        workflow_id: str,
        tool: str,
        owner: str,
        attempt: int,
        now: datetime,
        result: Any = None,
        result_replayable: bool | None = None,
        result_repr: str | None = None,
        error: Mapping[str, Any] | None = None,
        detail: Mapping[str, Any] | None = None,
        retain_until: datetime | None = None,
        started_at: datetime | None = None,
    ) -> Work:
        """Record the outcome of our own attempt, fenced on owner and attempt, with its audit row;
        ``started_at`` (when the handler started) replaces the claim's time."""
        status = transition(Status.RUNNING, event)
        # The effect row is the execution record of a success (succeeded is terminal, so nothing
        # overwrites it); history() shows it as a "succeeded" event. One write per call, not two.
        audited = event != "succeed"
        op = Finish(  # positional (in field order): built on every call, and keywords cost twice as much
            key,
            workflow_id,
            tool,
            owner,
            attempt,
            status.value,
            now,
            result,
            result_replayable,
            result_repr,
            error,
            retain_until,
            dict(detail or {}) if audited else None,
            audited,
            started_at,
        )
        if not audited:
            return Work((), label=event, fast=op, build=lambda: ((self._complete, op.binds()),))
        return Work(
            (), label=event, fast=op, build=lambda: ((self._complete, op.binds()), (self._event, op.audit_binds()))
        )

    def finish_audited(self, *, kind: str, **finish: Any) -> Work:
        """``finish`` (same arguments) plus an audit row of ``kind`` carrying its ``detail``, in one
        transaction: for an outcome whose detail must reach the audit trail even though ``finish``
        writes none for it (a success found by a reconcile callback). Not a hot unit."""
        (complete, *_rest) = self.finish(**finish).statements()
        audit = self._event_params(
            finish["key"],
            finish["workflow_id"],
            finish["tool"],
            kind,
            finish["attempt"],
            finish["owner"],
            finish["now"],
            finish.get("detail"),
        )
        return Work((complete, (self._event, _p(audit))), label=kind)

    def mark_unknown(self, *, row: Row, now: datetime, by: str, detail: Mapping[str, Any]) -> Work:
        """Record that the observed attempt's outcome is unknown (its owner died or its lease ran out)."""
        params = {
            "key": row.key,
            "workflow_id": row.workflow_id,
            "expected_attempt": row.attempt,
            "observed_lease": row.lease_expires_at,
            "now": now,
        }
        audit = self._event_params(
            row.key,
            row.workflow_id,
            row.tool,
            "marked_unknown",
            row.attempt,
            row.owner,
            now,
            {"by": by, **detail},
        )
        return Work(((self._mark_unknown, _p(params)), (self._event, _p(audit))), label="mark_unknown")

    def resolve(
        self,
        *,
        row: Row,
        event: Literal["resolve_result", "resolve_error", "resolve_retry"],
        by: str,
        now: datetime,
        result: Any = None,
        result_replayable: bool | None = None,
        result_repr: str | None = None,
        error: Mapping[str, Any] | None = None,
        reason: str | None = None,
    ) -> Work:
        """Settle an effect by hand (or by a reconcile callback), fenced on its observed state."""
        status = transition(row.status, event)
        params = {
            "key": row.key,
            "workflow_id": row.workflow_id,
            "expected_status": row.status.value,
            "expected_attempt": row.attempt,
            "status": status.value,
            "result": result,
            "result_replayable": result_replayable,
            "result_repr": result_repr,
            "error": error,
            "now": now,
        }
        audit = self._event_params(
            row.key,
            row.workflow_id,
            row.tool,
            "resolved",
            row.attempt,
            by,
            now,
            {"to": status.value, "from": row.status.value, "reason": reason},
        )
        return Work(((self._resolve, _p(params)), (self._event, _p(audit))), label=event)

    def event(
        self,
        *,
        key: str,
        workflow_id: str,
        tool: str,
        kind: str,
        attempt: int | None,
        owner: str | None,
        at: datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> Work:
        """Append one audit row."""
        params = self._event_params(key, workflow_id, tool, kind, attempt, owner, at, detail)
        return Work(((self._event, _p(params)),), label=kind)

    def events(self, rows: Sequence[Mapping[str, Any]]) -> Work:
        """Append many audit rows at once (batched replay records)."""
        op = AppendEvents(rows)
        return Work((), "none", label="events", fast=op, build=lambda: ((self._event, op.binds()),))

    @staticmethod
    def _event_params(
        key: str,
        workflow_id: str,
        tool: str,
        kind: str,
        attempt: int | None,
        owner: str | None,
        at: datetime,
        detail: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "key": key,
            "workflow_id": workflow_id,
            "tool": tool,
            "kind": kind,
            "attempt": attempt,
            "owner": owner,
            "at": at,
            "detail": dict(detail) if detail is not None else None,
        }
