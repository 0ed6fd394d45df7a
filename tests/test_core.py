"""Run-once semantics of the core issue, on SQLite and Postgres, counting handler executions."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from agent_ledger import (
    ConfigurationError,
    Effect,
    InvalidArguments,
    Ledger,
    NoWorkflow,
    PayloadMismatch,
    RecordedError,
    ResultNotReplayable,
    Status,
    ToolCall,
    compute_key,
)

CALL = ToolCall(workflow_id="order-123", tool="stripe.charge", args={"amount": 100, "currency": "usd"})


def test_new_key_runs_once_then_replays(ledger: Ledger, make_ledger: Callable[..., Ledger]) -> None:
    runs: list[dict[str, Any]] = []

    def charge(amount: int, currency: str) -> dict[str, Any]:
        runs.append({"amount": amount, "currency": currency})
        return {"charge_id": f"ch_{len(runs)}", "amount": amount}

    first = ledger.run(CALL, handler=charge)
    assert first == {"charge_id": "ch_1", "amount": 100}
    for _ in range(10):
        assert ledger.run(CALL, handler=charge) == first
    # A retry from a fresh process: a second ledger instance on the same database.
    fresh = make_ledger()
    assert fresh.run(CALL, handler=charge) == first
    assert len(runs) == 1
    fresh.flush()  # replay records are batched off the hot path

    (rec,) = ledger.history("order-123")
    assert rec.status is Status.SUCCEEDED
    assert rec.attempts == 1
    assert rec.result == first
    assert rec.args == {"amount": 100, "currency": "usd"}
    assert rec.created_at <= rec.started_at <= rec.finished_at  # type: ignore[operator]
    assert rec.replays == 11
    kinds = [e.kind for e in rec.events]
    assert kinds.count("succeeded") == 1
    # Replays are counted per key and flush (about one row per ledger here, however many retries).
    replayed = [e for e in rec.events if e.kind == "replayed"]
    assert sum((e.detail or {})["count"] for e in replayed) == 11 and 2 <= len(replayed) < 11


def test_effect_is_passed_to_handlers_that_ask(ledger: Ledger) -> None:
    seen: list[Effect] = []

    def charge(amount: int, currency: str, effect: Effect) -> str:
        seen.append(effect)
        return effect.idem_key

    idem = ledger.run(CALL, handler=charge)
    assert len(seen) == 1
    eff = seen[0]
    assert eff.key == idem == compute_key("order-123", "stripe.charge", {"amount": 100, "currency": "usd"})
    assert eff.idem_key.isascii() and len(eff.idem_key) <= 255
    assert (eff.attempt, eff.workflow_id, eff.tool) == (1, "order-123", "stripe.charge")
    assert dict(eff.args) == {"amount": 100, "currency": "usd"}


def test_claim_is_committed_before_the_handler_runs(ledger: Ledger, db_url: str) -> None:
    observed: list[tuple[str, int]] = []
    engine = sa.create_engine(db_url.replace("postgresql+psycopg", "postgresql+psycopg"))

    def charge(amount: int, currency: str, effect: Effect) -> int:
        # Another connection sees the claim while the handler is still running.
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT status, attempt FROM agent_ledger_effects WHERE key = :k"), {"k": effect.key}
            ).one()
        observed.append((row[0], row[1]))
        return 1

    ledger.run(CALL, handler=charge)
    engine.dispose()
    assert observed == [("running", 1)]


async def test_async_handler_runs_once(ledger: Ledger) -> None:
    runs = 0

    async def charge(amount: int, currency: str, effect: Effect) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0)
        return {"amount": amount, "attempt": effect.attempt}

    results = [await ledger.run(CALL, handler=charge) for _ in range(5)]
    results.append(await ledger.arun(CALL, handler=charge))
    assert runs == 1
    assert results == [{"amount": 100, "attempt": 1}] * 6
    await ledger.aclose()


async def test_sync_and_async_callers_share_keys(ledger: Ledger) -> None:
    runs = 0

    def charge(amount: int, currency: str) -> int:
        nonlocal runs
        runs += 1
        return amount

    assert ledger.run(CALL, handler=charge) == 100
    assert await ledger.arun(CALL, handler=charge) == 100
    assert runs == 1
    await ledger.aclose()


def test_decorator_positional_keyword_and_defaults_share_a_key(ledger: Ledger) -> None:
    runs = 0

    @ledger.tool("stripe.charge")
    def charge(amount: int, currency: str = "usd", effect: Effect | None = None) -> int:
        nonlocal runs
        runs += 1
        assert effect is not None
        return amount

    with ledger.workflow("order-123"):
        assert charge(100) == 100
        assert charge(100, "usd") == 100
        assert charge(amount=100, currency="usd") == 100
        assert charge(currency="usd", amount=100) == 100
    assert runs == 1
    # The decorator and the explicit form compute the same key.
    assert ledger.run(CALL, handler=lambda amount, currency: pytest.fail("must replay")) == 100
    (rec,) = ledger.history("order-123")
    assert rec.key == compute_key("order-123", "stripe.charge", {"amount": 100, "currency": "usd"})


def test_decorator_default_name_is_module_qualname(ledger: Ledger) -> None:
    @ledger.tool()
    def send_email(to: str, body: str) -> None:
        return None

    with ledger.workflow("wf"):
        assert send_email("a@example.com", "hi") is None
    (rec,) = ledger.history("wf")
    assert rec.tool == f"{__name__}.test_decorator_default_name_is_module_qualname.<locals>.send_email"


async def test_async_decorator_and_workflow_context_across_tasks(ledger: Ledger) -> None:
    runs: list[str] = []

    @ledger.tool()
    async def send_email(to: str, body: str) -> str:
        runs.append(to)
        await asyncio.sleep(0.001)
        return f"sent to {to}"

    async def agent_step() -> str:
        await asyncio.sleep(0)
        return await send_email("a@example.com", "hi")

    async with ledger.workflow("wf-async"):
        first = await send_email("a@example.com", body="hi")
        # The workflow holds across await and in tasks created inside it.
        again = await asyncio.gather(*(asyncio.create_task(agent_step()) for _ in range(3)))
    assert first == "sent to a@example.com" and again == [first] * 3
    assert runs == ["a@example.com"]
    with pytest.raises(NoWorkflow, match="send_email"):
        await send_email("a@example.com", "hi")
    await ledger.aclose()


def test_no_workflow_raises_and_writes_nothing(ledger: Ledger) -> None:
    @ledger.tool("t")
    def tool(x: int) -> int:
        pytest.fail("must not run")

    with pytest.raises(NoWorkflow, match="'t'"):
        tool(1)


class Receipt(BaseModel):
    charge_id: str
    amount: Decimal
    at: dt.datetime


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_decorator_rebuilds_annotated_return_types_on_replay(
    ledger: Ledger, make_ledger: Callable[..., Ledger]
) -> None:
    runs = 0
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)

    def tools(led: Ledger) -> tuple[Any, Any, Any]:
        @led.tool("receipt")
        def receipt(amount: int) -> Receipt:
            nonlocal runs
            runs += 1
            return Receipt(charge_id="ch_1", amount=Decimal("1.50"), at=when)

        @led.tool("point")
        def point(x: int) -> Point:
            nonlocal runs
            runs += 1
            return Point(x, x + 1)

        @led.tool("moment")
        def moment(x: int) -> dt.datetime:
            nonlocal runs
            runs += 1
            return when

        return receipt, point, moment

    receipt, point, moment = tools(ledger)
    with ledger.workflow("wf"):
        live = (receipt(1), point(1), moment(1))
    receipt2, point2, moment2 = tools(make_ledger())  # as after a restart
    with ledger.workflow("wf"):
        replayed = (receipt2(1), point2(1), moment2(1))
    assert runs == 3
    assert replayed == live
    assert isinstance(replayed[0], Receipt) and isinstance(replayed[1], Point) and isinstance(replayed[2], dt.datetime)


def test_run_rebuilds_result_type_when_given(ledger: Ledger) -> None:
    runs = 0

    def charge(amount: int, currency: str) -> Point:
        nonlocal runs
        runs += 1
        return Point(amount, 0)

    assert ledger.run(CALL, handler=charge) == Point(100, 0)
    assert ledger.run(CALL, handler=charge) == {"x": 100, "y": 0}  # stored JSON without a type
    assert ledger.run(CALL, handler=charge, result_type=Point) == Point(100, 0)
    assert runs == 1


def test_key_subset_mismatch_refuses_without_running(ledger: Ledger) -> None:
    runs = 0

    @ledger.tool("stripe.charge", key=["customer", "order_id"])
    def charge(customer: str, order_id: str, amount: int, note: str = "") -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {"charged": amount}

    with ledger.workflow("order-9"):
        assert charge("cus_1", "o1", 100) == {"charged": 100}
        assert charge("cus_1", "o1", 100) == {"charged": 100}
        with pytest.raises(PayloadMismatch) as info:
            charge("cus_1", "o1", 10_000, note="oops")
        # A different key subset is a different key: runs.
        assert charge("cus_1", "o2", 5) == {"charged": 5}
    assert runs == 2
    err = info.value
    assert err.fields == ["amount", "note"]
    assert "amount" in str(err) and "10000" not in str(err)
    assert not hasattr(err, "result")
    rec = next(r for r in ledger.history("order-9") if r.args["order_id"] == "o1")
    assert rec.result == {"charged": 100} and rec.args["amount"] == 100
    refused = [e for e in rec.events if e.kind == "refused"]
    assert len(refused) == 1 and refused[0].detail and refused[0].detail["fields"] == ["amount", "note"]


def test_failure_is_recorded_and_retried_by_default(ledger: Ledger) -> None:
    runs = 0

    def flaky(amount: int, currency: str, effect: Effect) -> str:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ConnectionError(f"downstream down (attempt {effect.attempt})")
        return f"ok on attempt {effect.attempt}"

    for attempt in (1, 2):
        with pytest.raises(ConnectionError, match=f"attempt {attempt}"):
            ledger.run(CALL, handler=flaky)
        (rec,) = ledger.history("order-123")
        assert rec.status is Status.FAILED and rec.attempts == attempt
        assert rec.error is not None
        assert rec.error.type == "builtins.ConnectionError"
        assert f"attempt {attempt}" in rec.error.message
        assert "ConnectionError" in (rec.error.traceback or "") and "flaky" in (rec.error.traceback or "")
    assert ledger.run(CALL, handler=flaky) == "ok on attempt 3"
    assert ledger.run(CALL, handler=flaky) == "ok on attempt 3"
    assert runs == 3
    (rec,) = ledger.history("order-123")
    assert rec.status is Status.SUCCEEDED and rec.error is None and rec.attempts == 3
    outcomes = [(e.kind, e.attempt) for e in rec.events if e.kind in ("failed", "succeeded", "retry")]
    assert outcomes == [("failed", 1), ("retry", 2), ("failed", 2), ("retry", 3), ("succeeded", 3)]
    failures = [e.detail["error"] for e in rec.events if e.kind == "failed" and e.detail]
    assert failures == [
        {"type": "builtins.ConnectionError", "message": f"downstream down (attempt {n})"} for n in (1, 2)
    ]


class Declined(Exception):
    pass


class Timeout(Exception):
    pass


def test_on_error_replay_reraises_the_recorded_error(ledger: Ledger) -> None:
    runs = 0

    @ledger.tool("charge", on_error="replay")
    def charge(amount: int) -> None:
        nonlocal runs
        runs += 1
        raise Declined("card declined")

    with ledger.workflow("wf"):
        with pytest.raises(Declined):
            charge(1)
        for _ in range(3):
            with pytest.raises(RecordedError) as info:
                charge(1)
    assert runs == 1
    assert info.value.error_type == f"{__name__}.Declined"
    assert info.value.message == "card declined" and info.value.attempt == 1
    assert "Declined" in (info.value.traceback or "")


def test_retry_on_retries_only_the_listed_errors(ledger: Ledger) -> None:
    runs: list[int] = []

    @ledger.tool("charge", retry_on=(Timeout,))
    def charge(amount: int) -> str:
        runs.append(amount)
        if amount == 1:
            raise Timeout("slow")
        if amount == 2:
            raise Declined("no")
        return "ok"

    with ledger.workflow("wf"):
        for _ in range(3):
            with pytest.raises(Timeout):
                charge(1)
        with pytest.raises(Declined):
            charge(2)
        with pytest.raises(RecordedError, match="Declined"):
            charge(2)
    assert runs == [1, 1, 1, 2]


def test_unserialisable_result_is_done_but_not_replayable(ledger: Ledger, make_ledger: Callable[..., Ledger]) -> None:
    runs = 0

    class Handle:
        def __repr__(self) -> str:
            return "<Handle 42>"

    handle = Handle()

    def open_thing(amount: int, currency: str) -> Handle:
        nonlocal runs
        runs += 1
        return handle

    assert ledger.run(CALL, handler=open_thing) is handle
    for led in (ledger, make_ledger()):
        with pytest.raises(ResultNotReplayable) as info:
            led.run(CALL, handler=open_thing)
        assert info.value.result_repr == "<Handle 42>"
    assert runs == 1
    (rec,) = ledger.history("order-123")
    assert rec.status is Status.SUCCEEDED and rec.result_replayable is False and rec.result_repr == "<Handle 42>"


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ({"amount": float("nan")}, "args.amount"),
        ({"items": [1, {"price": float("inf")}]}, "args.items[1].price"),
        ({"meta": {1: "x"}}, "args.meta"),
        ({"when": dt.datetime(2026, 1, 1)}, "args.when"),
        ({"thing": object()}, "args.thing"),
    ],
)
def test_invalid_arguments_name_the_path_and_write_nothing(ledger: Ledger, args: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        ledger.run(ToolCall(workflow_id="bad", tool="t", args=args), handler=lambda **kw: pytest.fail("ran"))
    assert info.value.path == path
    assert path in str(info.value)
    assert ledger.history("bad") == []


def test_oversized_arguments_are_refused(make_ledger: Callable[..., Ledger]) -> None:
    led = make_ledger(max_args_bytes=1000)
    with pytest.raises(InvalidArguments, match="over the limit of 1000"):
        led.run(ToolCall(workflow_id="big", tool="t", args={"blob": "x" * 2000}), handler=lambda blob: 1)
    assert led.run(ToolCall(workflow_id="big", tool="t", args={"blob": "x" * 10}), handler=lambda blob: 1) == 1
    assert [r.args for r in led.history("big")] == [{"blob": "x" * 10}]


def test_arguments_that_do_not_fit_the_handler_are_refused(ledger: Ledger) -> None:
    def charge(amount: int) -> int:
        pytest.fail("must not run")

    with pytest.raises(InvalidArguments, match="do not fit"):
        ledger.run(CALL, handler=charge)
    assert ledger.history("order-123") == []


def test_history_orders_effects_and_keeps_each_attempt(ledger: Ledger) -> None:
    def step(n: int) -> int:
        return n * 10

    for n in (3, 1, 2):
        ledger.run(ToolCall(workflow_id="wf", tool=f"step{n}", args={"n": n}), handler=step)
    ledger.run(ToolCall(workflow_id="other", tool="x", args={"n": 1}), handler=step)
    records = ledger.history("wf")
    assert [r.tool for r in records] == ["step3", "step1", "step2"]
    assert [r.result for r in records] == [30, 10, 20]
    assert all(r.duration is not None and r.duration >= 0 for r in records)
    assert ledger.effect(records[0].key) == records[0]
    assert ledger.effect("v1:nope") is None


def test_product_page_snippet_runs_as_written(ledger: Ledger) -> None:
    charged: list[int] = []

    async def charge_customer(amount: int, currency: str) -> dict[str, Any]:
        charged.append(amount)
        return {"status": "paid"}

    async def main() -> Any:
        result = await ledger.run(
            ToolCall(
                workflow_id="order-123",
                tool="stripe.charge",
                args={"amount": 100, "currency": "usd"},
            ),
            handler=charge_customer,
        )
        # Retry this 100 times. Handler runs once.
        for _ in range(100):
            assert await ledger.run(CALL, handler=charge_customer) == result
        await ledger.aclose()
        return result

    assert asyncio.run(main()) == {"status": "paid"}
    assert charged == [100]


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("key", 5, "key must be a list of argument names"),
        ("key", "amount", "not the string"),
        ("key", [], "non-empty list"),
        ("key", ["amount", ""], "non-empty list"),
        ("redact", 5, "redact must be a list of argument names"),
        ("redact", ["card", None], "redact must be a list"),
        ("approvers", 5, "approvers must be a list of names"),
        ("approvers", ["alice", 1], "approvers must be a non-empty list of names"),  # was a raw TypeError
        ("approvers", [["alice"]], "approvers must be a non-empty list of names"),  # was a raw TypeError
        ("approvers", [], "non-empty list of names"),
    ],
)
def test_name_list_options_are_configuration_errors(tmp_path: Any, option: str, value: Any, why: str) -> None:
    """key, redact and approvers are checked by one rule; a bad value never escapes as a raw TypeError."""
    led = Ledger(f"sqlite:///{tmp_path}/names.db")
    runs: list[int] = []
    extra: dict[str, Any] = {"requires_approval": True} if option == "approvers" else {}
    call = ToolCall(workflow_id="wf", tool="t", args={"amount": 1, "card": "4242"})
    with pytest.raises(ConfigurationError, match=why):
        led.run(call, handler=lambda amount, card: runs.append(1), **{option: value}, **extra)
    with pytest.raises(ConfigurationError, match=why):
        led.tool("t", **{option: value}, **extra)
    assert runs == []
    led.close()
