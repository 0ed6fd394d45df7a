"""Measure PyPI's ``agent-ledger`` (rune0-dev/agent-ledger, a different project with the same name) the way
benchmarks/run.py measures agent_ledger: new calls and replays through its ``EffectLedger.run`` on its
``PostgresStore``, p50/p99 per call. Run by run.py in the virtualenv where that package is installed (its
import name clashes with ours):

    /tmp/upstream-venv/bin/python -I benchmarks/upstream.py CONNINFO N WARM

Prints one JSON object. The package is async only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(conninfo: str, n: int, warm: int) -> dict[str, Any]:
    from agent_ledger.stores.postgres import SCHEMA_SQL, PostgresStore
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    import agent_ledger
    from agent_ledger import EffectLedger, EffectLedgerOptions, ToolCall

    pool = AsyncConnectionPool(
        conninfo, min_size=1, max_size=2, open=False, kwargs={"autocommit": True, "row_factory": dict_row}
    )
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute(SCHEMA_SQL)
    ledger: Any = EffectLedger(EffectLedgerOptions(store=PostgresStore(pool)))
    run = uuid.uuid4().hex[:8]

    async def handler(effect: Any) -> dict[str, int]:
        return {"ok": 1}

    async def call(i: int) -> None:
        await ledger.run(ToolCall(workflow_id=f"up-{run}", tool="bench", args={"i": i}), handler)

    for i in range(warm):
        await call(10_000_000 + i)
        await call(10_000_000 + i)
    new: list[float] = []
    replay: list[float] = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        new.append((time.perf_counter() - t) * 1000)
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        replay.append((time.perf_counter() - t) * 1000)
    await pool.close()
    version = getattr(agent_ledger, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("agent-ledger")
    return {
        "package": "agent-ledger",
        "version": version,
        "new_p50_ms": round(pct(new, 0.5), 4),
        "new_p99_ms": round(pct(new, 0.99), 4),
        "replay_p50_ms": round(pct(replay, 0.5), 4),
        "replay_p99_ms": round(pct(replay, 0.99), 4),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))))
