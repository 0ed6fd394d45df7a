"""A Pydantic AI agent for tests/test_pydantic_ai.py: two tools, a scripted FunctionModel, a ledger.

``python tests/_pai_agent.py URL LOG WORKFLOW [crash]``: with ``crash`` the process dies (os._exit)
after the first tool call returned and before the model asks for the second.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.toolsets import FunctionToolset

from agent_ledger import Ledger
from agent_ledger.adapters.pydantic_ai import wrap_toolset


def build(ledger: Ledger, log: str, crash: bool = False) -> Agent[None, str]:
    tools = FunctionToolset[None]()

    @tools.tool_plain
    def charge(amount: int) -> str:
        """Charge the customer."""
        with open(log, "a") as f:
            f.write(f"charge {amount}\n")
        return f"charged {amount}"

    @tools.tool_plain
    def email(to: str) -> str:
        """Send a receipt."""
        with open(log, "a") as f:
            f.write(f"email {to}\n")
        return f"emailed {to}"

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returned = [p for m in messages for p in getattr(m, "parts", []) if isinstance(p, ToolReturnPart)]
        if not returned:
            return ModelResponse(parts=[ToolCallPart("charge", {"amount": 42})])
        if len(returned) == 1:
            if crash:
                os._exit(7)  # the process dies between the two tool calls
            return ModelResponse(parts=[ToolCallPart("email", {"to": "ann@example.com"})])
        return ModelResponse(parts=[TextPart(" / ".join(str(p.content) for p in returned))])

    return Agent(FunctionModel(script), toolsets=[wrap_toolset(ledger, tools)])


def main(url: str, log: str, workflow: str, crash: bool) -> Any:
    with Ledger(url) as ledger, ledger.workflow(workflow):
        result = build(ledger, log, crash).run_sync("charge 42 and email ann")
        print(result.output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "crash")
