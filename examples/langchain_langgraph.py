"""LangChain + LangGraph: a ``@tool`` run by LangGraph's ``ToolNode`` charges once, across a crash.

Run: python examples/langchain_langgraph.py

Offline: the "model" node is scripted and returns LangChain's real ``AIMessage`` objects with
``tool_calls``, so no network and no API key are needed. To use a real model, replace
``scripted_model`` with ``chat_model.bind_tools([safe_charge]).invoke(messages)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agent_ledger import Ledger
from agent_ledger.adapters.langchain import wrap_tool

URL = f"sqlite:///{Path(tempfile.mkdtemp()) / 'ledger.db'}"
charges: list[int] = []  # every real execution of the side effect


class SimulatedCrash(Exception):
    """Stands for the process dying after the charge went through, before the model's next turn."""


@tool
def charge(customer: str, amount: int) -> str:
    """Charge the customer this amount, in cents."""
    charges.append(amount)
    return f"charged {customer} {amount} (ch_{len(charges)})"


def scripted_model(run: int, messages: list[AnyMessage]) -> AIMessage:
    """Stands for a chat model; asked again after the crash, it answers differently."""
    turn = sum(1 for m in messages if isinstance(m, AIMessage))
    print(f"  (the model is asked for turn {turn})")
    if turn == 0:
        amount = 100 if run == 1 else 250
        return AIMessage(
            content="",
            # A fresh id on every request: never part of the key.
            tool_calls=[{"name": "charge", "args": {"customer": "cus_123", "amount": amount}, "id": f"call_run{run}"}],
        )
    last = messages[-1]
    return AIMessage(content=f"Done: {last.content}")


def build_graph(ledger: Ledger, run: int, *, crash: bool) -> Any:
    safe_charge = wrap_tool(ledger, charge)  # same name, description and schema; runs once per key

    def agent(state: MessagesState) -> dict[str, list[AnyMessage]]:
        messages = state["messages"]
        if crash and any(isinstance(m, ToolMessage) for m in messages):
            raise SimulatedCrash
        # A recorded model turn: the first run stores the AIMessage, a resumed run replays it.
        reply = ledger.step("llm", scripted_model, run, messages)
        for call in reply.tool_calls:
            print(f"  tool call {call['name']} {call['args']}")
        return {"messages": [reply]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([safe_charge]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "agent")
    return graph.compile()


def agent_run(run: int, *, crash: bool) -> str:
    """One run of the agent. Each run opens its own ``Ledger``, as a restarted process would."""
    with Ledger(URL) as ledger:
        app = build_graph(ledger, run, crash=crash)
        with ledger.workflow("order-123"):  # the graph's tools and steps see this workflow id
            state = app.invoke({"messages": [HumanMessage("Charge cus_123 for order 123.")]})
        for m in state["messages"]:
            if isinstance(m, ToolMessage):
                print(f"  tool message {m.content!r} (tool_call_id={m.tool_call_id})")
        return str(state["messages"][-1].content)


def main() -> int:
    print("run 1")
    try:
        agent_run(1, crash=True)
    except SimulatedCrash:
        print("  ** crashed after the charge **")
    print("run 2 (resumed)")
    print(f"  final answer: {agent_run(2, crash=False)}")

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
