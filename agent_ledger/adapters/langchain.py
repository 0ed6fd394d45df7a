"""LangChain: run ``BaseTool`` / ``@tool`` objects through the ledger (also inside LangGraph's ``ToolNode``).

Requires ``langchain-core`` (``pip install 'agent-ledger[langchain]'``); imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._ledger import current_workflow
from .._models import ToolCall
from ..errors import NoWorkflow
from . import parse_tool_call, result_text

if TYPE_CHECKING:
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import BaseTool

    from .._ledger import Ledger

__all__ = ["tool_message", "wrap_tool"]


def wrap_tool(ledger: Ledger, tool: BaseTool, **options: Any) -> BaseTool:
    """A copy of ``tool`` whose every invocation runs once per (workflow, tool name, args) key.

    Invoke it inside ``ledger.workflow(...)``. Arguments are validated by the tool's own schema first;
    ``options`` are ``ledger.run`` options (``requires_approval=...``, ``key=...``, ...).
    """
    from langchain_core.tools import StructuredTool

    def _call(kwargs: dict[str, Any]) -> ToolCall:
        workflow_id = current_workflow()
        if workflow_id is None:
            raise NoWorkflow(tool.name)
        return ToolCall(workflow_id=workflow_id, tool=tool.name, args=kwargs)

    if tool.response_format == "content_and_artifact":
        # Invoked with plain arguments such a tool returns its content only: invoke it with a tool
        # call instead, record [content, artifact], and hand the pair back (replays rebuild the tuple).

        def run(**kwargs: Any) -> Any:
            def handler(**kw: Any) -> Any:
                return _content_and_artifact(tool.invoke(_tool_call(tool, kw)))

            return tuple(ledger.run(_call(kwargs), handler=handler, **options))

        async def arun(**kwargs: Any) -> Any:
            async def handler(**kw: Any) -> Any:
                return _content_and_artifact(await tool.ainvoke(_tool_call(tool, kw)))

            return tuple(await ledger.arun(_call(kwargs), handler=handler, **options))

    else:

        def run(**kwargs: Any) -> Any:
            return ledger.run(_call(kwargs), handler=lambda **kw: tool.invoke(kw), **options)

        async def arun(**kwargs: Any) -> Any:
            async def handler(**kw: Any) -> Any:
                return await tool.ainvoke(kw)

            return await ledger.arun(_call(kwargs), handler=handler, **options)

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
    )


def _tool_call(tool: BaseTool, args: dict[str, Any]) -> dict[str, Any]:
    """A tool-call dict for ``tool``: the input form that makes LangChain return the artifact too."""
    return {"type": "tool_call", "name": tool.name, "args": args, "id": "agent_ledger"}


def _content_and_artifact(message: Any) -> tuple[Any, Any]:
    return message.content, message.artifact


def tool_message(tool_call: Any, result: Any) -> ToolMessage:
    """The ``ToolMessage`` answering a LangChain tool-call dict."""
    from langchain_core.messages import ToolMessage

    parsed = parse_tool_call(tool_call)
    return ToolMessage(content=result_text(result), tool_call_id=parsed.call_id or "", name=parsed.name)
