"""The Pydantic AI adapter, offline (TestModel / FunctionModel), on SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.toolsets import FunctionToolset

from agent_ledger import Ledger, NoWorkflow, Status
from agent_ledger.adapters.pydantic_ai import wrap_toolset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _pai_agent import build  # noqa: E402


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_an_agent_run_twice_executes_once(ledger: Ledger, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with ledger.workflow("order-1"):
        first = build(ledger, str(log)).run_sync("go")
        second = build(ledger, str(log)).run_sync("go")
    assert first.output == second.output == "charged 42 / emailed ann@example.com"
    assert lines(log) == ["charge 42", "email ann@example.com"]
    with ledger.workflow("order-2"):  # another workflow: runs again
        build(ledger, str(log)).run_sync("go")
    assert len(lines(log)) == 4
    assert [e.tool for e in ledger.history("order-1")] == ["charge", "email"]


def test_test_model_calls_every_tool_once_per_workflow(ledger: Ledger) -> None:
    runs: list[str] = []
    tools = FunctionToolset[None]()

    @tools.tool_plain
    def side_effect(n: int, label: str) -> str:
        runs.append(label)
        return f"did {n} {label}"

    agent = Agent(TestModel(), toolsets=[wrap_toolset(ledger, tools, workflow_id="fixed")])
    a = agent.run_sync("x")
    b = agent.run_sync("x")
    assert a.output == b.output
    assert len(runs) == 1
    (effect,) = ledger.history("fixed")
    assert effect.status == Status.SUCCEEDED and effect.tool == "side_effect"


def test_a_crash_between_two_tool_calls_resumes_without_repeating_the_first(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with Ledger(db_url) as led:
        led.migrate()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "_pai_agent.py")
    crashed = subprocess.run([sys.executable, script, db_url, str(log), "wf-crash", "crash"], env=env, timeout=120)
    assert crashed.returncode == 7
    assert lines(log) == ["charge 42"]
    resumed = subprocess.run(
        [sys.executable, script, db_url, str(log), "wf-crash"], env=env, timeout=120, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "charged 42 / emailed ann@example.com"
    assert lines(log) == ["charge 42", "email ann@example.com"]


def test_approval_pending_reaches_the_model_as_a_tool_failure(ledger: Ledger) -> None:
    runs: list[int] = []
    seen: list[str] = []
    tools = FunctionToolset[None]()

    @tools.tool_plain
    def refund(amount: int) -> str:
        runs.append(amount)
        return f"refunded {amount}"

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        parts = [p for m in messages for p in getattr(m, "parts", [])]
        answers = [p for p in parts if isinstance(p, ToolReturnPart) or type(p).__name__ == "RetryPromptPart"]
        if not answers:
            return ModelResponse(parts=[ToolCallPart("refund", {"amount": 900})])
        seen.append(str(answers[-1].content))
        return ModelResponse(parts=[TextPart("told the user")])

    agent = Agent(FunctionModel(script), toolsets=[wrap_toolset(ledger, tools, requires_approval=True)])
    with ledger.workflow("wf-approve"):
        assert agent.run_sync("refund").output == "told the user"
        (req,) = ledger.pending_approvals("wf-approve")
        assert req.approval_id in seen[0] and "approv" in seen[0]
        assert runs == []
        ledger.approve(req.approval_id, by="ann")
        seen.clear()
        agent.run_sync("refund")
        assert seen == ["refunded 900"]
        agent.run_sync("refund")
    assert runs == [900]


def test_without_a_workflow_it_refuses(ledger: Ledger) -> None:
    tools = FunctionToolset[None]()

    @tools.tool_plain
    def t() -> str:
        raise AssertionError("must not run")

    with pytest.raises(NoWorkflow):
        Agent(TestModel(), toolsets=[wrap_toolset(ledger, tools)]).run_sync("x")
    with pytest.raises(TypeError):
        wrap_toolset(ledger, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wrap_toolset(ledger, tools, workflow_id="")


def test_async_run(ledger: Ledger, tmp_path: Path) -> None:
    import asyncio

    log = tmp_path / "log"

    async def go() -> str:
        async with ledger.workflow("wf-async"):
            out = (await build(ledger, str(log)).run("go")).output
            again = (await build(ledger, str(log)).run("go")).output
        assert out == again
        return out

    assert asyncio.run(go()) == "charged 42 / emailed ann@example.com"
    assert lines(log) == ["charge 42", "email ann@example.com"]


@pytest.mark.parametrize("where", ["options", "tool_options"])
def test_limits_reach_the_model_as_a_tool_failure(ledger: Ledger, where: str) -> None:
    from agent_ledger import Limit

    runs: list[int] = []
    seen: list[str] = []
    tools = FunctionToolset[None]()

    @tools.tool_plain
    def refund(amount: int) -> str:
        runs.append(amount)
        return f"refunded {amount}"

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        parts = [p for m in messages for p in getattr(m, "parts", [])]
        answers = [p for p in parts if isinstance(p, ToolReturnPart) or type(p).__name__ == "RetryPromptPart"]
        if len(answers) < 3:
            return ModelResponse(parts=[ToolCallPart("refund", {"amount": 100 * (len(answers) + 1)})])
        seen.extend(str(a.content) for a in answers)
        return ModelResponse(parts=[TextPart("done")])

    limit = [Limit(max=300, count="amount", name="refunds")]
    wrapped = (
        wrap_toolset(ledger, tools, limits=limit)
        if where == "options"
        else wrap_toolset(ledger, tools, tool_options={"refund": {"limits": limit}})
    )
    with ledger.workflow("wf-limits"):
        assert Agent(FunctionModel(script), toolsets=[wrapped]).run_sync("refund").output == "done"
    assert runs == [100, 200]
    assert seen[:2] == ["refunded 100", "refunded 200"]
    assert "budget refunds/wf-limits used 300 of 300; this call needs 300" in seen[2]
