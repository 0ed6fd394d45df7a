"""Anthropic Messages API: ``tool_use`` blocks run once per key, even when the agent crashes and resumes.

Run: python examples/anthropic_tool_use.py

Offline: the "model" is scripted and returns the SDK's real ``Message`` objects (with ``ToolUseBlock``
content), so no network and no API key are needed. To use a real model, replace ``scripted_model``
with ``client.messages.create(model=..., max_tokens=..., messages=messages, tools=...)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from anthropic.types import Message, TextBlock, ToolUseBlock

from agent_ledger import InvalidArguments, Ledger
from agent_ledger.adapters.anthropic import tool_result

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect


class SimulatedCrash(Exception):
    """Stands for the process dying right after the charge went through."""


def charge(customer: str, amount: int) -> dict[str, Any]:
    """The side effect. In real life: a call to the payment provider."""
    charges.append(amount)
    return {"charge_id": f"ch_{len(charges)}", "customer": customer, "amount": amount}


TOOLS = {"charge": charge}


def scripted_model(run: int, messages: list[dict[str, Any]]) -> Message:
    """Stands for ``client.messages.create(...)``; asked again after the crash, it answers differently."""
    turn = sum(1 for m in messages if m["role"] == "assistant")
    print(f"  (the model is asked for turn {turn})")
    if turn == 0:
        amount = 100 if run == 1 else 250
        content: list[dict[str, Any]] = [
            {"type": "text", "text": "I'll charge the customer."},
            {
                "type": "tool_use",
                "id": f"toolu_run{run}",  # a fresh id on every request: never part of the key
                "name": "charge",
                "input": {"customer": "cus_123", "amount": amount},
            },
        ]
        stop = "tool_use"
    else:
        content = [{"type": "text", "text": f"Done: {messages[-1]['content'][0]['content']}"}]
        stop = "end_turn"
    return Message.model_validate(
        {
            "id": f"msg_{run}_{turn}",
            "type": "message",
            "role": "assistant",
            "model": "scripted",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 10},
        }
    )


def agent(run: int, *, crash: bool) -> str:
    """One run of the agent. Each run opens its own ``Ledger``, as a restarted process would."""
    with Ledger(URL) as ledger, ledger.workflow("order-123"):
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Charge cus_123 for order 123."}]
        while True:
            # A recorded model turn: the first run stores the Message, a resumed run replays it.
            reply = ledger.step("llm", scripted_model, run, messages)
            messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
            uses = [b for b in reply.content if isinstance(b, ToolUseBlock)]
            if reply.stop_reason != "tool_use" or not uses:
                return "".join(b.text for b in reply.content if isinstance(b, TextBlock))
            results = []
            for block in uses:
                print(f"  tool_use {block.name} {block.input}")
                try:
                    result = ledger.run(block, handler=TOOLS[block.name])
                    results.append(tool_result(block, result))
                except InvalidArguments as e:
                    results.append(tool_result(block, str(e), is_error=True))  # nothing ran
                print(f"  result {results[-1]['content']}")
                if crash:
                    raise SimulatedCrash
            messages.append({"role": "user", "content": results})


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
