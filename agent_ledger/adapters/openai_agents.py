"""OpenAI Agents SDK: function tools whose invocations run once per key.

Requires ``openai-agents`` (``pip install 'agent-ledger[openai-agents]'``); imported only when used.
Wrap the tools, then run the agent inside ``async with ledger.workflow(...)``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from .._ledger import current_workflow
from .._models import ToolCall
from ..errors import NoWorkflow
from . import _json_args

if TYPE_CHECKING:
    from agents import FunctionTool

    from .._ledger import Ledger

__all__ = ["wrap_function_tool"]


def wrap_function_tool(ledger: Ledger, tool: FunctionTool, **options: Any) -> FunctionTool:
    """A copy of a ``FunctionTool`` (e.g. from ``@function_tool``) that runs through the ledger."""
    original = tool.on_invoke_tool

    async def on_invoke_tool(ctx: Any, input: str) -> Any:
        workflow_id = current_workflow()
        if workflow_id is None:
            raise NoWorkflow(tool.name)
        args = _json_args(input, f"arguments of {tool.name}")

        async def handler(**kw: Any) -> Any:
            return await original(ctx, json.dumps(kw))

        call = ToolCall(workflow_id=workflow_id, tool=tool.name, args=args)
        return await ledger.arun(call, handler=handler, **options)

    return dataclasses.replace(tool, on_invoke_tool=on_invoke_tool)
