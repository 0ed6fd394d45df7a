"""The decision core and its transition table, driven directly: no database, no clock."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from agent_ledger import TRANSITIONS, IllegalTransition, Status
from agent_ledger._decide import (
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
    transition,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
LIVE = NOW + dt.timedelta(seconds=10)
EXPIRED = NOW - dt.timedelta(seconds=1)


def row(status: Status, *, attempt: int = 1, lease: dt.datetime | None = None, **kw: Any) -> Row:
    base: dict[str, Any] = dict(
        key="k",
        workflow_id="wf",
        tool="t",
        status=status,
        attempt=attempt,
        payload_hash="h",
        args={"a": 1},
        owner="host:1:x",
        lease_expires_at=lease,
        started_at=NOW,
        result=None,
        result_replayable=True,
        result_repr=None,
        error={"type": "builtins.ValueError", "message": "x", "classes": ["builtins.ValueError", "builtins.Exception"]},
    )
    base.update(kw)
    return Row(**base)


def req(policy: Policy | None = None, payload: str = "h", args: dict[str, Any] | None = None) -> Request:
    return Request("k", payload, args or {"a": 1}, policy or Policy())


RETRY_VALUE = Policy(on_error="replay", retry_on=("builtins.ValueError",))
REPLAY = Policy(on_error="replay")
CRASH_RETRY = Policy(on_crash="retry")
RECONCILE = Policy(has_reconcile=True)

CASES = [
    ("new key claims", None, Policy(), False, Claim("claim")),
    ("succeeded replays", row(Status.SUCCEEDED), Policy(), False, Replay()),
    (
        "unstorable result refuses",
        row(Status.SUCCEEDED, result_replayable=False),
        Policy(),
        False,
        Refuse("not_replayable"),
    ),
    ("failed retries by default", row(Status.FAILED, attempt=2), Policy(), False, Claim("retry")),
    ("failed replays under on_error=replay", row(Status.FAILED), REPLAY, False, ReplayError()),
    ("retry_on matches by class name", row(Status.FAILED), RETRY_VALUE, False, Claim("retry")),
    (
        "retry_on miss replays",
        row(Status.FAILED),
        Policy(on_error="replay", retry_on=("builtins.KeyError",)),
        False,
        ReplayError(),
    ),
    ("live lease waits", row(Status.RUNNING, lease=LIVE), Policy(), False, Wait(LIVE)),
    ("live lease waits even under retry policy", row(Status.RUNNING, lease=LIVE), CRASH_RETRY, False, Wait(LIVE)),
    ("expired lease becomes unknown", row(Status.RUNNING, lease=EXPIRED), Policy(), False, MarkUnknown()),
    ("dead local owner becomes unknown", row(Status.RUNNING, lease=LIVE), Policy(), True, MarkUnknown()),
    (
        "expired lease taken over under on_crash=retry",
        row(Status.RUNNING, lease=EXPIRED, attempt=3),
        CRASH_RETRY,
        False,
        Claim("takeover"),
    ),
    (
        "expired lease reconciled",
        row(Status.RUNNING, lease=EXPIRED),
        RECONCILE,
        False,
        Claim("reconcile"),
    ),
    ("unknown refuses", row(Status.UNKNOWN), Policy(), False, Refuse("unknown")),
    ("unknown reconciled", row(Status.UNKNOWN), RECONCILE, False, Claim("reconcile")),
    (
        "unknown retried under on_crash=retry",
        row(Status.UNKNOWN),
        CRASH_RETRY,
        False,
        Claim("takeover"),
    ),
    ("pending runs again", row(Status.PENDING, attempt=4), Policy(), False, Claim("retry")),
]


@pytest.mark.parametrize(("name", "stored", "policy", "gone", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(name: str, stored: Row | None, policy: Policy, gone: bool, expected: object) -> None:
    assert decide(stored, req(policy), NOW, owner_gone=gone) == expected


@pytest.mark.parametrize("status", list(Status))
def test_a_different_payload_is_refused_in_every_state(status: Status) -> None:
    d = decide(row(status, lease=LIVE), req(payload="other", args={"a": 2, "b": 1}), NOW)
    assert d == Refuse("mismatch", ("a", "b"))


def test_every_claim_the_core_can_decide_is_a_legal_transition() -> None:
    policies = [Policy(), REPLAY, RETRY_VALUE, CRASH_RETRY, RECONCILE]
    for status in Status:
        for lease in (LIVE, EXPIRED):
            for policy in policies:
                for gone in (False, True):
                    d = decide(row(status, lease=lease), req(policy), NOW, owner_gone=gone)
                    if isinstance(d, Claim):
                        assert transition(status, d.event) is Status.RUNNING
                    if isinstance(d, MarkUnknown):
                        assert transition(status, "mark_unknown") is Status.UNKNOWN


def test_succeeded_is_terminal_and_illegal_moves_raise() -> None:
    assert TRANSITIONS[Status.SUCCEEDED] == {}
    for event in ("claim", "retry", "takeover", "fail", "resolve_retry"):
        with pytest.raises(IllegalTransition, match=event):
            transition(Status.SUCCEEDED, event)
    with pytest.raises(IllegalTransition):
        transition(None, "succeed")
    with pytest.raises(IllegalTransition):
        transition(Status.FAILED, "mark_unknown")


def test_every_state_is_reachable_from_new() -> None:
    seen = {None}
    frontier: list[Status | None] = [None]
    while frontier:
        state = frontier.pop()
        for nxt in TRANSITIONS[state].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == {None, *Status}


def test_the_documented_state_diagram_is_the_transition_table() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "guarantees.md").read_text()
    diagram = text.split("stateDiagram-v2", 1)[1].split("```", 1)[0]
    drawn = set()
    for src, dst, label in re.findall(r"^\s*(\S+) --> (\S+): (.+)$", diagram, re.M):
        for event in re.sub(r"\(.*\)", "", label).split("/"):
            drawn.add((None if src == "[*]" else src, event.strip(), dst))
    table = {(s.value if s else None, e, n.value) for s, moves in TRANSITIONS.items() for e, n in moves.items()}
    assert drawn == table


def test_lease_over_is_the_one_live_lease_check() -> None:
    from agent_ledger._decide import lease_over

    assert not lease_over(row(Status.RUNNING, lease=LIVE), NOW, False)
    assert lease_over(row(Status.RUNNING, lease=LIVE), NOW, True)  # its process is known gone
    assert lease_over(row(Status.RUNNING, lease=EXPIRED), NOW, False)
    assert lease_over(row(Status.RUNNING, lease=NOW), NOW, False)  # a lease ends at its instant
    assert lease_over(row(Status.RUNNING, lease=None), NOW, False)
