"""OpenAI Chat Completions: an agent loop that crashes after charging, resumes, and charges once.

Run: python examples/openai_chat.py

Offline: the "model" is scripted and returns the SDK's real ``ChatCompletion`` objects, so no network
and no API key are needed. To use a real model, replace ``scripted_model`` with
``client.chat.completions.create(model=..., messages=messages, tools=TOOLS_SCHEMA)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function

from agent_ledger import InvalidArguments, Ledger
from agent_ledger.adapters.openai import tool_message

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect


class SimulatedCrash(Exception):
    """Stands for the process dying (a deploy, an OOM kill) right after the charge went through."""


def charge(customer: str, amount: int) -> dict[str, Any]:
    """The side effect. In real life: a call to the payment provider."""
    charges.append(amount)
    return {"charge_id": f"ch_{len(charges)}", "customer": customer, "amount": amount}


TOOLS = {"charge": charge}


def scripted_model(run: int, messages: list[dict[str, Any]]) -> ChatCompletion:
    """Stands for ``client.chat.completions.create(...)``.

    Like a real model, it does not answer the same way twice: asked again after the crash, it wants to
    charge 250 instead of 100.
    """
    turn = sum(1 for m in messages if m["role"] == "assistant")
    print(f"  (the model is asked for turn {turn})")
    if turn == 0:
        amount = 100 if run == 1 else 250
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_run{run}",  # a fresh id on every request: never part of the key
                    "type": "function",
                    "function": {"name": "charge", "arguments": f'{{"customer": "cus_123", "amount": {amount}}}'},
                }
            ],
        }
    else:
        message = {"role": "assistant", "content": f"Done: {messages[-1]['content']}"}
    return ChatCompletion.model_validate(
        {
            "id": f"chatcmpl-{run}-{turn}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        }
    )


def agent(run: int, *, crash: bool) -> str | None:
    """One run of the agent. Each run opens its own ``Ledger``, as a restarted process would."""
    with Ledger(URL) as ledger, ledger.workflow("order-123"):
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Charge cus_123 for order 123."}]
        while True:
            # A recorded model turn: the first run stores the answer, a resumed run replays it.
            completion = ledger.step("llm", scripted_model, run, messages)
            message = completion.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                return message.content
            for call in message.tool_calls:
                assert isinstance(call, ChatCompletionMessageFunctionToolCall)
                print(f"  tool call {call.function.name} {call.function.arguments}")
                result: Any
                try:
                    # The SDK object goes straight in: arguments parsed, validated, keyed (not the id).
                    result = ledger.run(call, handler=TOOLS[call.function.name])
                except InvalidArguments as e:
                    result = f"error: {e}"  # nothing ran; tell the model what was wrong
                messages.append(tool_message(call, result))
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
        # A malformed call is refused before anything runs (and nothing is recorded).
        bad = ChatCompletionMessageFunctionToolCall(
            id="call_bad",
            type="function",
            function=Function(name="charge", arguments='{"customer": "cus_123", "amount": "a lot"}'),
        )
        with ledger.workflow("order-456"):
            try:
                ledger.run(bad, handler=charge)
            except InvalidArguments as e:
                print(f"malformed call refused: {e}")

    print(f"inspect it: agent-ledger history order-123 --url {URL}")
    print(f"charge ran {len(charges)} time(s)")
    if charges != [100]:
        print("FAIL: expected exactly one charge of 100")
        return 1
    print("OK: the charge ran once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
