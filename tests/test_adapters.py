"""SDK tool calls (built offline from the SDKs' real types) run through the ledger once per key."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from anthropic.types import ToolUseBlock
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.responses import ResponseFunctionToolCall

from agent_ledger import InvalidArguments, Ledger, NoWorkflow, compute_key
from agent_ledger.adapters import parse_tool_call
from agent_ledger.adapters.anthropic import tool_result
from agent_ledger.adapters.openai import function_call_output, tool_message


def chat_call(args: str, call_id: str) -> ChatCompletionMessageFunctionToolCall:
    return ChatCompletionMessageFunctionToolCall(
        id=call_id, type="function", function=Function(name="charge", arguments=args)
    )


SHAPES: dict[str, Callable[[int], Any]] = {
    "openai.chat": lambda n: chat_call('{"amount": 100, "currency": "usd"}', f"call_{n}"),
    "openai.responses": lambda n: ResponseFunctionToolCall(
        type="function_call",
        call_id=f"call_{n}",
        id=f"fc_{n}",
        name="charge",
        arguments='{"currency":"usd","amount":100}',
    ),
    "anthropic": lambda n: ToolUseBlock(
        type="tool_use", id=f"toolu_{n}", name="charge", input={"amount": 100, "currency": "usd"}
    ),
    "langchain": lambda n: {
        "name": "charge",
        "args": {"amount": 100, "currency": "usd"},
        "id": f"lc_{n}",
        "type": "tool_call",
    },
    "openai.chat as dict": lambda n: {
        "id": f"call_{n}",
        "type": "function",
        "function": {"name": "charge", "arguments": '{"amount":100,"currency":"usd"}'},
    },
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_sdk_shape_runs_once_whatever_its_per_attempt_id(ledger: Ledger, shape: str) -> None:
    runs: list[tuple[int, str]] = []

    def charge(amount: int, currency: str) -> dict[str, Any]:
        runs.append((amount, currency))
        return {"charged": amount}

    with ledger.workflow("order-123"):
        # Each retry of the model produces a fresh tool-call id: the key ignores it.
        results = [ledger.run(SHAPES[shape](attempt), handler=charge) for attempt in range(4)]
    assert results == [{"charged": 100}] * 4
    assert runs == [(100, "usd")]
    (rec,) = ledger.history("order-123")
    assert rec.tool == "charge"
    assert rec.key == compute_key("order-123", "charge", {"amount": 100, "currency": "usd"})


def test_all_shapes_share_one_key(ledger: Ledger) -> None:
    runs = 0

    def charge(amount: int, currency: str) -> str:
        nonlocal runs
        runs += 1
        return "ok"

    with ledger.workflow("w"):
        for make in SHAPES.values():
            assert ledger.run(make(1), handler=charge) == "ok"
    assert runs == 1


async def test_async_handler_with_sdk_call(ledger: Ledger) -> None:
    runs = 0

    async def charge(amount: int, currency: str) -> str:
        nonlocal runs
        runs += 1
        return "ok"

    async with ledger.workflow("w"):
        for n in range(3):
            assert await ledger.run(SHAPES["anthropic"](n), handler=charge) == "ok"
    assert runs == 1
    await ledger.aclose()


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (chat_call('{"amount": 100,', "c1"), "not valid JSON"),
        (chat_call("[1, 2]", "c1"), "must be a JSON object"),
        (chat_call('{"amount": "lots", "currency": "usd"}', "c1"), "args.amount: Input should be a valid integer"),
        (chat_call('{"amount": 5}', "c1"), "args.currency: Field required"),
        (chat_call('{"amount": 5, "currency": "usd", "tip": 1}', "c1"), "args.tip: Extra inputs are not permitted"),
        ({"type": "tool_use", "id": "t", "name": "charge", "input": [1]}, "must be an object"),
        (object(), "not a tool call"),
    ],
)
def test_malformed_arguments_never_run_the_handler(ledger: Ledger, call: Any, words: str) -> None:
    def charge(amount: int, currency: str) -> str:
        pytest.fail("must not run")

    with ledger.workflow("bad"), pytest.raises(InvalidArguments, match=words):
        ledger.run(call, handler=charge)
    assert ledger.history("bad") == []


def test_model_arguments_are_coerced_before_keying(ledger: Ledger) -> None:
    seen: list[Any] = []

    def charge(amount: int, currency: str) -> int:
        seen.append(amount)
        return amount

    with ledger.workflow("w"):
        assert ledger.run(chat_call('{"amount": "100", "currency": "usd"}', "a"), handler=charge) == 100
        assert ledger.run(chat_call('{"amount": 100, "currency": "usd"}', "b"), handler=charge) == 100
    assert seen == [100]


def test_sdk_call_needs_a_workflow(ledger: Ledger) -> None:
    with pytest.raises(NoWorkflow, match="charge"):
        ledger.run(SHAPES["anthropic"](1), handler=lambda amount, currency: 1)


def test_answers_in_each_sdks_shape() -> None:
    assert tool_message(SHAPES["openai.chat"](7), {"charged": 100}) == {
        "role": "tool",
        "tool_call_id": "call_7",
        "content": '{"charged": 100}',
    }
    assert function_call_output(SHAPES["openai.responses"](7), "done") == {
        "type": "function_call_output",
        "call_id": "call_7",
        "output": "done",
    }
    block = tool_result(SHAPES["anthropic"](7), {"charged": 100})
    assert block == {"type": "tool_result", "tool_use_id": "toolu_7", "content": '{"charged": 100}'}
    from anthropic.types import ToolResultBlockParam  # the SDK accepts it as a content block

    assert set(block) <= set(ToolResultBlockParam.__annotations__)
    assert parse_tool_call(SHAPES["langchain"](7)).call_id == "lc_7"


def test_langchain_tool_wrapped_runs_once_even_in_toolnode(ledger: Ledger) -> None:
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    from agent_ledger.adapters.langchain import tool_message as lc_tool_message
    from agent_ledger.adapters.langchain import wrap_tool

    runs: list[int] = []

    @tool
    def charge(amount: int, currency: str) -> str:
        """Charge the customer."""
        runs.append(amount)
        return f"charged {amount} {currency}"

    safe = wrap_tool(ledger, charge)
    assert safe.name == "charge" and safe.description == "Charge the customer."
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode([safe]))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()
    with ledger.workflow("lc"):
        assert safe.invoke({"amount": 5, "currency": "usd"}) == "charged 5 usd"
        for n in range(3):
            msg = AIMessage(
                content="", tool_calls=[{"name": "charge", "args": {"amount": 7, "currency": "eur"}, "id": f"c{n}"}]
            )
            reply = app.invoke({"messages": [msg]})["messages"][-1]
            assert reply.content == "charged 7 eur" and reply.tool_call_id == f"c{n}"
    assert runs == [5, 7]
    with pytest.raises(NoWorkflow):
        safe.invoke({"amount": 5, "currency": "usd"})
    answer = lc_tool_message({"name": "charge", "args": {}, "id": "c9"}, {"ok": True})
    assert answer.tool_call_id == "c9" and json.loads(str(answer.content)) == {"ok": True}


async def test_openai_agents_function_tool_runs_once(ledger: Ledger) -> None:
    from agents import function_tool
    from agents.tool_context import ToolContext

    from agent_ledger.adapters.openai_agents import wrap_function_tool

    runs: list[int] = []

    @function_tool
    def charge(amount: int, currency: str) -> str:
        """Charge the customer."""
        runs.append(amount)
        return f"charged {amount}"

    safe = wrap_function_tool(ledger, charge)
    async with ledger.workflow("agents"):
        for n in range(3):
            ctx = ToolContext(context=None, tool_name="charge", tool_call_id=f"call_{n}", tool_arguments="{}")
            assert await safe.on_invoke_tool(ctx, '{"amount": 3, "currency": "usd"}') == "charged 3"
    assert runs == [3]
    await ledger.aclose()


def test_is_sdk_tool_call_decides_by_shape() -> None:
    """A supported shape is a tool call even when its arguments are malformed (parse_tool_call then says
    why); anything else is not. The arguments are not parsed to decide."""
    from agent_ledger.adapters import is_sdk_tool_call

    for make in SHAPES.values():
        call = make(1)
        assert is_sdk_tool_call(call) and parse_tool_call(call).name == "charge"
    malformed = [
        chat_call('{"amount": 100,', "c1"),
        {"type": "tool_use", "id": "t", "name": "charge", "input": [1]},
        {"name": "charge", "args": "not a dict"},
    ]
    for call in malformed:
        assert is_sdk_tool_call(call)
        with pytest.raises(InvalidArguments):
            parse_tool_call(call)
    for other in (object(), {"name": "charge"}, {"type": "text", "text": "hi"}, "charge", None):
        assert not is_sdk_tool_call(other)
        with pytest.raises(InvalidArguments, match="not a tool call"):
            parse_tool_call(other)
    assert [parse_tool_call(SHAPES[s](1)).kind for s in ("openai.chat", "openai.responses", "anthropic")] == [
        "openai.chat",
        "openai.responses",
        "anthropic",
    ]
