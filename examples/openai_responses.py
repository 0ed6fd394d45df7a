"""OpenAI Responses API: function calls run once per key, even when the agent crashes and resumes.

Run: python examples/openai_responses.py

Offline: the "model" is scripted and returns the SDK's real ``Response`` objects (with
``ResponseFunctionToolCall`` output items), so no network and no API key are needed. To use a real
model, replace ``scripted_model`` with ``client.responses.create(model=..., input=items, tools=...)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from openai.types.responses import Response, ResponseFunctionToolCall

from agent_ledger import InvalidArguments, Ledger
from agent_ledger.adapters.openai import function_call_output

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect


class SimulatedCrash(Exception):
    """Stands for the process dying right after the charge went through."""


def charge(customer: str, amount: int) -> dict[str, Any]:
    """The side effect. In real life: a call to the payment provider."""
    charges.append(amount)
    return {"charge_id": f"ch_{len(charges)}", "customer": customer, "amount": amount}


TOOLS = {"charge": charge}


def scripted_model(run: int, items: list[Any]) -> Response:
    """Stands for ``client.responses.create(...)``; asked again after the crash, it answers differently."""
    turn = sum(1 for item in items if isinstance(item, dict) and item.get("type") == "function_call_output")
    print(f"  (the model is asked for turn {turn})")
    if turn == 0:
        amount = 100 if run == 1 else 250
        output: list[dict[str, Any]] = [
            {
                "type": "function_call",
                "id": f"fc_run{run}",
                "call_id": f"call_run{run}",  # a fresh id on every request: never part of the key
                "name": "charge",
                "arguments": f'{{"customer": "cus_123", "amount": {amount}}}',
                "status": "completed",
            }
        ]
    else:
        text = f"Done: {items[-1]['output']}"
        output = [
            {
                "type": "message",
                "id": f"msg_run{run}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    return Response.model_validate(
        {
            "id": f"resp_{run}_{turn}",
            "object": "response",
            "created_at": 1_700_000_000,
            "model": "scripted",
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
    )


def agent(run: int, *, crash: bool) -> str:
    """One run of the agent. Each run opens its own ``Ledger``, as a restarted process would."""
    with Ledger(URL) as ledger, ledger.workflow("order-123"):
        items: list[Any] = [{"role": "user", "content": "Charge cus_123 for order 123."}]
        while True:
            # A recorded model turn: the first run stores the Response, a resumed run replays it.
            response = ledger.step("llm", scripted_model, run, items)
            calls = [item for item in response.output if isinstance(item, ResponseFunctionToolCall)]
            if not calls:
                return response.output_text
            items.extend(response.output)
            for call in calls:
                print(f"  function_call {call.name} {call.arguments}")
                result: Any
                try:
                    result = ledger.run(call, handler=TOOLS[call.name])
                except InvalidArguments as e:
                    result = f"error: {e}"  # nothing ran; tell the model what was wrong
                items.append(function_call_output(call, result))
                print(f"  result {result}")
                if crash:
                    raise SimulatedCrash


def main() -> int:
    print("run 1")
    try:
        agent(1, crash=True)
    except SimulatedCrash:
        print("  ** crashed after the charge **")
    print("run 2 (resumed)")
    print(f"  final answer: {agent(2, crash=False)}")

    with Ledger(URL) as ledger:
        for rec in ledger.history("order-123"):
            print(f"  {rec.tool:<18} {rec.status.value:<10} args={rec.args} replays={rec.replays}")

    print(f"inspect it: agent-ledger history order-123 --url {URL}")
    print(f"charge ran {len(charges)} time(s)")
    if charges != [100]:
        print("FAIL: expected exactly one charge of 100")
        return 1
    print("OK: the charge ran once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
