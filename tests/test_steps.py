"""Recorded model turns: a resumed agent replays the model's answers, so it makes the same tool calls."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
from collections.abc import Callable
from pathlib import Path

import _workers
import pytest
from _workers import read_lines

from agent_ledger import Ledger, NoWorkflow, StepDivergence

ctx = mp.get_context("spawn")


def run_agent(url: str, log: str, run_no: int, die: bool, record: bool) -> int | None:
    p = ctx.Process(target=_workers.chat_agent, args=(url, log, run_no, die, record))
    p.start()
    p.join(120)
    return p.exitcode


@pytest.mark.parametrize("record", [True, False], ids=["recorded-turns", "without-recording"])
def test_agent_crashes_mid_way_and_resumes_without_a_second_charge(
    db_url: str, ledger: Ledger, tmp_path: Path, record: bool
) -> None:
    ledger.migrate()
    log = str(tmp_path / "agent.log")
    assert run_agent(db_url, log, 1, die=True, record=record) == -signal.SIGKILL
    assert run_agent(db_url, log, 2, die=False, record=record) == 0
    charges = [line for line in read_lines(log) if line.startswith("charge")]
    if record:
        # The model was asked once for turn 0; its recorded answer replayed, so the charge replayed.
        assert charges == ["charge 100"]
        assert read_lines(log) == ["model run1 turn0", "charge 100", "model run2 turn1", "answer Done (run 2)."]
        steps = [r for r in ledger.history("chat-1") if r.tool == "agent_ledger.step"]
        assert [(r.args, r.replays) for r in steps] == [
            ({"position": 0, "name": "llm"}, 1),
            ({"position": 1, "name": "llm"}, 0),
        ]
    else:
        # The control: without recorded turns the resumed agent gets a different answer and charges again.
        assert charges == ["charge 100", "charge 250"]


def test_steps_replay_by_position_and_refuse_divergence(ledger: Ledger) -> None:
    calls: list[str] = []

    @ledger.step("plan")
    def plan(goal: str) -> dict[str, str]:
        calls.append(goal)
        return {"next": f"do {goal} #{len(calls)}"}

    with ledger.workflow("wf"):
        first = [plan("a"), plan("b")]
    with ledger.workflow("wf"):  # a re-run: positions 0 and 1 replay
        assert [plan("a"), plan("b")] == first
        assert plan("c") == {"next": "do c #3"}  # position 2 is new
    assert calls == ["a", "b", "c"]
    with ledger.workflow("wf"), pytest.raises(StepDivergence, match="position 0") as info:
        ledger.step("other", lambda: "x")
    assert info.value.position == 0 and info.value.name == "other"
    with pytest.raises(NoWorkflow):
        plan("a")


async def test_async_steps(ledger: Ledger) -> None:
    calls = 0

    async def ask(question: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return f"answer {calls}"

    for _ in range(2):
        async with ledger.workflow("wf"):
            assert await ledger.step("llm", ask, "q") == "answer 1"
    assert calls == 1
    await ledger.aclose()


def test_step_result_rebuilds_the_sdk_type(make_ledger: Callable[..., Ledger]) -> None:
    from openai.types.chat import ChatCompletion

    first, second = make_ledger(), make_ledger()
    asked = 0

    def ask() -> ChatCompletion:
        nonlocal asked
        asked += 1
        completion: ChatCompletion = _workers.scripted_completion(asked, 0)
        return completion

    with first.workflow("w"):
        live = first.step("llm", ask)
    with second.workflow("w"):
        replayed = second.step("llm", ask)
    assert asked == 1
    assert isinstance(replayed, ChatCompletion) and replayed == live


def test_unrebuildable_return_annotation_fails_on_the_first_run(ledger: Ledger) -> None:
    from typing import Union

    from agent_ledger import ConfigurationError

    class Stream:  # like an SDK's streaming response: not a JSON value
        pass

    def create() -> Union[dict, Stream]:  # noqa: UP007
        return {}

    with ledger.workflow("w"), pytest.raises(ConfigurationError, match="cannot rebuild replayed results"):
        ledger.step("llm", create)
