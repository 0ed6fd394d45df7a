"""Worker processes for the limits tests (started with multiprocessing's spawn context).

Each handler execution appends one line to a log file (one O_APPEND write), so the parent counts
executions across processes exactly. Nothing runs at import.
"""

from __future__ import annotations

import os
import random
from typing import Any

from _workers import log_line

from agent_ledger import Ledger, LimitExceeded, ToolCall


def budget_racer(url: str, keys: int, budget: int, barrier: Any, results: Any, log: str) -> None:
    """Call every key of one workflow in a random order, all racing on one budget of ``budget`` calls
    (the other processes call the same keys: winners, waiters and losers of each key race too)."""
    from agent_ledger import Limit

    ledger = Ledger(url, lease=30, wait=30, limits=[Limit(max=budget, name="race")])
    pid = os.getpid()

    def handler(n: int) -> dict[str, Any]:
        log_line(log, f"{n} {pid}")
        return {"n": n, "by": pid}

    order = list(range(keys))
    random.shuffle(order)
    barrier.wait(timeout=120)
    for n in order:
        try:
            ledger.run(ToolCall(workflow_id="race", tool="race", args={"n": n}), handler=handler)
            results.put(("ok", n))
        except LimitExceeded as e:
            results.put(("refused", n, e.used, e.max))
    ledger.close()


def spender(url: str, amounts: list[int], log: str, results: Any) -> None:
    """Spend ``amounts`` (one call each) against a per-workflow cap of 100 in workflow ``order-1``."""
    from agent_ledger import Limit

    ledger = Ledger(url)

    @ledger.tool("pay", limits=[Limit(max=100, count="amount", name="spend")])
    def pay(amount: int, n: int) -> int:
        log_line(log, f"pay {amount}")
        return amount

    with ledger.workflow("order-1"):
        for n, amount in enumerate(amounts):
            try:
                results.put(("ok", pay(amount, n)))
            except LimitExceeded as e:
                results.put(("refused", e.used))
    ledger.close()
