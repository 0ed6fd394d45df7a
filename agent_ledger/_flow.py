"""The one execution flow, shared by the sync and async drivers.

``execute(plan)`` is a generator: it yields operations (run this ``Work``, call the handler, sleep,
start or stop a heartbeat, note a replay, read the clock, ask whether an owner process is gone, make an
id) and receives their outcomes. It holds no connection, never blocks, and does no I/O of its own: no
clock, no process table, no random ids (the clock reaches it as ``Plan.now`` and in the answers to
``Invoke``, ``Sleep`` and ``Now``). ``_runtime.Runtime.run_sync`` and ``run_async`` are short loops
that perform the operations with a sync or an async engine, and ``tests/test_flow.py`` drives it with
scripted answers. The guarantee is therefore written once (the httpx ``auth_flow`` habit).

``recover(sweep)`` is the sweeper, on the same operations: it selects and claims stale rows in one unit
of work (``Unit``) and takes each claimed row through the same reconcile and record steps as a call.

``utcnow``, ``make_owner`` and ``owner_gone`` live here for historical reasons; only the drivers (and
the ``Ledger``) call them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import socket
import traceback
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pydantic_core

from ._decide import (
    Charge,
    Claim,
    MarkUnknown,
    Policy,
    Refuse,
    Replay,
    ReplayError,
    Request,
    Row,
    Wait,
    decide,
    decide_approval,
    decide_limit,
)
from ._keys import Redaction, normalise, payload_hash
from ._models import Effect, RecoveryReport, Status
from ._store import EXCEEDED, ClaimNew, ClaimOrLoad, Store, Work, row_from_mapping
from ._text import storable, text_problem
from .errors import (
    ApprovalMismatch,
    ApprovalPending,
    ApprovalRejected,
    ConfigurationError,
    InProgress,
    LimitExceeded,
    OutcomeUnknown,
    PayloadMismatch,
    RecordedError,
    ResultNotReplayable,
)

__all__ = [
    "NOT_EXECUTED",
    "Beat",
    "Db",
    "ApprovalPolicy",
    "Invoke",
    "NewId",
    "Notify",
    "Now",
    "Op",
    "OwnerGone",
    "Plan",
    "Ran",
    "Replayed",
    "Sleep",
    "StopBeat",
    "Supersede",
    "Sweep",
    "Unit",
    "describe_error",
    "encode_result",
    "execute",
    "make_owner",
    "owner_gone",
    "recover",
    "utcnow",
]

HOST = socket.gethostname()


class _NotExecuted:
    """Returned by a ``reconcile`` callback that found the side effect did not happen."""

    _instance: _NotExecuted | None = None

    def __new__(cls) -> _NotExecuted:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "agent_ledger.NOT_EXECUTED"


NOT_EXECUTED = _NotExecuted()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the ledger's only clock)."""
    return datetime.now(timezone.utc)


def make_owner() -> str:
    """An owner id: ``host:pid:instance`` (instance is random, so a reused pid is still a new owner)."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_gone(owner: str | None) -> bool:
    """True when ``owner`` ran on this host in a process that no longer exists (or is a zombie)."""
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except (OSError, IndexError):
        return False


# -- operations the drivers perform -------------------------------------------------------------
#
# The operations, the Plan and the store's Work are created on every call: they are slotted, not frozen
# dataclasses (a frozen one pays an ``object.__setattr__`` per field, measurable on the hot path).
# Nothing mutates them after construction.


@dataclass(slots=True)
class Db:
    """Run this unit of work in one transaction; the outcome is sent back."""

    work: Work


@dataclass(slots=True)
class Invoke:
    """Call a user function with the Effect (awaiting it in the async driver); a ``Ran`` is sent back.

    ``role`` names the function in messages: ``"handler"`` or ``"reconcile"``.
    """

    fn: Callable[[Effect], Any]
    effect: Effect
    role: str = "handler"


Ran = tuple[Any, "BaseException | None", datetime, float]
"""The answer to ``Invoke``: ``(value returned, exception raised or None, UTC time when it ended, seconds
it took)``. The clock readings come with the outcome, so recording it needs no clock operation of its
own (a plain tuple: one is built per call on the hot path)."""


class _AwaitableInSyncCall(ConfigurationError):
    """A sync call got an awaitable from a user function: the sync driver cannot await it (callers see
    a ``ConfigurationError``; the subclass tells the flow how to record the attempt).

    ``started`` is False when it was a coroutine that never started (the driver closed it: nothing of
    it ran), True when it was some other awaitable (a task or future may already be running).
    """

    def __init__(self, tool: str, role: str, value: Any, started: bool, key: str | None = None) -> None:
        super().__init__(
            f"tool {tool!r}: its {role} returned an awaitable ({type(value).__qualname__}) in a sync call, which "
            f"cannot await it. Declare the {role} `async def` and call the tool with `await` (or "
            f"`await ledger.arun(...)`), or make the {role} a plain function"
        )
        self.key = key
        self.started = started


@dataclass(slots=True)
class Sleep:
    """Wait this many seconds before looking again; the clock after waking is sent back (``Now``'s answer)."""

    seconds: float
    key: str | None = None
    """Wake early when this key's running attempt is completed, where the driver can be told (Postgres:
    ``_fast.Listener``)."""
    longest: float | None = None
    """With ``key``: the longest pause the flow allows (its wait and the lease). A driver that will be
    woken by the completion may poll less often, up to this; otherwise it sleeps ``seconds``."""


@dataclass(slots=True)
class Now:
    """Read the clock: ``(UTC datetime, monotonic seconds)`` is sent back."""


@dataclass(slots=True)
class OwnerGone:
    """Is ``owner`` a process of this host that no longer exists? A bool is sent back (``owner_gone``)."""

    owner: str | None


@dataclass(slots=True)
class NewId:
    """Make a new random id starting with ``prefix``; the id is sent back."""

    prefix: str


@dataclass(slots=True)
class Beat:
    """Start extending the lease of our claim every ``lease / 3`` seconds; a handle is sent back."""

    key: str
    workflow_id: str
    owner: str
    attempt: int
    lease: float


@dataclass(slots=True)
class StopBeat:
    """Stop the heartbeat started with ``handle``."""

    handle: Any


@dataclass(slots=True)
class Notify:
    """Tell the configured approval channels about a new request (failures are audited, not raised)."""

    approval: Mapping[str, Any]


@dataclass(slots=True)
class Supersede:
    """The key was claimed with ``payload_hash``: supersede its open approval requests for other payloads
    (audited, channels told)."""

    key: str
    workflow_id: str
    payload_hash: str


@dataclass(slots=True)
class Replayed:
    """Note a replay in the audit trail (batched by the driver, off the hot path)."""

    event: Mapping[str, Any]


@dataclass(slots=True)
class Unit:
    """Run every ``Work`` that ``steps`` yields in one transaction, sending each outcome back.

    ``steps`` may also yield ``OwnerGone`` (answered as usual). Its return value is sent back once the
    transaction committed; if it raises, the transaction rolls back and the error is thrown back.
    """

    steps: Generator[Work | OwnerGone, Any, Any]
    label: str = "unit"


Op = Db | Invoke | Sleep | Beat | StopBeat | Replayed | Notify | Now | OwnerGone | NewId | Unit | Supersede
Clock = tuple[datetime, float]


@dataclass(slots=True)
class Plan:
    """Everything one call needs, computed before any I/O."""

    store: Store
    key: str
    workflow_id: str
    tool: str
    args: Mapping[str, Any]
    """The normalised arguments (JSON), as stored."""
    call_args: Mapping[str, Any]
    """The arguments as the caller gave them, handed to ``Effect.args``."""
    payload_hash: str
    invoke: Callable[[Effect], Any]
    policy: Policy
    owner: str
    lease: float
    wait: float
    reconcile: Callable[[Effect], Any] | None = None
    decode: Callable[[Any], Any] | None = None
    detect_local_crashes: bool = True
    approval: ApprovalPolicy | None = None
    """Set when this call needs a human approval bound to its payload hash."""
    retention: float | None = None
    """Seconds after completion when ``prune`` may delete the record (None: only by ``older_than``)."""
    redaction: Redaction | None = None
    """Set when some arguments are redacted: ``args``, the key and the payload hash hold their keyed
    hashes, and their texts are scrubbed from every error, traceback and repr the flow records."""
    now: datetime | None = None
    """When the call starts, read by the driver's side just before driving the flow (None: the flow asks
    with ``Now``)."""
    supersedes: bool = False
    """The tool asks for approvals: once this call claims its key, open requests for the key with other
    arguments are superseded (``Supersede``)."""
    charges: tuple[Charge, ...] = ()
    """What an execution of this call consumes from each budget of its declared limits (none: no limits,
    and the flow does nothing about them)."""
    limit_approval: ApprovalPolicy | None = None
    """How to ask for an approval to run past a limit declared with ``on_exceed="approval"``."""


@dataclass(frozen=True)
class ApprovalPolicy:
    """How a call that needs approval asks for it."""

    ttl: float
    approvers: tuple[str, ...] | None
    """Who may decide, as resolved for this call (None: anyone)."""
    wait: float
    quorum: int = 1
    """How many approvals from distinct approvers the request needs."""
    requested_by: str | None = None
    """On whose behalf the call is made (``ledger.workflow(..., on_behalf_of=...)``): they may not decide."""


# -- results and errors -----------------------------------------------------------------------


def _check_json(value: Any, path: str = "result") -> None:
    if isinstance(value, str):
        # Postgres stores no NUL in JSON, and a lone surrogate has no UTF-8 form: neither backend may
        # keep such a result (SQLite could, so refusing it on both keeps them alike).
        problem = text_problem(value, len(value), allow_empty=True)
        if problem is not None:
            raise ValueError(f"{path} {problem}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value!r}, which JSON cannot hold")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}")
            if text_problem(k, len(k), allow_empty=True) is not None:
                raise ValueError(f"{path} has a key {k!r} that {text_problem(k, len(k), allow_empty=True)}")
            _check_json(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]")


def encode_result(value: Any) -> tuple[Any, bool, str | None, str | None]:
    """(stored JSON, replayable, repr when not replayable, reason) for a handler's return value.

    A result holding a string with a NUL character or a lone surrogate is stored as not replayable
    (its escaped repr is kept): escaping it would replay a different string than the handler returned.
    """
    try:
        data = pydantic_core.to_jsonable_python(value)
        _check_json(data)
    except Exception as exc:
        try:
            shown = storable(repr(value)[:2000])
        except Exception:  # a repr that raises must not lose the record
            shown = f"<unrepresentable {type(value).__qualname__}>"
        why = storable(f"{exc}"[:1000])
        return None, False, shown, f"{type(value).__qualname__} is not JSON-serialisable ({why})"
    return data, True, None, None


def describe_error(exc: BaseException) -> dict[str, Any]:
    """The JSON record of an exception: type, message, traceback and the names of its classes.

    NUL characters and lone surrogates in the message or traceback are escaped (``\\x00``, ``\\ud800``):
    an error is a description, and every backend must be able to store it.
    """
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # a __str__ that raises must not lose the record
        message = f"<unprintable {cls.__qualname__}>"
    return {
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "message": storable(message[:4000]),
        "traceback": storable("".join(traceback.format_exception(cls, exc, exc.__traceback__))[-16000:]),
        "classes": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__ if c not in (object,)],
    }


def _describe(plan: Plan, exc: BaseException) -> dict[str, Any]:
    """``describe_error`` with the plan's redacted values scrubbed from the message and traceback."""
    info = describe_error(exc)
    if plan.redaction is not None:
        info["message"] = plan.redaction.scrub(info["message"])
        info["traceback"] = plan.redaction.scrub(info["traceback"])
    return info


def _scrub(plan: Plan, text: str | None) -> str | None:
    return plan.redaction.scrub(text) if plan.redaction is not None and text is not None else text


def _decoded(plan: Plan, row: Row) -> Any:
    if plan.decode is None:
        return row.result
    try:
        return plan.decode(row.result)
    except Exception as exc:
        raise ResultNotReplayable(
            row.key, row.tool, f"the stored result does not rebuild the declared return type: {exc}", None
        ) from exc


# -- the flow ---------------------------------------------------------------------------------


POLL_FIRST = 0.002
"""A waiter's first pause (seconds) before looking at a running key again."""
POLL_CAPS: tuple[tuple[float, float], ...] = ((1.0, 0.005), (2.0, 0.01), (math.inf, 0.1))
"""(waited less than, longest pause): poll fast while the winner is likely about to finish, then back
off. On Postgres a waiter is also woken by the completion's ``NOTIFY`` (``_fast.Listener``)."""


def next_poll(delay: float, waited: float) -> float:
    """The pause after ``delay`` for a waiter that has waited ``waited`` seconds."""
    cap = next(c for until, c in POLL_CAPS if waited < until)
    return min(delay * 2, cap)


def execute(plan: Plan) -> Generator[Op, Any, Any]:
    """Carry a call through the ledger: decide, claim, run, record; replay or refuse when settled."""
    store = plan.store
    request = Request(plan.key, plan.payload_hash, plan.args, plan.policy)
    now = plan.now
    if now is None:
        now, _ = yield Now()
    began: float | None = None  # monotonic time of the first wait, read only when there is one
    mono = 0.0
    delay = POLL_FIRST
    past_limit: str | None = None  # the approval that lets this call run past a limit
    refusals = 0
    if plan.approval is None:
        # Look the key up and, when absent, claim it in the same unit of work: a replay costs one read,
        # a new call one read and the claim on the same pooled connection.
        found = yield Db(store.claim_or_load_op(_first_claim(ClaimOrLoad, plan, now, now + _lease(plan.lease))))
        if found is EXCEEDED:
            past_limit = yield from _over_limit(plan, now, refusals)
            refusals += 1
            found = yield Db(store.load(plan.key, plan.workflow_id))
        elif found is not None and found.pop("claimed"):
            if plan.supersedes:
                yield Supersede(plan.key, plan.workflow_id, plan.payload_hash)
            return (yield from _run_claimed(plan, 1, False))
        elif found is not None and found["args"] is None:
            found["args"] = plan.args  # the stored payload is this call's: its arguments were not fetched
    else:
        found = yield Db(store.load(plan.key, plan.workflow_id))
    while True:
        row = row_from_mapping(found) if found is not None else None
        gone = False
        if plan.detect_local_crashes and row is not None and row.status is Status.RUNNING:
            gone = yield OwnerGone(row.owner)
        decision = decide(row, request, now, owner_gone=gone)

        if isinstance(decision, Replay):
            assert row is not None
            value = _decoded(plan, row)
            yield Replayed(_event(plan, "replayed", row.attempt, plan.owner, now, None))
            return value

        if isinstance(decision, ReplayError):
            assert row is not None
            err = row.error or {}
            raise RecordedError(
                row.key,
                row.tool,
                row.attempt,
                str(err.get("type", "Exception")),
                str(err.get("message", "")),
                err.get("traceback"),
            )

        if isinstance(decision, Refuse):
            assert row is not None
            if decision.reason == "mismatch":
                yield Db(
                    store.event(
                        key=plan.key,
                        workflow_id=plan.workflow_id,
                        tool=plan.tool,
                        kind="refused",
                        attempt=row.attempt,
                        owner=plan.owner,
                        at=now,
                        detail={
                            "reason": "payload_mismatch",
                            "fields": list(decision.fields),
                            "payload_hash": plan.payload_hash,
                        },
                    )
                )
                raise PayloadMismatch(plan.key, plan.tool, list(decision.fields))
            if decision.reason == "not_replayable":
                yield Replayed(_event(plan, "replayed", row.attempt, plan.owner, now, {"replayable": False}))
                raise ResultNotReplayable(
                    row.key, row.tool, "it could not be stored when the call succeeded", row.result_repr
                )
            raise OutcomeUnknown(row.key, row.tool, row.args, row.owner, row.attempt)

        if isinstance(decision, Wait):
            assert row is not None
            if began is None:
                now, began = yield Now()
                mono = began
            waited = mono - began
            if waited >= plan.wait:
                raise InProgress(row.key, row.tool, row.owner, row.started_at, waited)
            bound = plan.wait - waited
            if decision.lease_expires_at is not None:
                bound = min(bound, max(0.001, (decision.lease_expires_at - now).total_seconds() + 0.001))
            now, mono = yield Sleep(min(delay, bound), plan.key, bound)
            # Poll fast while the winner is likely about to finish, then back off: waiters see a result
            # within a few ms of its commit in the first seconds, without hammering the database later.
            delay = next_poll(delay, waited)
            found = yield Db(store.load(plan.key, plan.workflow_id))
            continue

        if isinstance(decision, MarkUnknown):
            assert row is not None
            reason = "its process is gone" if gone else "its lease expired"
            yield Db(store.mark_unknown(row=row, now=now, by=plan.owner, detail={"reason": reason}))
            found = yield Db(store.load(plan.key, plan.workflow_id))
            continue

        assert isinstance(decision, Claim)
        approval_id = None
        if plan.approval is not None:
            approval_id, now = yield from _approval_gate(plan)
        charges = plan.charges
        if past_limit is not None:
            # A human approved this exact call past its limit: it runs, and what it consumes is recorded.
            approval_id = approval_id or past_limit
            charges = tuple(dataclasses.replace(c, forced=True) for c in charges)
        lease_until = now + _lease(plan.lease)
        if decision.event == "claim":
            claim = _first_claim(ClaimNew, plan, now, lease_until, charges)
            won = yield Db(_consuming(plan, approval_id, now, 1, store.claim_new_op(claim)))
            if won is EXCEEDED:
                past_limit = yield from _over_limit(plan, now, refusals)
                refusals += 1
                found = yield Db(store.load(plan.key, plan.workflow_id))
                continue
            if won is None:
                found = yield Db(store.load(plan.key, plan.workflow_id))
                continue
            attempt = int(won["attempt"])
        else:
            assert row is not None
            detail = {"reason": "owner process gone"} if gone else None
            n = yield Db(
                _consuming(
                    plan,
                    approval_id,
                    now,
                    row.attempt + 1,
                    store.claim_again(
                        event=decision.event,
                        row=row,
                        owner=plan.owner,
                        lease_expires_at=lease_until,
                        now=now,
                        detail=detail,
                        charges=charges,
                    ),
                )
            )
            if n is EXCEEDED:
                past_limit = yield from _over_limit(plan, now, refusals)
                refusals += 1
                found = yield Db(store.load(plan.key, plan.workflow_id))
                continue
            if not n:
                found = yield Db(store.load(plan.key, plan.workflow_id))
                continue
            attempt = row.attempt + 1
        if plan.supersedes:
            yield Supersede(plan.key, plan.workflow_id, plan.payload_hash)
        return (yield from _run_claimed(plan, attempt, decision.event == "reconcile", approval_id))


def _consuming(plan: Plan, approval_id: str | None, now: datetime, attempt: int, work: Work) -> Work:
    if approval_id is None:
        return work
    return plan.store.consuming(
        work,
        approval_id=approval_id,
        payload_hash=plan.payload_hash,
        now=now,
        actor=plan.owner,
        plan_event={"key": plan.key, "workflow_id": plan.workflow_id, "tool": plan.tool, "attempt": attempt},
    )


def _over_limit(plan: Plan, now: datetime, refusals: int) -> Generator[Op, Any, str | None]:
    """A claim of this call did not fit a budget (nothing was written). Read the budgets, let the pure
    core say which charge does not fit, audit the refusal (``limit_exceeded``) and raise
    ``LimitExceeded``; for a limit with ``on_exceed="approval"``, return the id of an approval of this
    exact call instead (or raise ``ApprovalPending`` / ``ApprovalRejected``). None: every budget has
    room again (a reset or a new window in between): claim again."""
    store = plan.store
    rows = yield Db(store.usage_of(plan.charges))
    used = {(r["name"], r["scope"], r["window_start"]): float(r["used"]) for r in rows}
    hit = decide_limit(plan.charges, used)
    if hit is None:
        if refusals < 3:
            return None
        hit = plan.charges[0]  # refused again and again while the budgets look fine: refuse, do not spin
    spent = used.get(hit.budget, 0.0)
    yield Db(
        store.event(
            key=plan.key,
            workflow_id=plan.workflow_id,
            tool=plan.tool,
            kind="limit_exceeded",
            attempt=None,
            owner=plan.owner,
            at=now,
            detail={
                "limit": hit.name,
                "scope": hit.scope,
                "used": spent,
                "max": hit.max,
                "requested": hit.amount,
                "window_start": hit.window_start.isoformat(),
                "window_end": hit.window_end.isoformat() if hit.window_end is not None else None,
                "on_exceed": hit.on_exceed,
            },
        )
    )
    if hit.on_exceed == "approval" and plan.limit_approval is not None:
        approval_id, _ = yield from _approval_gate(plan, plan.limit_approval)
        return approval_id
    raise LimitExceeded(
        limit=hit.name,
        scope=hit.scope,
        used=spent,
        max=hit.max,
        requested=hit.amount,
        key=plan.key,
        tool=plan.tool,
        window_end=hit.window_end,
    )


def _approval_gate(plan: Plan, policy: ApprovalPolicy | None = None) -> Generator[Op, Any, tuple[str, datetime]]:
    """Return the id of an approved, unused approval for exactly this payload (and the time), or raise.

    Requests one (and notifies the channels) when there is none; waits up to ``approval.wait`` for a
    decision; raises ``ApprovalPending`` or ``ApprovalRejected`` otherwise. ``policy``: how to ask (the
    plan's ``approval`` by default; a limit's ``limit_approval`` for a call past its limit).
    """
    policy = policy or plan.approval
    assert policy is not None
    store = plan.store
    now, began = yield Now()
    mono = began
    delay = 0.01
    while True:
        found = yield Db(store.latest_approval(plan.key, plan.workflow_id, plan.payload_hash))
        step = decide_approval(found, now, policy.approvers)
        if step == "use":
            return str(found["id"]), now
        if step == "rejected":
            raise ApprovalRejected(found["id"], plan.key, plan.tool, plan.args, found["decided_by"], found["reason"])
        if step == "expire":
            yield Db(store.expire_approval(found, now=now, actor=plan.owner))
            now, mono = yield Now()
            continue
        if step == "request":
            new_id = yield NewId("apr_")
            created = yield Db(
                store.request_approval(
                    approval_id=new_id,
                    key=plan.key,
                    workflow_id=plan.workflow_id,
                    tool=plan.tool,
                    payload_hash=plan.payload_hash,
                    args=plan.args,
                    approvers=list(policy.approvers) if policy.approvers is not None else None,
                    now=now,
                    expires_at=now + timedelta(seconds=policy.ttl),
                    actor=plan.owner,
                    quorum=policy.quorum,
                    requested_by=policy.requested_by,
                )
            )
            if created is not None:
                fresh = yield Db(store.approval(new_id, plan.workflow_id))
                yield Notify(fresh)
            now, mono = yield Now()
            continue
        # pending: wait for a decision, or hand the pending request back to the agent
        waited = mono - began
        if waited >= policy.wait:
            raise ApprovalPending(found["id"], plan.key, plan.tool, plan.args, found["expires_at"])
        until_expiry = (found["expires_at"] - now).total_seconds()
        now, mono = yield Sleep(max(0.001, min(delay, policy.wait - waited, until_expiry + 0.001)))
        delay = min(delay * 2, 0.25)


_ClaimOp = TypeVar("_ClaimOp", bound=ClaimNew)


def _first_claim(
    kind: type[_ClaimOp], plan: Plan, now: datetime, lease_until: datetime, charges: tuple[Charge, ...] | None = None
) -> _ClaimOp:
    """The operation (``ClaimNew`` or ``ClaimOrLoad``) of a first claim of the plan's key, built
    positionally, with the plan's charges unless others are given (forced ones, past a limit)."""
    return kind(
        plan.key,
        plan.workflow_id,
        plan.tool,
        plan.payload_hash,
        plan.args,
        plan.owner,
        lease_until,
        now,
        plan.charges if charges is None else charges,
    )


@functools.lru_cache(maxsize=64)
def _lease(seconds: float) -> timedelta:
    """A lease as a ``timedelta`` (a handful of distinct leases per process; building one costs more)."""
    return timedelta(seconds=seconds)


def _event(plan: Plan, kind: str, attempt: int | None, owner: str | None, at: datetime, detail: Any) -> dict[str, Any]:
    return {
        "key": plan.key,
        "workflow_id": plan.workflow_id,
        "tool": plan.tool,
        "kind": kind,
        "attempt": attempt,
        "owner": owner,
        "at": at,
        "detail": detail,
    }


def _effect(plan: Plan, attempt: int) -> Effect:
    return Effect(
        key=plan.key,
        idem_key=plan.key,
        attempt=attempt,
        workflow_id=plan.workflow_id,
        tool=plan.tool,
        args=plan.call_args,
    )


def _finish(plan: Plan, attempt: int) -> dict[str, Any]:
    return {
        "key": plan.key,
        "workflow_id": plan.workflow_id,
        "tool": plan.tool,
        "owner": plan.owner,
        "attempt": attempt,
    }


def _run_claimed(
    plan: Plan, attempt: int, reconcile_first: bool, approval_id: str | None = None
) -> Generator[Op, Any, Any]:
    effect = _effect(plan, attempt)
    finish = _finish(plan, attempt)
    handle = yield Beat(plan.key, plan.workflow_id, plan.owner, attempt, plan.lease)
    try:
        detail: dict[str, Any] = {}
        if reconcile_first:
            found = yield from _reconcile(plan, effect, finish, "call")
            if found is not NOT_EXECUTED:
                return found
            detail["reconciled"] = False
        ran: Ran | None = None
        if approval_id is not None:
            try:
                _verify_approved_payload(plan, approval_id)
            except ApprovalMismatch as mismatch:
                at, _ = yield Now()
                ran = (None, mismatch, at, 0.0)
        if ran is None:
            ran = yield Invoke(plan.invoke, effect)
        value, exc, now, elapsed = ran
        # The attempt's duration is the handler's, not the warm-up before (or a reconcile callback's).
        finish["started_at"] = now - timedelta(seconds=elapsed)
        if exc is None:
            detail["duration_ms"] = round(elapsed * 1000, 3)
            data, replayable, shown, reason = encode_result(value)
            shown = _scrub(plan, shown)
            if not replayable:
                detail["not_replayable"] = _scrub(plan, reason)
            yield from _record(
                plan,
                "succeed",
                finish,
                detail,
                now,
                result=data,
                result_replayable=replayable,
                result_repr=shown,
            )
            return value
        if isinstance(exc, _AwaitableInSyncCall):
            # The sync driver could not await what the handler returned. An unstarted coroutine did
            # nothing (it was closed): the key goes back to pending and the next call runs the handler.
            # Anything else (a task, a future) may be running: its outcome is unknown.
            detail["error"] = {"type": "agent_ledger.ConfigurationError", "message": str(exc)}
            if exc.started:
                yield from _record(plan, "mark_unknown", finish, detail, now, error=_describe(plan, exc))
            else:
                yield from _release(plan, finish, now, f"not executed: {exc}")
            raise exc
        if isinstance(exc, Exception):
            detail["duration_ms"] = round(elapsed * 1000, 3)
            error = _describe(plan, exc)
            # Each attempt's error stays in its own audit row (the effect keeps only the latest one).
            detail["error"] = {"type": error["type"], "message": error["message"]}
            yield from _record(plan, "fail", finish, detail, now, error=error)
            raise exc
        # Interrupted (KeyboardInterrupt, SystemExit, task cancellation): the handler did not finish
        # and may have done part of its work. Record that honestly instead of guessing.
        detail["interrupted"] = type(exc).__name__
        yield from _record(plan, "mark_unknown", finish, detail, now, error=_describe(plan, exc))
        raise exc
    finally:
        yield StopBeat(handle)


def _verify_approved_payload(plan: Plan, approval_id: str) -> None:
    """Recompute the payload hash from the arguments about to be handed over; refuse if they changed."""
    normalised = normalise(dict(plan.call_args), "args")
    if plan.redaction is not None:
        normalised = plan.redaction.args(normalised)
    actual = payload_hash(plan.tool, normalised)
    if actual != plan.payload_hash:
        raise ApprovalMismatch(approval_id, plan.key, plan.tool, plan.payload_hash, actual)


def _reconcile(plan: Plan, effect: Effect, finish: dict[str, Any], via: str) -> Generator[Op, Any, Any]:
    """Ask the tool's reconcile callback what happened to an uncertain attempt (we hold the claim).

    Records the answer with its evidence: a found result is recorded as the success (with a
    ``reconciled`` event in the same transaction); ``NOT_EXECUTED`` is noted in a ``reconciled`` event
    and returned, for the caller to run the handler (a call) or release the key (the sweeper). A callback
    that raised leaves the effect ``unknown`` and raises ``OutcomeUnknown``.
    """
    assert plan.reconcile is not None
    found, exc, now, elapsed = yield Invoke(plan.reconcile, effect, "reconcile")
    finish["started_at"] = now - timedelta(seconds=elapsed)
    if exc is not None:
        # Reconciliation itself failed: the outcome is as unknown as before. Never guess.
        detail: dict[str, Any] = {"reconciled": None, "via": via}
        if isinstance(exc, Exception):
            detail["reconcile_error"] = storable(_scrub(plan, f"{type(exc).__name__}: {exc}") or "")
        else:
            detail["interrupted"] = type(exc).__name__
        yield from _record(plan, "mark_unknown", finish, detail, now, error=_describe(plan, exc))
        if isinstance(exc, _AwaitableInSyncCall) or not isinstance(exc, Exception):
            raise exc
        shown = _scrub(plan, repr(exc))
        raise OutcomeUnknown(
            plan.key, plan.tool, plan.args, plan.owner, effect.attempt, detail=f"reconcile raised {shown}"
        ) from exc
    if found is NOT_EXECUTED:
        yield Db(
            plan.store.event(
                kind="reconciled",
                attempt=effect.attempt,
                at=now,
                detail={
                    "reconciled": False,
                    "found": False,
                    "via": via,
                    "evidence": None,
                    "then": "running the handler" if via == "call" else "releasing the key for the next call",
                },
                **{k: finish[k] for k in ("key", "workflow_id", "tool", "owner")},
            )
        )
        return NOT_EXECUTED
    data, replayable, shown, why = encode_result(found)
    shown = _scrub(plan, shown)
    why = _scrub(plan, why)
    detail = {
        "reconciled": True,
        "found": True,
        "via": via,
        "evidence": data if replayable else shown,
        "then": "recording the reconciled result",
        "duration_ms": round(elapsed * 1000, 3),
    }
    if not replayable:
        detail["not_replayable"] = why
    yield from _record(
        plan,
        "succeed",
        finish,
        detail,
        now,
        audit="reconciled",
        result=data,
        result_replayable=replayable,
        result_repr=shown,
    )
    return found


def _late_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a fenced-off attempt produced, kept in its late_completion row (its only record)."""
    out: dict[str, Any] = {}
    if values.get("result_replayable"):
        out["result"] = values.get("result")
    elif values.get("result_repr") is not None:
        out["result_repr"] = values["result_repr"]
    return out


def _record(
    plan: Plan,
    event: Any,
    finish: Mapping[str, Any],
    detail: dict[str, Any],
    now: datetime,
    audit: str | None = None,
    **values: Any,
) -> Generator[Op, Any, None]:
    """Record the outcome of our attempt, fenced; a ``late_completion`` event when we lost the claim.

    ``audit`` names an event written with the outcome, in its transaction, carrying ``detail`` (a
    success has no event row of its own: the effect row is its record).
    """
    retain = now + timedelta(seconds=plan.retention) if plan.retention is not None and event != "mark_unknown" else None
    store = plan.store
    if audit is None:
        work = store.finish(event=event, now=now, detail=detail, retain_until=retain, **finish, **values)
    else:
        work = store.finish_audited(
            kind=audit, event=event, now=now, detail=detail, retain_until=retain, **finish, **values
        )
    n = yield Db(work)
    if not n:
        yield from _late(plan, finish, now, {"outcome": event, **detail, **_late_values(values)})


def _late(plan: Plan, finish: Mapping[str, Any], now: datetime, detail: Mapping[str, Any]) -> Generator[Op, Any, None]:
    # Fenced off: our lease was taken over (or the effect was resolved) while we ran. Our handler
    # did run, so the caller still gets its own outcome; the stored outcome stays the new owner's.
    yield Db(
        plan.store.event(
            kind="late_completion",
            attempt=finish["attempt"],
            at=now,
            detail=detail,
            **{k: finish[k] for k in ("key", "workflow_id", "tool", "owner")},
        )
    )


def _release(plan: Plan, finish: Mapping[str, Any], now: datetime, reason: str) -> Generator[Op, Any, None]:
    """Put our claimed attempt back to ``pending`` (nothing happened): the next call runs the handler."""
    mine = Row(
        key=plan.key,
        workflow_id=plan.workflow_id,
        tool=plan.tool,
        status=Status.RUNNING,
        attempt=finish["attempt"],
        payload_hash=plan.payload_hash,
        args=plan.args,
        owner=plan.owner,
        lease_expires_at=None,
        started_at=None,
        result=None,
        result_replayable=None,
        result_repr=None,
        error=None,
    )
    n = yield Db(plan.store.resolve(row=mine, event="resolve_retry", by=plan.owner, now=now, reason=reason))
    if not n:
        yield from _late(plan, finish, now, {"outcome": "resolve_retry", "reason": reason})


# -- the sweeper ------------------------------------------------------------------------------


@dataclass(slots=True)
class Sweep:
    """What one ``recover`` pass needs, computed before any I/O."""

    store: Store
    owner: str
    lease: float
    host_prefix: str
    """``LIKE`` pattern of this host's owners (their liveness can be checked here)."""
    batch_size: int
    tools: Mapping[str, tuple[Callable[[Effect], Any], float | None]]
    """Tools with a reconcile callback registered here: name -> (reconcile, retention)."""
    detect_local_crashes: bool = True


@dataclass(slots=True)
class _Batch:
    found: int = 0
    acted: int = 0
    skipped: int = 0
    marked_unknown: list[str] = field(default_factory=list)
    claimed: list[Row] = field(default_factory=list)


def recover(sweep: Sweep) -> Generator[Op, Any, RecoveryReport]:
    """Settle stale claims batch by batch: select and claim in one unit, then reconcile each claimed row
    through the same steps as a call (``_reconcile``, ``_record``)."""
    report = RecoveryReport()
    while True:
        now, _ = yield Now()
        batch: _Batch = yield Unit(_claim_stale(sweep, now), "recover")
        report.skipped += batch.skipped
        report.examined += batch.acted
        report.marked_unknown.extend(batch.marked_unknown)
        for row in batch.claimed:
            outcome, why = yield from _recover_claimed(sweep, row)
            if outcome == "reconciled":
                report.reconciled.append(row.key)
            elif outcome == "released":
                report.released.append(row.key)
            else:
                report.failed[row.key] = why
        if batch.acted == 0 or batch.found < sweep.batch_size:
            return report


def _claim_stale(sweep: Sweep, now: datetime) -> Generator[Work | OwnerGone, Any, _Batch]:
    """One transaction: lock a batch of stale running rows, claim those we can reconcile, mark the others
    ``unknown`` (skipping rows of this host whose owner is alive)."""
    store = sweep.store
    batch = _Batch()
    found = yield store.stale(now=now, host_prefix=sweep.host_prefix, limit=sweep.batch_size)
    batch.found = len(found)
    for row in map(row_from_mapping, found):
        expired = row.lease_expires_at is None or row.lease_expires_at <= now
        gone = False
        if sweep.detect_local_crashes:
            gone = yield OwnerGone(row.owner)
        if not expired and not gone:
            batch.skipped += 1
            continue
        batch.acted += 1
        reason = "its process is gone" if gone else "its lease expired"
        if row.tool in sweep.tools:
            work = store.claim_again(
                event="reconcile",
                row=row,
                owner=sweep.owner,
                lease_expires_at=now + timedelta(seconds=sweep.lease),
                now=now,
                detail={"by": "recover", "reason": reason},
            )
            if (yield work):
                batch.claimed.append(row)
        elif (yield store.mark_unknown(row=row, now=now, by=sweep.owner, detail={"reason": reason, "via": "recover"})):
            batch.marked_unknown.append(row.key)
    return batch


def _never(effect: Effect) -> Any:  # pragma: no cover - the sweeper never runs a handler
    raise AssertionError("the sweeper does not run handlers")


def _recover_claimed(sweep: Sweep, row: Row) -> Generator[Op, Any, tuple[str, str]]:
    """Reconcile one row the sweeper claimed: found -> succeeded, NOT_EXECUTED -> pending, raised -> unknown."""
    reconcile, retention = sweep.tools[row.tool]
    plan = Plan(
        store=sweep.store,
        key=row.key,
        workflow_id=row.workflow_id,
        tool=row.tool,
        args=row.args or {},
        call_args=row.args or {},
        payload_hash=row.payload_hash,
        invoke=_never,
        policy=Policy(has_reconcile=True),
        owner=sweep.owner,
        lease=sweep.lease,
        wait=0.0,
        reconcile=reconcile,
        retention=retention,
    )
    attempt = row.attempt + 1
    finish = _finish(plan, attempt)
    handle = yield Beat(plan.key, plan.workflow_id, plan.owner, attempt, plan.lease)
    try:
        try:
            found = yield from _reconcile(plan, _effect(plan, attempt), finish, "recover")
        except OutcomeUnknown as e:
            cause = e.__cause__
            return "failed", f"{type(cause).__name__}: {cause}"
        except _AwaitableInSyncCall as e:
            return "failed", f"ConfigurationError: {e}"
        if found is NOT_EXECUTED:
            now, _ = yield Now()
            yield from _release(plan, finish, now, "reconcile: not executed")
            return "released", ""
        return "reconciled", ""
    finally:
        yield StopBeat(handle)
