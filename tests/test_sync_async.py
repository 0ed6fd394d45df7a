"""One rule for user callables: sync or async is decided when the tool is declared (or the call made).

A sync tool (sync handler, called without ``await``) is carried by the sync driver, which never awaits:
an async ``reconcile=`` is refused when it is declared, and a handler that returns an awaitable anyway
is refused when it does, with the attempt recorded honestly. An async tool may use either kind of
callback. Each test counts handler and callback executions, on SQLite and Postgres.
"""

from __future__ import annotations

import asyncio
import functools
import warnings
from typing import Any

import pytest
from _workers import stale_claim

from agent_ledger import (
    NOT_EXECUTED,
    ConfigurationError,
    Effect,
    Ledger,
    OutcomeUnknown,
    Status,
    ToolCall,
    compute_key,
)

CALL = ToolCall(workflow_id="order-1", tool="stripe.charge", args={"amount": 100})
KEY = compute_key("order-1", "stripe.charge", {"amount": 100})


def test_a_sync_call_with_an_async_reconcile_is_refused_before_anything_is_stored(ledger: Ledger) -> None:
    """The bug: the coroutine object was stored as the result, the key succeeded and was never replayable."""
    stale_claim(ledger, CALL)
    runs = asked = 0

    def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "charged"

    async def lookup(effect: Effect) -> str:
        nonlocal asked
        asked += 1
        return "ch_found"

    with pytest.raises(ConfigurationError, match="reconcile= callback is async"):
        ledger.run(CALL, handler=charge, reconcile=lookup)
    rec = ledger.effect(KEY)
    assert rec is not None and rec.status is Status.RUNNING and rec.attempts == 1  # untouched
    assert [e.kind for e in rec.events] == []
    # The same callback works where it can be awaited: the async driver.
    assert asyncio.run(_arun(ledger, charge, lookup)) == "ch_found"
    assert ledger.run(CALL, handler=charge, reconcile=lambda e: NOT_EXECUTED) == "ch_found"  # a replay
    assert (runs, asked) == (0, 1)


async def _arun(ledger: Ledger, handler: Any, reconcile: Any) -> Any:
    try:
        return await ledger.arun(CALL, handler=handler, reconcile=reconcile)
    finally:
        await ledger.aclose()


def test_a_sync_tool_with_an_async_reconcile_is_refused_when_declared(ledger: Ledger) -> None:
    async def lookup(effect: Effect) -> Any:
        return NOT_EXECUTED

    with pytest.raises(ConfigurationError, match="reconcile= callback is async"):

        @ledger.tool("stripe.charge", reconcile=lookup)
        def charge(amount: int) -> str:
            return "charged"

    # An async tool may use an async (or a sync) reconcile.
    @ledger.tool("stripe.charge", reconcile=lookup)
    async def acharge(amount: int) -> str:
        return "charged"

    @ledger.tool("stripe.refund", reconcile=lambda effect: NOT_EXECUTED)
    async def refund(amount: int) -> str:
        return "refunded"


def test_an_async_approval_predicate_is_refused_when_declared(ledger: Ledger) -> None:
    async def big(call: ToolCall) -> bool:
        return True

    with pytest.raises(ConfigurationError, match="requires_approval must be a plain"):
        ledger.tool("stripe.charge", requires_approval=big)
    with pytest.raises(ConfigurationError, match="requires_approval must be a plain"):
        ledger.run(CALL, handler=lambda amount: 1, requires_approval=big)


def test_a_sync_handler_returning_a_coroutine_is_refused_and_released(ledger: Ledger) -> None:
    """A sync-looking handler that returns a coroutine: nothing of it ran, so the key goes back to pending."""
    runs = 0

    async def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "charged"

    sneaky = lambda amount: charge(amount)  # noqa: E731 - looks sync, returns a coroutine
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited": the driver closed it
        with pytest.raises(ConfigurationError, match="returned an awaitable"):
            ledger.run(CALL, handler=sneaky)
    rec = ledger.effect(KEY)
    assert rec is not None and rec.status is Status.PENDING and rec.result is None
    resolved = [e for e in rec.events if e.kind == "resolved"]
    assert len(resolved) == 1 and "not executed" in (resolved[0].detail or {}).get("reason", "")
    assert runs == 0
    # The next, correct call runs the handler once; then it replays.
    plain = functools.partial(lambda amount: "charged plainly")
    assert ledger.run(CALL, handler=plain) == "charged plainly"
    assert ledger.run(CALL, handler=plain) == "charged plainly"
    assert ledger.effect(KEY).status is Status.SUCCEEDED  # type: ignore[union-attr]


def test_a_sync_handler_returning_a_running_task_is_left_unknown(ledger: Ledger) -> None:
    """Some other awaitable (a scheduled task) may be doing the work: its outcome is unknown."""
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        return "done"

    async def main() -> None:
        task: asyncio.Task[str] | None = None

        def handler(amount: int) -> Any:
            nonlocal task
            task = asyncio.get_running_loop().create_task(work())
            return task

        with pytest.raises(ConfigurationError, match="returned an awaitable"):
            ledger.run(CALL, handler=handler)
        assert task is not None
        await task
        await ledger.aclose()

    asyncio.run(main())
    assert runs == 1
    rec = ledger.effect(KEY)
    assert rec is not None and rec.status is Status.UNKNOWN
    with pytest.raises(OutcomeUnknown):
        ledger.run(CALL, handler=lambda amount: pytest.fail("ran again"))


def test_a_sync_reconcile_returning_a_coroutine_leaves_the_outcome_unknown(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    asked = 0

    async def lookup(effect: Effect) -> str:
        nonlocal asked
        asked += 1
        return "found"

    with pytest.raises(ConfigurationError, match="its reconcile returned an awaitable"):
        ledger.run(CALL, handler=lambda amount: pytest.fail("ran"), reconcile=lambda e: lookup(e))
    assert asked == 0
    rec = ledger.effect(KEY)
    assert rec is not None and rec.status is Status.UNKNOWN
    unknown = [e for e in rec.events if e.kind == "unknown"]
    assert unknown and "reconcile_error" in (unknown[-1].detail or {})


async def test_an_async_tool_may_use_a_sync_reconcile(ledger: Ledger) -> None:
    stale_claim(ledger, CALL)
    asked = runs = 0

    def lookup(effect: Effect) -> str:
        nonlocal asked
        asked += 1
        return "found"

    async def charge(amount: int) -> str:
        nonlocal runs
        runs += 1
        return "charged"

    assert await ledger.run(CALL, handler=charge, reconcile=lookup) == "found"
    assert await ledger.run(CALL, handler=charge, reconcile=lookup) == "found"
    assert (asked, runs) == (1, 0)
    await ledger.aclose()
