"""The approval service: reading requests, recording human decisions, telling the channels.

``ApprovalService`` is the one place where a decision on an approval request is taken: the ``Ledger``
methods (``approve``, ``reject``, ``approval``, ``pending_approvals``), the CLI and the inbound
endpoints (Slack, signed webhooks) all go through it, with the same rules (``_decide.judge_vote``): a
request needs ``quorum`` approvals from distinct allowed approvers, one rejection rejects it, its
requester may not decide it, an expired or superseded request cannot be decided, and every refusal is
an audit row. It also carries out the flow's ``Notify`` operation (announce a new request) for both
drivers, and runs the channels' ``decided`` hooks.

Requesting, expiring and consuming an approval happen inside a call's flow (``_flow._approval_gate``),
fenced together with the claim; a human's decision happens here, in ``_record_decision``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from .._decide import APPROVAL_TRANSITIONS, Vote, VoteRefused, judge_vote
from .._flow import utcnow
from .._hide import hide
from .._models import Approval, ApprovalStatus, approval_from_row
from .._text import MAX_APPROVAL_ID, MAX_NAME, MAX_REASON, check_text, text_problem
from ..errors import ApprovalRefused, ConfigurationError, InvalidArguments, StorageError

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .._store import Work

__all__ = ["ApprovalService"]

log = logging.getLogger("agent_ledger")
_VOTE_TRIES = 10


class ApprovalService:
    """Approval requests of one ledger: read them, decide them, and tell the channels.

    Reach it as ``ledger.approvals``. ``channels`` is the read-only tuple of channels that are told
    about every new request (``request``) and every decision (``decided``, when they have it).
    """

    def __init__(self, rt: Runtime, channels: Iterable[Any], *, actor: str) -> None:
        chosen = tuple(channels)
        for channel in chosen:
            if not callable(getattr(channel, "request", None)):
                raise ConfigurationError(f"channel {channel!r} has no request(approval) method")
        self._rt = rt
        self._channels = chosen
        self.actor = actor
        """Who this process is in the audit trail (the ledger's owner id): the owner of notifications."""

    @property
    def channels(self) -> tuple[Any, ...]:
        """The channels told about requests and decisions (fixed when the ledger is made)."""
        return self._channels

    # -- reads -----------------------------------------------------------------------------

    def get(self, approval_id: str) -> Approval | None:
        """One approval request by id, or None."""
        if text_problem(approval_id, MAX_APPROVAL_ID) is not None:
            return None  # no stored id is like it (too long, NUL, ...): Postgres would refuse the query
        found = self._rt.do(self._rt.store.approval(approval_id))
        return approval_from_row(found) if found is not None else None

    def pending(self, workflow_id: str | None = None, tool: str | None = None) -> list[Approval]:
        """Approval requests still waiting for a decision (oldest first), optionally filtered. A request
        whose key already holds a call with other arguments is left out: it can never be used."""
        if any(v is not None and text_problem(v, MAX_NAME) is not None for v in (workflow_id, tool)):
            return []  # a name that could never have been stored matches nothing
        # Such a request is marked superseded, and left out (``runnable``) even where it cannot be
        # marked, e.g. by a read-only database user.
        self._supersede_stale()
        rows = self._rt.do(
            self._rt.store.approvals(status="pending", workflow_id=workflow_id, tool=tool, now=utcnow(), runnable=True)
        )
        return [approval_from_row(r) for r in rows]

    # -- decisions -------------------------------------------------------------------------

    def approve(self, approval_id: str, *, by: str, reason: str | None = None, notify: bool = True) -> Approval:
        """Approve a pending request, for exactly its payload: one vote; ``quorum`` votes from distinct
        approvers approve it (the returned ``Approval`` is still pending before that).

        Raises ``ApprovalRefused`` (audited) when the id is unknown, the request was already settled,
        expired or superseded, or ``by`` already voted, requested it, or is not one of its approvers
        (``_decide.judge_vote``); ``InvalidArguments`` (nothing written) when the id (over 40
        characters), ``by`` (over 255) or ``reason`` (over 4000) is too long or holds a NUL character or
        a lone surrogate. ``notify=False`` leaves the channels' ``decided`` hooks to a later
        ``announce_decision`` (an inbound endpoint answers first).
        """
        return self._record_decision(approval_id, "approved", by, reason, notify=notify)

    def reject(self, approval_id: str, *, by: str, reason: str, notify: bool = True) -> Approval:
        """Reject a pending request (a veto, whatever the quorum); calls with its payload then raise
        ``ApprovalRejected`` with ``reason``."""
        return self._record_decision(approval_id, "rejected", by, reason, notify=notify)

    def _record_decision(
        self, approval_id: str, status: str, by: str, reason: str | None, *, notify: bool = True
    ) -> Approval:
        """The one path of a human decision: one vote, ruled on by the pure core (``judge_vote``) on the
        request as read under its lock, recorded with the request's new state in one transaction (or
        refused and audited), then the channels' ``decided`` hooks (quorum progress or the outcome)."""
        if not isinstance(by, str) or not by:
            raise InvalidArguments("a decision needs by='<who decided>' for the audit trail")
        # What Postgres cannot store (NUL, lone surrogates, over-long values) is refused before any write.
        check_text(approval_id, "approval id", MAX_APPROVAL_ID)
        check_text(by, "by", MAX_NAME)
        if reason is not None:
            check_text(reason, "reason", MAX_REASON, allow_empty=True)
        decision: Literal["approve", "reject"] = "approve" if status == "approved" else "reject"
        store = self._rt.store
        # The id alone names no shard: find the request's workflow first (on a sharded database, a
        # query of every shard), so that the vote locks and writes rows of one workflow only.
        first = self._rt.do(store.approval(approval_id))
        now = utcnow()
        outcome: Any = (None, None)
        if first is not None:
            for _ in range(_VOTE_TRIES):
                now = utcnow()

                def judge(row: Mapping[str, Any], now: datetime = now) -> Vote | VoteRefused:
                    return judge_vote(row, decision=decision, by=by, now=now, ran_with=row.get("ran_with"))

                outcome = self._rt.do(
                    store.vote(approval_id, first["workflow_id"], judge=judge, by=by, reason=reason, now=now)
                )
                if outcome is not None:
                    break  # else a concurrent write changed the request between our read and write: ask again
            else:  # pragma: no cover - the read holds the row's lock, so the write cannot lose a race
                raise ApprovalRefused(approval_id, "the request kept changing while the vote was recorded; try again")
        found, verdict = outcome
        if found is None or isinstance(verdict, VoteRefused):
            why = "no such approval request" if found is None else verdict.why
            if found is not None:
                self._settle_refused(found, now, by)
            detail = {"approval_id": approval_id, "decision": status, "why": why}
            self._rt.do(self._audit(found, "approval_refused", owner=by, detail=detail, at=now))
            raise ApprovalRefused(approval_id, why)
        decided = self._rt.do(store.approval(approval_id, found["workflow_id"]))
        if notify:
            self._decided(decided)
        return approval_from_row(decided)

    def _settle_refused(self, row: Mapping[str, Any], now: datetime, by: str) -> None:
        """After a refused vote, record what the refusal found out: an expired or a superseded request."""
        status = ApprovalStatus(row["status"])
        ran_with = row.get("ran_with")
        if ran_with is not None and ran_with != row["payload_hash"] and "supersede" in APPROVAL_TRANSITIONS[status]:
            self._supersede(row, ran_with, now, by)
        elif status is ApprovalStatus.PENDING and row["expires_at"] <= now:
            self._rt.do(self._rt.store.expire_approval(row, now=now, actor=by))

    # -- superseded requests ---------------------------------------------------------------

    def _supersede_stale(self) -> None:
        """Mark superseded every open request (pending or approved) whose key ran with other arguments,
        audited, and tell the channels (a write that fails, e.g. on a read-only database, is logged:
        the next reader that can write marks them)."""
        now = utcnow()
        rows = self._rt.do(self._rt.store.open_superseded())
        for row in rows:
            try:
                self._supersede(row, row["ran_with"], now, self.actor)
            except StorageError as e:
                log.warning("could not mark approval %s superseded: %s", row["id"], e)

    def supersede_others(self, key: str, workflow_id: str, payload_hash: str) -> int:
        """``key`` (of ``workflow_id``) was claimed with ``payload_hash``: supersede its open requests for
        other payloads (the flow's ``Supersede`` operation). Returns how many were marked."""
        now = utcnow()
        rows = self._rt.do(self._rt.store.open_for_other_payloads(key, workflow_id, payload_hash))
        return sum(self._supersede(row, payload_hash, now, self.actor) for row in rows)

    def _supersede(self, row: Mapping[str, Any], ran_with: str, now: datetime, actor: str) -> bool:
        if not self._rt.do(self._rt.store.supersede_approval(row, ran_with=ran_with, now=now, actor=actor)):
            return False  # decided, consumed or superseded meanwhile
        current = self._rt.do(self._rt.store.approval(row["id"], row["workflow_id"]))
        if current is not None:
            self._decided(current)
        return True

    def announce_decision(self, approval_id: str) -> None:
        """Run the channels' ``decided`` hooks (after an inbound decision has been answered)."""
        row = self._rt.do(self._rt.store.approval(approval_id))
        if row is not None:
            self._decided(row)

    # -- audit -----------------------------------------------------------------------------

    def _audit(
        self,
        about: Mapping[str, Any] | None,
        kind: str,
        *,
        owner: str | None,
        detail: Mapping[str, Any],
        tool: str = "approvals",
        at: datetime | None = None,
    ) -> Work:
        """One audit row about an approval request (its key, workflow and tool), or about none
        (key and workflow ``-``, under ``tool``: an unknown id, an unverifiable inbound request), at
        ``at`` (default: now)."""
        return self._rt.store.event(
            key=about["key"] if about is not None else "-",
            workflow_id=about["workflow_id"] if about is not None else "-",
            tool=about["tool"] if about is not None else tool,
            kind=kind,
            attempt=None,
            owner=owner,
            at=at or utcnow(),
            detail=detail,
        )

    # -- inbound endpoints -----------------------------------------------------------------

    def refuse_inbound(self, source: str, why: str, detail: Mapping[str, Any]) -> None:
        """Audit an inbound request that was refused before any decision (``inbound_refused``)."""
        self._rt.do(self._audit(None, "inbound_refused", owner=None, detail={"why": why, **detail}, tool=source))

    def remember_inbound(self, message_id: str, source: str) -> bool:
        """Record a signed inbound message id; False when it was seen before (a replay)."""
        fresh = self._rt.do(self._rt.store.remember_inbound(message_id=message_id, source=source, now=utcnow()))
        return fresh is not None

    def forget_inbound(self, message_id: str) -> None:
        """Drop a recorded inbound id (nothing was decided: the sender's retry may come through)."""
        self._rt.do(self._rt.store.forget_inbound(message_id=message_id))

    # -- channels --------------------------------------------------------------------------

    def notify_request(self, row: Mapping[str, Any]) -> None:
        """Tell every channel about a new request (the sync driver's ``Notify``); failures are audited."""
        outcomes = [(c, _settled(_call_channel(c, "request", row))) for c in self._channels]
        for work in self._notices(row, "request", outcomes):
            self._rt.do(work)

    async def anotify_request(self, row: Mapping[str, Any]) -> None:
        """``notify_request`` for the async driver: blocking channels run in a worker thread."""
        outcomes = []
        for channel in self._channels:
            if inspect.iscoroutinefunction(getattr(channel, "request", None)):
                outcome = _call_channel(channel, "request", row)
            else:  # a blocking channel (HTTP) must not stall the event loop
                outcome = await asyncio.to_thread(_call_channel, channel, "request", row)
            if inspect.isawaitable(outcome.value):
                outcome = await _awaited_outcome(outcome.value)
            outcomes.append((channel, outcome))
        for work in self._notices(row, "request", outcomes):
            await self._rt.ado(work)

    def _decided(self, row: Mapping[str, Any]) -> None:
        """Tell every channel that has a ``decided`` hook about a decision (failures are audited)."""
        outcomes = [(c, _settled(_call_channel(c, "decided", row))) for c in self._channels if hasattr(c, "decided")]
        for work in self._notices(row, "decided", outcomes):
            self._rt.do(work)

    def _notices(self, row: Mapping[str, Any], hook: str, outcomes: list[tuple[Any, _Outcome]]) -> list[Work]:
        """The audit rows of one round of channel calls, plus the merged state the channels returned."""
        state = dict(row["channel_state"] or {})
        works: list[Work] = []
        for channel, outcome in outcomes:
            name = _channel_name(channel)
            detail: dict[str, Any] = {"approval_id": row["id"], "channel": name, "hook": hook}
            if outcome.error is not None:
                detail["error"] = outcome.error
                log.warning("approval channel %s failed on %s of %s: %s", name, hook, row["id"], outcome.error)
            elif isinstance(outcome.value, Mapping) and outcome.value:
                state[name] = dict(outcome.value)
            kind = "notification_failed" if outcome.error is not None else "notified"
            works.append(self._audit(row, kind, owner=self.actor, detail=detail))
        if state != (row["channel_state"] or {}):
            works.insert(0, self._rt.store.set_channel_state(row["id"], row["workflow_id"], state))
        return works


class _Outcome:
    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: str | None = None) -> None:
        self.value = value
        self.error = error


def _channel_name(channel: Any) -> str:
    return hide(str(getattr(channel, "name", type(channel).__name__)))  # audited and logged: no credentials


def _settled(outcome: _Outcome) -> _Outcome:
    """Resolve an async hook's result for a sync caller: ``asyncio.run`` outside an event loop (the one
    place where sync code bridges into one); impossible, and audited as a failure, inside a running loop."""
    if not inspect.isawaitable(outcome.value):
        return outcome
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited_outcome(outcome.value))
    if inspect.iscoroutine(outcome.value):
        outcome.value.close()
    return _Outcome(
        error="an async channel hook was called from sync code inside a running event loop; "
        "use the async API (await ledger.run / ledger.arun) or give the channel sync hooks"
    )


def _call_channel(channel: Any, hook: str, row: Mapping[str, Any]) -> _Outcome:
    try:
        state = (row.get("channel_state") or {}).get(_channel_name(channel))
        approval = approval_from_row(row)
        fn = getattr(channel, hook)
        return _Outcome(fn(approval) if hook == "request" else fn(approval, state))
    except Exception as e:
        return _Outcome(error=hide(f"{type(e).__name__}: {e}"))  # audited and logged: no credentials


async def _awaited_outcome(value: Any) -> _Outcome:
    try:
        return _Outcome(await value)
    except Exception as e:
        return _Outcome(error=hide(f"{type(e).__name__}: {e}"))
