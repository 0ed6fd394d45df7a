"""The MCP gateway and client wrapper with real stdio processes and the official ``mcp`` SDK.

The upstream is tests/_mcp_upstream.py (the SDK's server API) and logs every execution to a file; the
gateway is ``python -m agent_ledger mcp-proxy`` in its own process; the client is the SDK's
``ClientSession`` over stdio. Every test runs on SQLite and Postgres.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("mcp")

import mcp.types as types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from agent_ledger import Ledger, OutcomeUnknown, Status
from agent_ledger.adapters.mcp import (
    IDEMPOTENCY_KEY_META,
    WORKFLOW_ID_META,
    LedgerClientSession,
    McpGateway,
)

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = str(ROOT / "tests" / "_mcp_upstream.py")


def _env(log: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "UPSTREAM_LOG": str(log), "PATH": os.environ.get("PATH", "")}


def executions(log: Path, tool: str | None = None) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if tool is None or r["tool"] == tool]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "upstream.log"


@pytest.fixture
def migrated(make_ledger: Callable[..., Ledger], db_url: str) -> str:
    make_ledger().migrate()  # mcp-proxy, like every command but migrate, never creates tables
    return db_url


@asynccontextmanager
async def gateway(url: str, log: Path, *extra: str) -> AsyncIterator[ClientSession]:
    """A client session with a fresh gateway process (which starts its own upstream process)."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agent_ledger", "mcp-proxy", "--url", url, *extra, "--", sys.executable, UPSTREAM],
        env=_env(log),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        with anyio.fail_after(60):
            await session.initialize()
        yield session


async def call(
    session: ClientSession, tool: str, args: dict[str, Any], workflow: str | None = None
) -> types.CallToolResult:
    meta = {WORKFLOW_ID_META: workflow} if workflow is not None else None
    with anyio.fail_after(60):
        return await session.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]


def text(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def test_lists_exactly_the_upstream_tools(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf") as s:
        tools = (await s.list_tools()).tools
    assert [t.name for t in tools] == ["charge", "flaky", "die", "wipe", "peek"]
    charge = tools[0]
    assert charge.description == "Charge a card (a side effect)."
    assert charge.input_schema["required"] == ["amount"]
    assert tools[3].annotations is not None and tools[3].annotations.destructive_hint is True
    assert executions(log) == []


async def test_repeated_calls_run_once_and_the_key_reaches_upstream(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-1") as s:
        first = await call(s, "charge", {"amount": 5})
        again = await call(s, "charge", {"amount": 5})
        other = await call(s, "charge", {"amount": 6})
    assert not first.is_error and text(first).startswith("charge done")
    assert again.model_dump() == first.model_dump()  # replayed, the same timestamped text
    assert text(other) != text(first)
    runs = executions(log, "charge")
    assert [r["args"]["amount"] for r in runs] == [5, 6]
    keys = [r["meta"].get(IDEMPOTENCY_KEY_META) for r in runs]
    assert all(isinstance(k, str) and k for k in keys) and keys[0] != keys[1]
    with Ledger(migrated, auto_migrate=False) as led:
        effects = led.history("wf-1")
    assert sorted(e.status for e in effects) == [Status.SUCCEEDED, Status.SUCCEEDED]


async def test_concurrent_identical_calls_reach_upstream_once(migrated: str, log: Path) -> None:
    results: list[types.CallToolResult] = []

    async def one(s: ClientSession) -> None:
        results.append(await call(s, "charge", {"amount": 7, "delay": 1.0}, workflow="wf-c"))

    # Two clients, two gateway processes (two upstreams), plus two concurrent calls on one session.
    async with gateway(migrated, log) as a, gateway(migrated, log) as b, anyio.create_task_group() as tg:
        tg.start_soon(one, a)
        tg.start_soon(one, a)
        tg.start_soon(one, b)
        tg.start_soon(one, b)
    assert len(results) == 4 and all(not r.is_error for r in results), [text(r) for r in results]
    assert len({text(r) for r in results}) == 1
    assert len(executions(log, "charge")) == 1


async def test_gateway_restart_still_replays(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-r") as s:
        first = await call(s, "charge", {"amount": 9})
    async with gateway(migrated, log, "--workflow", "wf-r") as s:
        again = await call(s, "charge", {"amount": 9})
    assert text(again) == text(first)
    runs = executions(log, "charge")
    assert len(runs) == 1
    assert len({r["pid"] for r in runs}) == 1


async def test_meta_workflow_ids_isolate_and_win_over_the_default(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "default") as s:
        a = await call(s, "charge", {"amount": 1}, workflow="alice")
        b = await call(s, "charge", {"amount": 1}, workflow="bob")
        a2 = await call(s, "charge", {"amount": 1}, workflow="alice")
        d = await call(s, "charge", {"amount": 1})
    assert text(a) == text(a2) and text(a) != text(b) and text(d) not in (text(a), text(b))
    runs = executions(log, "charge")
    assert len(runs) == 3
    assert len({r["meta"][IDEMPOTENCY_KEY_META] for r in runs}) == 3
    with Ledger(migrated, auto_migrate=False) as led:
        assert [len(led.history(w)) for w in ("alice", "bob", "default")] == [1, 1, 1]


async def test_no_workflow_is_an_mcp_error_that_says_why(migrated: str, log: Path) -> None:
    async with gateway(migrated, log) as s:
        with pytest.raises(MCPError) as info:
            await call(s, "charge", {"amount": 1})
        assert "workflow" in info.value.message and WORKFLOW_ID_META in info.value.message
        for bad in ("", 5, "x" * 300):
            with pytest.raises(MCPError) as info:
                await call(s, "charge", {"amount": 1}, workflow=bad)  # type: ignore[arg-type]
            assert WORKFLOW_ID_META in info.value.message
        with pytest.raises(MCPError) as info:
            await call(s, "nope", {}, workflow="w")
        assert "unknown tool" in info.value.message
        ok = await call(s, "charge", {"amount": 1}, workflow="w")  # the gateway still serves
    assert not ok.is_error
    assert len(executions(log)) == 1


async def test_approval_end_to_end(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-a", "--require-approval", "charge", "--approvers", "ann") as s:
        pending = await call(s, "charge", {"amount": 500})
        assert pending.is_error
        with Ledger(migrated, auto_migrate=False) as led:
            (req,) = led.pending_approvals("wf-a")
        assert req.approval_id in text(pending) and "retry" in text(pending)
        assert executions(log) == []
        again = await call(s, "charge", {"amount": 500})  # still pending: same request, not run
        assert again.is_error and req.approval_id in text(again)
        assert executions(log) == []
        unlisted = await call(s, "peek", {})  # not listed: runs without approval
        assert not unlisted.is_error
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent_ledger",
                "approvals",
                "approve",
                req.approval_id,
                "--by=ann",
                f"--url={migrated}",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        done = await call(s, "charge", {"amount": 500})
        replay = await call(s, "charge", {"amount": 500})
    assert not done.is_error and text(done) == text(replay)
    assert len(executions(log, "charge")) == 1


async def test_destructive_hint_adds_approval_read_only_hint_removes_none(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-d", "--approve-destructive", "--require-approval", "peek") as s:
        wipe = await call(s, "wipe", {"what": "all"})
        peek = await call(s, "peek", {})  # annotated readOnlyHint, but listed: approval still required
        charge = await call(s, "charge", {"amount": 1})
    assert wipe.is_error and "approval" in text(wipe)
    assert peek.is_error and "approval" in text(peek)
    assert not charge.is_error
    assert [r["tool"] for r in executions(log)] == ["charge"]


async def test_upstream_is_error_is_recorded_and_retried_by_default(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-e") as s:
        first = await call(s, "flaky", {"n": 1})
        second = await call(s, "flaky", {"n": 1})
    assert first.is_error and text(first) == "flaky failed 1" and second.is_error
    assert len(executions(log, "flaky")) == 2  # on_error="retry" (the default): each call tries again
    with Ledger(migrated, auto_migrate=False) as led:
        (effect,) = led.history("wf-e")
    assert effect.status == Status.FAILED and effect.error is not None and "flaky failed 1" in effect.error.message


async def test_upstream_dying_mid_call_is_unknown_and_answers(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-x") as s:
        died = await call(s, "die", {})
        again = await call(s, "die", {})
        after = await call(s, "charge", {"amount": 1})
    assert died.is_error and "unknown" in text(died)
    assert again.is_error and "unknown" in text(again).lower()
    assert after.is_error and "not running" in text(after)
    assert len(executions(log, "die")) == 1
    with Ledger(migrated, auto_migrate=False) as led:
        statuses = {e.tool: e.status for e in led.history("wf-x")}
    assert statuses["die"] == Status.UNKNOWN
    assert statuses["charge"] == Status.FAILED  # never sent: a later call may run it


@asynccontextmanager
async def upstream(log: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=[UPSTREAM], env=_env(log))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        with anyio.fail_after(60):
            await session.initialize()
        yield session


async def test_client_session_wrapper_runs_once(make_ledger: Callable[..., Ledger], log: Path) -> None:
    led = make_ledger()
    async with upstream(log) as raw:
        s = LedgerClientSession(led, raw)
        async with led.workflow("wf-client"):
            one = await s.call_tool("charge", {"amount": 3})
            two = await s.call_tool("charge", {"amount": 3})
        three = await LedgerClientSession(led, raw, workflow_id="wf-other").call_tool("charge", {"amount": 3})
        # Argument names are the server's business: 'effect' (reserved by ledger handlers) passes through.
        odd = LedgerClientSession(led, raw, workflow_id="wf-odd")
        assert not (await odd.call_tool("peek", {"effect": 1, "a-b": 2})).is_error
        assert executions(log, "peek")[0]["args"] == {"effect": 1, "a-b": 2}
        assert (await s.list_tools()).tools  # other attributes are the session's
    assert text(one) == text(two) and text(three) != text(one)
    runs = executions(log, "charge")
    assert len(runs) == 2 and len({r["meta"][IDEMPOTENCY_KEY_META] for r in runs}) == 2
    # A new session, process and connection: still replayed.
    async with upstream(log) as raw, led.workflow("wf-client"):
        four = await LedgerClientSession(led, raw).call_tool("charge", {"amount": 3})
    assert text(four) == text(one) and len(executions(log, "charge")) == 2


async def test_client_session_wrapper_errors(make_ledger: Callable[..., Ledger], log: Path) -> None:
    from agent_ledger import ApprovalPending, NoWorkflow

    led = make_ledger()
    async with upstream(log) as raw:
        s = LedgerClientSession(led, raw, workflow_id="wf-ce", tool_options={"wipe": {"requires_approval": True}})
        with pytest.raises(NoWorkflow):
            await LedgerClientSession(led, raw).call_tool("charge", {"amount": 1})
        with pytest.raises(ApprovalPending):
            await s.call_tool("wipe", {"what": "x"})
        replayed = LedgerClientSession(led, raw, workflow_id="wf-ce", on_error="replay")
        f1 = await replayed.call_tool("flaky", {"n": 3})
        f2 = await replayed.call_tool("flaky", {"n": 3})
        assert f1.is_error and f2.is_error and text(f2) == "flaky failed 3"
        assert len(executions(log, "flaky")) == 1  # on_error="replay": the failure is replayed
        with pytest.raises(MCPError):
            await s.call_tool("die", {})
        with pytest.raises(OutcomeUnknown):
            await s.call_tool("die", {})
    statuses = {e.tool: e.status for e in led.history("wf-ce")}
    assert statuses["die"] == Status.UNKNOWN and statuses["flaky"] == Status.FAILED
    assert executions(log, "wipe") == []


async def test_gateway_in_process_rejects_bad_setup(make_ledger: Callable[..., Ledger], log: Path) -> None:
    led = make_ledger()
    async with upstream(log) as raw:
        with pytest.raises(ValueError):
            McpGateway(led, raw, workflow_id="")
        with pytest.raises(TypeError):
            McpGateway(led, raw, require_approval="charge")
        with pytest.raises(TypeError):
            McpGateway("sqlite://", raw)  # type: ignore[arg-type]


def test_mcp_proxy_usage_errors(sqlite_url: str, tmp_path: Path) -> None:
    with Ledger(sqlite_url) as led:
        led.migrate()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agent_ledger", "mcp-proxy"]
    missing = subprocess.run([*base, "--url", sqlite_url, "--"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "command after --" in missing.stderr
    nodb = f"sqlite:///{tmp_path / 'nope.db'}"
    r = subprocess.run([*base, "--url", nodb, "--", sys.executable, UPSTREAM], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no ledger database" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nope.db").exists()
    for upstream in (str(tmp_path / "no-such-server"), "false"):  # cannot start; exits before answering
        r = subprocess.run(
            [*base, "--url", sqlite_url, "--workflow", "w", "--", upstream],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        assert r.returncode == 1 and "upstream MCP server" in r.stderr and "Traceback" not in r.stderr, r.stderr


async def test_limits_pass_through_the_gateway_and_the_client_wrapper(
    make_ledger: Callable[..., Ledger], log: Path
) -> None:
    from agent_ledger import Limit, LimitExceeded

    led = make_ledger()
    async with upstream(log) as raw:
        gw = McpGateway(led, raw, workflow_id="wf-limit", tool_options={"charge": {"limits": [Limit(max=2)]}})
        answers = [await gw.call_tool("charge", {"amount": n}) for n in (1, 2, 1, 3)]
        assert [a.is_error for a in answers] == [False, False, False, True]  # the third is a replay
        assert "budget charge:calls/workflow/wf-limit used 2 of 2" in text(answers[3])
        s = LedgerClientSession(led, raw, workflow_id="wf-limit-2", limits=[Limit(max=1, name="one")])
        await s.call_tool("charge", {"amount": 5})
        with pytest.raises(LimitExceeded):
            await s.call_tool("charge", {"amount": 6})
    assert sorted(r["args"]["amount"] for r in executions(log, "charge")) == [1, 2, 5]


async def test_mcp_proxy_max_calls_is_a_loop_guard(migrated: str, log: Path) -> None:
    async with gateway(migrated, log, "--workflow", "wf-max", "--max-calls", "2") as s:
        results = [await call(s, "charge", {"amount": n}) for n in (1, 2, 2, 3)]
    assert [r.is_error for r in results] == [False, False, False, True]
    assert "budget mcp-proxy calls/wf-max used 2 of 2" in text(results[3])
    assert len(executions(log, "charge")) == 2
