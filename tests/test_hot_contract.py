"""The hot-path contract: the prebuilt fast implementation of the typed hot operations (``_fast.Hot``)
and their reference implementation (``Work.steps`` through SQLAlchemy Core) give the same answers and
leave the same rows, on SQLite and Postgres, sync and async.

Every operation sequence runs through six implementations side by side, each on its own tables in the
same database: the reference (sync and async engines) and the fast path (sync and async, each with the
lookup first and with the claim first, the two statement orders ``ClaimOrLoad`` picks between). After
each step every answer and every column of the effects and events tables must be equal (events compared
in insertion order without their generated ids; every time is injected by the test).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from sqlalchemy import delete, select

from agent_ledger import Ledger, RecordedError, ToolCall
from agent_ledger._decide import TRANSITIONS, Charge, Row
from agent_ledger._fast import Hot
from agent_ledger._limits import window_bounds
from agent_ledger._models import Status
from agent_ledger._runtime import Runtime
from agent_ledger._schema import build_tables
from agent_ledger._store import (
    EXCEEDED,
    LOOKUP_COLUMNS,
    AppendEvents,
    ClaimNew,
    ClaimOrLoad,
    Finish,
    Lookup,
    Store,
    Work,
    row_from_mapping,
)

pytestmark = pytest.mark.pgbouncer  # the hot path and its reference agree through PgBouncer too

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


class Impl:
    """One implementation of the hot operations on its own tables."""

    def __init__(self, url: str, n: int, name: str, *, hot: bool, is_async: bool, claim_first: bool, loop: Any):
        self.name = name
        self.rt = Runtime(url, build_tables(f"c{n}_"), auto_migrate=True)
        self.rt.use_hot_path = hot
        self.rt.ensure_schema()
        self.hot = hot
        self.is_async = is_async
        self.claim_first = claim_first
        self.loop = loop

    @property
    def store(self) -> Store:
        return self.rt.store

    def do(self, work: Work) -> Any:
        if self.hot:
            # Pin which statement order ClaimOrLoad takes (it follows the recent share of new keys).
            self.rt.hot._new_rate = 1.0 if self.claim_first else 0.0
        if self.is_async:
            return self.loop.run_until_complete(self.rt.ado(work))
        return self.rt.do(work)

    def snapshot(self) -> tuple[Any, Any]:
        t = self.rt.tables
        with self.rt.engine.connect() as conn:
            effects = conn.execute(select(t.effects).order_by(t.effects.c.key)).mappings().all()
            events = conn.execute(select(t.events).order_by(t.events.c.id)).mappings().all()
            usage = conn.execute(select(t.usage).order_by(t.usage.c.name, t.usage.c.window_start)).mappings().all()
        return norm(effects), norm([{k: v for k, v in e.items() if k != "id"} for e in events]), norm(usage)

    def clear(self) -> None:
        t = self.rt.tables
        with self.rt.engine.begin() as conn:
            conn.execute(delete(t.effects))
            conn.execute(delete(t.events))
            conn.execute(delete(t.usage))

    def close(self) -> None:
        self.loop.run_until_complete(self.rt.aclose())


def norm(value: Any) -> Any:
    """A comparable form that keeps types visible (True is not 1) and times with their offsets."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, norm(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return [norm(v) for v in value]
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


class Contract:
    """Runs each operation through every implementation and checks they agree."""

    def __init__(self, impls: list[Impl]) -> None:
        self.impls = impls
        self.kinds: set[str] = set()

    def run(self, build: Callable[[Store], Work]) -> Any:
        """Build the unit with each implementation's store, run it, compare answers and tables; return
        the reference's answer."""
        works = [build(impl.store) for impl in self.impls]
        if works[0].fast is not None:
            self.kinds.add(type(works[0].fast).__name__)
        answers = [impl.do(w) for impl, w in zip(self.impls, works, strict=True)]
        ref = self.impls[0]
        for impl, answer in zip(self.impls[1:], answers[1:], strict=True):
            assert repr(norm(answer)) == repr(norm(answers[0])), (
                f"{impl.name} answered {answer!r}, {ref.name} {answers[0]!r}"
            )
        tables = ref.snapshot()
        for impl in self.impls[1:]:
            assert repr(impl.snapshot()) == repr(tables), f"{impl.name} left other rows than {ref.name}"
        return answers[0]


@pytest.fixture
def contract(db_url: str) -> Iterator[Contract]:
    loop = asyncio.new_event_loop()
    variants = [
        ("reference sync", False, False, False),
        ("reference async", False, True, False),
        ("fast sync, lookup first", True, False, False),
        ("fast sync, claim first", True, False, True),
        ("fast async, lookup first", True, True, False),
        ("fast async, claim first", True, True, True),
    ]
    impls = [
        Impl(db_url, n, name, hot=hot, is_async=is_async, claim_first=claim_first, loop=loop)
        for n, (name, hot, is_async, claim_first) in enumerate(variants)
    ]
    try:
        yield Contract(impls)
    finally:
        for impl in impls:
            impl.close()
        loop.close()


def claim(key: str, owner: str, now: dt.datetime, lease: float = 30.0) -> dict[str, Any]:
    return {
        "key": key,
        "workflow_id": "wf",
        "tool": "charge",
        "payload_hash": f"h-{key}",
        "args": {"amount": 5, "note": "é", "when": now.isoformat()},
        "owner": owner,
        "lease_expires_at": now + dt.timedelta(seconds=lease),
        "now": now,
    }


def finish(key: str, owner: str, attempt: int, now: dt.datetime, event: Any, **values: Any) -> Callable[[Store], Work]:
    return lambda s: s.finish(
        event=event, key=key, workflow_id="wf", tool="charge", owner=owner, attempt=attempt, now=now, **values
    )


def test_named_sequences_agree_and_answer_right(contract: Contract) -> None:
    """The sequences the hot path must get right, each answer checked against what it must be, and
    every implementation checked against the reference after every step."""
    c, t = contract, T0
    assert c.run(lambda s: s.load("k1", "wf")) is None

    # A new key: claim (claim_or_load), succeed; then replays read it (lookup, claim_or_load).
    assert c.run(lambda s: s.claim_or_load(**claim("k1", "A", t))) == {"claimed": True}
    ok = finish(
        "k1",
        "A",
        1,
        t + dt.timedelta(seconds=1),
        "succeed",
        result={"id": "ch_1", "n": [1, 2.5]},
        result_replayable=True,
    )
    assert c.run(lambda s: ok(s)) == 1
    stored = c.run(lambda s: s.load("k1", "wf"))
    assert set(stored) == set(LOOKUP_COLUMNS)
    # Every hot statement names the workflow too (the shard): another workflow finds and fences nothing.
    assert c.run(lambda s: s.load("k1", "other")) is None
    assert stored["status"] == "succeeded" and stored["result"] == {"id": "ch_1", "n": [1, 2.5]}
    again = c.run(lambda s: s.claim_or_load(**claim("k1", "B", t + dt.timedelta(seconds=2))))
    assert again["claimed"] is False and again["status"] == "succeeded" and again["owner"] == "A"

    # A claim lost to a running row: claim_or_load sees the row, claim_new gets nothing.
    assert c.run(lambda s: s.claim_or_load(**claim("k2", "A", t, lease=5))) == {"claimed": True}
    lost = c.run(lambda s: s.claim_or_load(**claim("k2", "B", t + dt.timedelta(seconds=1))))
    assert lost["claimed"] is False and lost["status"] == "running" and lost["owner"] == "A"
    assert c.run(lambda s: s.claim_new(**claim("k2", "B", t + dt.timedelta(seconds=1)))) is None

    # Heartbeat: our claim extends its lease; a wrong attempt or owner extends nothing.
    beat = t + dt.timedelta(seconds=2)
    assert (
        c.run(
            lambda s: s.heartbeat(
                workflow_id="wf", key="k2", owner="A", attempt=1, lease_expires_at=beat + dt.timedelta(seconds=5)
            )
        )
        == 1
    )
    assert c.run(lambda s: s.heartbeat(workflow_id="wf", key="k2", owner="A", attempt=2, lease_expires_at=beat)) == 0
    assert c.run(lambda s: s.heartbeat(workflow_id="other", key="k2", owner="A", attempt=1, lease_expires_at=beat)) == 0
    assert (
        c.run(
            lambda s: s.finish(
                event="fail", key="k2", workflow_id="other", tool="charge", owner="A", attempt=1, now=beat
            )
        )
        == 0
    )
    assert c.run(lambda s: s.heartbeat(workflow_id="wf", key="k2", owner="B", attempt=1, lease_expires_at=beat)) == 0

    # Lease takeover after expiry: B claims attempt 2; A's heartbeat and completion are fenced off
    # (0 rows), and A's outcome goes to a late_completion row as the flow writes it.
    later = t + dt.timedelta(seconds=20)
    row = row_from_mapping(c.run(lambda s: s.load("k2", "wf")))
    assert c.run(lambda s: s.claim_again(event="takeover", row=row, owner="B", lease_expires_at=later, now=later)) == 1
    assert c.run(lambda s: s.heartbeat(workflow_id="wf", key="k2", owner="A", attempt=1, lease_expires_at=later)) == 0
    late = finish("k2", "A", 1, later, "succeed", result={"late": True}, result_replayable=True)
    assert c.run(late) == 0
    c.run(
        lambda s: s.event(
            key="k2",
            workflow_id="wf",
            tool="charge",
            kind="late_completion",
            attempt=1,
            owner="A",
            at=later,
            detail={"outcome": "succeed", "result": {"late": True}},
        )
    )
    # A stale takeover (observed before B's claim) matches nothing either.
    assert c.run(lambda s: s.claim_again(event="takeover", row=row, owner="C", lease_expires_at=later, now=later)) == 0
    # Fenced finish: the wrong attempt or the wrong owner changes no row and writes no audit row.
    failed = dict(error={"type": "ValueError", "message": "no"}, detail={"duration_ms": 1.5})
    assert c.run(finish("k2", "B", 1, later, "fail", **failed)) == 0
    assert c.run(finish("k2", "A", 2, later, "fail", **failed)) == 0

    # Fail (with its audit row, in the one Postgres statement), then a retry claims attempt 3.
    assert c.run(finish("k2", "B", 2, later, "fail", **failed)) == 1
    row = row_from_mapping(c.run(lambda s: s.load("k2", "wf")))
    assert row.status is Status.FAILED and row.error == {"type": "ValueError", "message": "no"}
    retry_at = later + dt.timedelta(seconds=1)
    assert (
        c.run(lambda s: s.claim_again(event="retry", row=row, owner="C", lease_expires_at=retry_at, now=retry_at)) == 1
    )
    done = finish(
        "k2",
        "C",
        3,
        retry_at,
        "succeed",
        result=None,
        result_replayable=False,
        result_repr="<object>",
        retain_until=retry_at + dt.timedelta(days=1),
        detail={"not_replayable": "why"},
    )
    assert c.run(done) == 1
    stored = c.run(lambda s: s.load("k2", "wf"))
    assert stored["result_replayable"] is False and stored["result_repr"] == "<object>" and stored["attempt"] == 3

    # mark_unknown both ways: an interrupted attempt records it (audited Finish), a sweeper marks a
    # dead claim (fenced on the observed lease); then a reconcile claims it again.
    assert c.run(lambda s: s.claim_or_load(**claim("k3", "A", t))) == {"claimed": True}
    assert (
        c.run(
            finish(
                "k3",
                "A",
                1,
                t,
                "mark_unknown",
                error={"type": "KeyboardInterrupt"},
                detail={"interrupted": "KeyboardInterrupt"},
            )
        )
        == 1
    )
    assert c.run(lambda s: s.claim_new(**claim("k4", "A", t, lease=1))) == {"attempt": 1}
    row = row_from_mapping(c.run(lambda s: s.load("k4", "wf")))
    # A running row's lease and start come back (waits, takeovers and InProgress read them); no other
    # status's do (a replay decodes neither).
    assert (row.status, row.lease_expires_at, row.started_at) == (Status.RUNNING, t + dt.timedelta(seconds=1), t)
    assert (
        c.run(lambda s: s.mark_unknown(row=row, now=later, by="sweeper", detail={"reason": "its lease expired"})) == 1
    )
    assert c.run(lambda s: s.mark_unknown(row=row, now=later, by="sweeper", detail={})) == 0
    row = row_from_mapping(c.run(lambda s: s.load("k4", "wf")))
    assert row.status is Status.UNKNOWN
    assert (row.lease_expires_at, row.started_at) == (None, None)
    assert c.run(lambda s: s.claim_again(event="reconcile", row=row, owner="B", lease_expires_at=later, now=later)) == 1

    # Replay records, batched.
    replayed_base = {"workflow_id": "wf", "tool": "charge", "kind": "replayed", "attempt": 1, "owner": "B", "at": later}
    replayed = [{**replayed_base, "key": k, "detail": {"count": n}} for n, k in enumerate(["k1", "k2", "k1"], 1)] + [
        # No detail, no attempt; nested JSON with text outside ASCII (a COPY on Postgres).
        {**replayed_base, "key": "k2", "attempt": None, "detail": None},
        {
            **replayed_base,
            "key": "k2",
            "detail": {"count": 1, "why": ["caf\u00e9", {"n": 2.5, "ok": True, "none": None}]},
        },
        # An aware time in another zone is the same instant (COPY writes its offset).
        {
            **replayed_base,
            "key": "k3",
            "detail": {"count": 1},
            "at": later.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))),
        },
    ]
    assert c.run(lambda s: s.events(replayed)) is None
    assert c.kinds == {"Lookup", "ClaimNew", "ClaimOrLoad", "Finish", "AppendEvents"}


def charge(
    cap: float, amount: float = 1, *, name: str = "calls", now: dt.datetime = T0, window: float | None = None
) -> Charge:
    start, end = window_bounds(window, now)
    return Charge(name, "wf", "workflow", "charge", start, end, float(amount), float(cap))


def test_limited_claims_agree_and_answer_right(contract: Contract) -> None:
    """Claims that consume budgets: the winner pays in the claim's transaction; a claim over budget
    writes nothing (no claim row, no usage) and answers EXCEEDED; a claim that loses (the key exists)
    pays nothing; a forced charge (an approved call past its limit) is recorded past the cap."""
    c, t = contract, T0
    two = (charge(2), charge(10, 4, name="spend"))
    assert c.run(lambda s: s.claim_or_load(**claim("k1", "A", t), charges=two)) == {"claimed": True}
    assert c.run(lambda s: s.claim_new(**claim("k2", "A", t), charges=two)) == {"attempt": 1}
    # The key exists: claim_or_load reads it, claim_new gets nothing, and neither pays.
    again = c.run(lambda s: s.claim_or_load(**claim("k1", "B", t), charges=two))
    assert again["claimed"] is False and again["owner"] == "A"
    assert c.run(lambda s: s.claim_new(**claim("k1", "B", t), charges=two)) is None
    # Over budget (calls: 2 of 2 used): nothing written, both orders of claim_or_load and claim_new.
    assert c.run(lambda s: s.claim_or_load(**claim("k3", "A", t), charges=two)) is EXCEEDED
    assert c.run(lambda s: s.claim_new(**claim("k3", "A", t), charges=two)) is EXCEEDED
    assert c.run(lambda s: s.load("k3", "wf")) is None
    # The second charge over its own budget (spend: 8 + 4 > 10) while the first fits: still nothing.
    more = (charge(5), charge(10, 4, name="spend"))
    assert c.run(lambda s: s.claim_or_load(**claim("k3", "A", t), charges=more)) is EXCEEDED
    # One that fits exactly (8 + 2 = 10), then a new window of a windowed budget starts from zero.
    assert c.run(lambda s: s.claim_or_load(**claim("k4", "A", t), charges=(charge(10, 2, name="spend"),))) == {
        "claimed": True
    }
    windowed = (charge(1, now=t, window=60),)
    assert c.run(lambda s: s.claim_new(**claim("k5", "A", t), charges=windowed)) == {"attempt": 1}
    assert c.run(lambda s: s.claim_new(**claim("k6", "A", t), charges=windowed)) is EXCEEDED
    later = t + dt.timedelta(seconds=60)
    windowed = (charge(1, now=later, window=60),)
    assert c.run(lambda s: s.claim_new(**claim("k6", "A", later), charges=windowed)) == {"attempt": 1}
    # A retry pays (fenced claim_again), and a retry over budget leaves the failed row as it was.
    assert c.run(finish("k1", "A", 1, t, "fail", error={"type": "E"}, detail={})) == 1
    row = row_from_mapping(c.run(lambda s: s.load("k1", "wf")))
    lease = t + dt.timedelta(seconds=30)
    assert (
        c.run(lambda s: s.claim_again(event="retry", row=row, owner="B", lease_expires_at=lease, now=t, charges=two))
        is EXCEEDED
    )
    assert c.run(lambda s: s.load("k1", "wf"))["status"] == "failed"
    # Forced (approved past the limit): recorded over the cap.
    forced = (dataclasses.replace(charge(2), forced=True),)
    assert (
        c.run(lambda s: s.claim_again(event="retry", row=row, owner="B", lease_expires_at=lease, now=t, charges=forced))
        == 1
    )
    assert c.run(lambda s: s.claim_new(**claim("k7", "A", t), charges=forced)) == {"attempt": 1}
    usage = {(r["name"], r["window_start"]): r["used"] for r in c.run(lambda s: s.usage_of([*two, *windowed]))}
    assert usage[("calls", two[0].window_start)] == 4.0
    assert usage[("spend", two[1].window_start)] == 10.0


KEYS = st.sampled_from(["k1", "k2", "k3"])
BUDGETS = st.sampled_from([None, None, 0, 1, 2, 5])
OWNERS = st.sampled_from(["A", "B", "C"])
FENCED_OWNERS = st.sampled_from(["current", "current", "A", "B"])
OFFSETS = st.sampled_from([0, 0, -1, 1])
RESULTS = st.sampled_from(
    [
        {"result": {"ok": 1}, "result_replayable": True},
        {"result": [1, "é", 2.5, None], "result_replayable": True},
        {"result": None, "result_replayable": False, "result_repr": "<socket>"},
    ]
)


def test_random_sequences_agree(contract: Contract) -> None:
    """Random interleavings of every hot operation (and the fenced Core ones around them), with stale
    observations, wrong owners and wrong attempts: all implementations agree after every step."""
    c = contract

    class Sequences(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.now = T0
            self.seen: dict[str, Row] = {}  # the last row observed per key (may be stale by now)

        @initialize()
        def empty(self) -> None:
            for impl in c.impls:
                impl.clear()

        @rule(seconds=st.integers(0, 40))
        def tick(self, seconds: int) -> None:
            self.now += dt.timedelta(seconds=seconds, microseconds=seconds * 7919)

        @rule(key=KEYS)
        def lookup(self, key: str) -> None:
            found = c.run(lambda s: s.load(key, "wf"))
            if found is not None:
                self.seen[key] = row_from_mapping(found)

        def charges(self, budget: int | None, window: float | None) -> tuple[Charge, ...]:
            return () if budget is None else (charge(budget, now=self.now, window=window),)

        @rule(
            key=KEYS,
            owner=OWNERS,
            lease=st.sampled_from([1.0, 30.0]),
            or_load=st.booleans(),
            budget=BUDGETS,
            window=st.sampled_from([None, 30.0]),
        )
        def claim(
            self, key: str, owner: str, lease: float, or_load: bool, budget: int | None, window: float | None
        ) -> None:
            args = claim(key, owner, self.now, lease)
            args["charges"] = self.charges(budget, window)
            if or_load:
                c.run(lambda s: s.claim_or_load(**args))
            else:
                c.run(lambda s: s.claim_new(**args))

        @rule(key=KEYS, owner=OWNERS, event=st.sampled_from(["retry", "takeover", "reconcile"]), budget=BUDGETS)
        def claim_again(self, key: str, owner: str, event: str, budget: int | None) -> None:
            row = self.seen.get(key)
            if row is None or event not in TRANSITIONS[row.status]:
                return
            lease = self.now + dt.timedelta(seconds=30)
            paid = self.charges(budget, None)
            c.run(
                lambda s: s.claim_again(
                    event=event, row=row, owner=owner, lease_expires_at=lease, now=self.now, charges=paid
                )
            )

        def owned(self, key: str, owner: str, off: int) -> tuple[str, int]:
            """(owner, attempt) for a fenced write: "current" is the observed row's own (mostly right,
            unless the observation is stale), off shifts the attempt."""
            row = self.seen.get(key)
            if owner == "current":
                owner = row.owner or "A" if row is not None else "A"
            return owner, (row.attempt if row is not None else 1) + off

        @rule(key=KEYS, owner=FENCED_OWNERS, off=OFFSETS)
        def heartbeat(self, key: str, owner: str, off: int) -> None:
            owner, attempt = self.owned(key, owner, off)
            lease = self.now + dt.timedelta(seconds=30)
            c.run(
                lambda s: s.heartbeat(workflow_id="wf", key=key, owner=owner, attempt=attempt, lease_expires_at=lease)
            )

        @rule(
            key=KEYS,
            owner=FENCED_OWNERS,
            off=OFFSETS,
            event=st.sampled_from(["succeed", "fail", "mark_unknown"]),
            values=RESULTS,
            retain=st.booleans(),
        )
        def finish(self, key: str, owner: str, off: int, event: str, values: dict[str, Any], retain: bool) -> None:
            owner, attempt = self.owned(key, owner, off)
            if event != "succeed":
                values = {"error": {"type": "ValueError", "message": "x"}, "detail": {"duration_ms": 0.5}}
            retain_until = self.now + dt.timedelta(days=1) if retain else None
            n = c.run(finish(key, owner, attempt, self.now, event, retain_until=retain_until, **values))
            if not n:
                c.run(
                    lambda s: s.event(
                        key=key,
                        workflow_id="wf",
                        tool="charge",
                        kind="late_completion",
                        attempt=attempt,
                        owner=owner,
                        at=self.now,
                        detail={"outcome": event},
                    )
                )
            self.lookup(key)  # what the fast path reads back (values, types) is compared too

        @rule(key=KEYS)
        def mark_unknown(self, key: str) -> None:
            row = self.seen.get(key)
            if row is not None and row.status is Status.RUNNING:
                c.run(lambda s: s.mark_unknown(row=row, now=self.now, by="sweeper", detail={"reason": "test"}))

        @rule(keys=st.lists(KEYS, min_size=1, max_size=4))
        def replays(self, keys: list[str]) -> None:
            rows = [
                {
                    "key": k,
                    "workflow_id": "wf",
                    "tool": "charge",
                    "kind": "replayed",
                    "attempt": None,
                    "owner": "R",
                    "at": self.now,
                    "detail": {"count": i},
                }
                for i, k in enumerate(keys)
            ]
            c.run(lambda s: s.events(rows))

    run_state_machine_as_test(
        Sequences, settings=settings(max_examples=25, stateful_step_count=25, deadline=None, database=None)
    )
    assert c.kinds == {"Lookup", "ClaimNew", "ClaimOrLoad", "Finish", "AppendEvents"}


# -- the flow on the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_calls_run_on_the_reference_path(make_ledger: Any, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hot path off, whole calls (new, replay, failure and retry) run through the Core
    reference, ``claim_or_load`` included (it used to lack ``claimed`` there), each handler once."""

    def no_hot(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the hot path ran")

    for name in ("run", "arun", "read_inline"):
        monkeypatch.setattr(Hot, name, no_hot)
    ledger: Ledger = make_ledger()
    ledger._rt.use_hot_path = False
    ran: list[int] = []

    def charge(amount: int) -> dict[str, int]:
        ran.append(amount)
        if amount < 0:
            raise ValueError("negative")
        return {"charged": amount}

    async def acharge(amount: int) -> dict[str, int]:
        return charge(amount)

    def call(amount: int) -> Any:
        tc = ToolCall(workflow_id="wf-ref", tool="charge", args={"amount": amount})
        if mode == "sync":
            return ledger.run(tc, handler=charge)
        return asyncio.run(ledger.arun(tc, handler=acharge))

    assert call(5) == {"charged": 5}
    assert call(5) == {"charged": 5}  # a replay
    with pytest.raises(ValueError):
        call(-1)
    with pytest.raises((ValueError, RecordedError)):
        call(-1)  # retried (the default policy retries failures): the handler runs again
    assert ran == [5, -1, -1]
    kinds = [e.kind for r in ledger.history("wf-ref") for e in r.events]
    assert kinds.count("failed") == 2 and "succeeded" in kinds


def test_typed_operations_are_what_the_fast_path_dispatches_on(contract: Contract) -> None:
    """Every hot unit the store builds carries its typed operation, and its steps are the reference."""
    s = contract.impls[0].store
    t = T0
    units = {
        Lookup: s.load("k", "wf"),
        ClaimNew: s.claim_new(**claim("k", "A", t)),
        ClaimOrLoad: s.claim_or_load(**claim("k", "A", t)),
        Finish: s.finish(event="fail", key="k", workflow_id="wf", tool="t", owner="A", attempt=1, now=t),
        AppendEvents: s.events([]),
    }
    for kind, work in units.items():
        assert type(work.fast) is kind
    assert units[ClaimOrLoad].returns == "claim_or_row" and len(units[ClaimOrLoad].statements()) == 2
    assert (s.hot.complete_audited is not None) == (s.dialect == "postgresql")
