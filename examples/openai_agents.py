"""OpenAI Agents SDK: a ``@function_tool`` wrapped by the ledger charges once, across a crash.

Run: python examples/openai_agents.py

Offline: no model is called. Part 1 drives the wrapped tool by hand, the way the SDK's runner does
(``on_invoke_tool`` with a ``ToolContext``). Part 2 runs the same tool inside ``Runner.run`` with a
scripted ``Model`` returning the SDK's real ``ResponseFunctionToolCall`` items. No API key needed.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from agents import Agent, RunConfig, Runner, function_tool
from agents.items import ModelResponse, TResponseOutputItem
from agents.models.interface import Model
from agents.tool_context import ToolContext
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from agent_ledger import Ledger
from agent_ledger.adapters.openai_agents import wrap_function_tool

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect


class SimulatedCrash(Exception):
    """Stands for the process dying after the charge went through."""


@function_tool
def charge(customer: str, amount: int) -> str:
    """Charge the customer this amount, in cents."""
    charges.append(amount)
    return f"charged {customer} {amount} (ch_{len(charges)})"


def scripted_output(run: int, turn: int) -> list[TResponseOutputItem]:
    """What the model says at this turn; asked again after the crash, it answers differently."""
    print(f"  (the model is asked for turn {turn})")
    if turn == 0:
        amount = 100 if run == 1 else 250
        return [
            ResponseFunctionToolCall(
                type="function_call",
                id=f"fc_run{run}",
                call_id=f"call_run{run}",  # a fresh id on every request: never part of the key
                name="charge",
                arguments=f'{{"customer": "cus_123", "amount": {amount}}}',
            )
        ]
    text = ResponseOutputText(type="output_text", text="Done.", annotations=[])
    return [
        ResponseOutputMessage(type="message", id=f"msg_run{run}", role="assistant", status="completed", content=[text])
    ]


# -- Part 1: the agent loop by hand -------------------------------------------------------------


async def ask_model(run: int, turn: int) -> list[TResponseOutputItem]:
    """Stands for an async model request (e.g. ``await client.responses.create(...)``)."""
    return scripted_output(run, turn)


async def by_hand(run: int, *, crash: bool) -> str:
    """One run of the agent. Each run opens its own ``Ledger``, as a restarted process would."""
    async with Ledger(URL) as ledger, ledger.workflow("order-123"):
        safe_charge = wrap_function_tool(ledger, charge)
        for turn in range(10):
            # A recorded model turn: the first run stores the output items, a resumed run replays them.
            output = await ledger.step("llm", ask_model, run, turn)
            calls = [item for item in output if isinstance(item, ResponseFunctionToolCall)]
            if not calls:
                return "".join(
                    c.text
                    for m in output
                    if isinstance(m, ResponseOutputMessage)
                    for c in m.content
                    if isinstance(c, ResponseOutputText)
                )
            for call in calls:
                print(f"  function_call {call.name} {call.arguments}")
                ctx = ToolContext(
                    context=None, tool_name=call.name, tool_call_id=call.call_id, tool_arguments=call.arguments
                )
                result = await safe_charge.on_invoke_tool(ctx, call.arguments)
                print(f"  result {result!r}")
                if crash:
                    raise SimulatedCrash
        raise RuntimeError("too many turns")


# -- Part 2: the same tool inside Runner.run ----------------------------------------------------


class ScriptedModel(Model):
    """A ``Model`` that answers from a script instead of calling an API."""

    def __init__(self, run: int, crash: bool) -> None:
        self.run, self.crash = run, crash

    async def get_response(
        self, system_instructions: str | None, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        # Like a real model, it answers from the conversation it is given.
        items = input if isinstance(input, list) else []
        turn = sum(1 for item in items if isinstance(item, dict) and item.get("type") == "function_call_output")
        if self.crash and turn > 0:
            raise SimulatedCrash  # the process dies while waiting for the model's next turn
        return ModelResponse(output=scripted_output(self.run, turn), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class RecordedModel(Model):
    """Wraps any ``Model``: each response is a recorded step, replayed when the run is resumed."""

    def __init__(self, ledger: Ledger, inner: Model) -> None:
        self.ledger, self.inner = ledger, inner

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        async def ask() -> list[TResponseOutputItem]:
            return (await self.inner.get_response(*args, **kwargs)).output

        output = await self.ledger.step("llm", ask)
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


async def with_runner(run: int, *, crash: bool) -> str:
    async with Ledger(URL) as ledger:
        agent = Agent(
            name="billing",
            tools=[wrap_function_tool(ledger, charge)],
            model=RecordedModel(ledger, ScriptedModel(run, crash)),
        )
        async with ledger.workflow("order-456"):  # tools and steps run by the Runner see this workflow
            result = await Runner.run(
                agent, "Charge cus_123 for order 456.", run_config=RunConfig(tracing_disabled=True)
            )
        return str(result.final_output)


async def scenario(name: str, agent_run: Any, workflow_id: str) -> int:
    charges.clear()
    print(f"== {name}")
    print("run 1")
    try:
        await agent_run(1, crash=True)
    except SimulatedCrash:
        print("  ** crashed after the charge **")
    print("run 2 (resumed)")
    print(f"  final answer: {await agent_run(2, crash=False)}")
    async with Ledger(URL) as ledger:
        for rec in ledger.history(workflow_id):
            print(f"  {rec.tool:<18} {rec.status.value:<10} args={rec.args} replays={rec.replays}")
    print(f"{name}: charge ran {len(charges)} time(s)")
    return len(charges)


async def main() -> int:
    counts = [
        await scenario("by hand", by_hand, "order-123"),
        await scenario("Runner.run", with_runner, "order-456"),
    ]
    print(f"inspect it: agent-ledger history order-456 --url {URL}")
    if counts != [1, 1]:
        print("FAIL: expected exactly one charge per workflow")
        return 1
    print("OK: the charge ran once")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
