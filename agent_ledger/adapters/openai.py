"""OpenAI: answer Chat Completions tool calls and Responses API function calls.

Pass the SDK object straight to ``ledger.run(tool_call, handler=...)`` inside ``ledger.workflow(...)``;
these helpers build the message the model expects back.
"""

from __future__ import annotations

from typing import Any

from . import parse_tool_call, result_text

__all__ = ["function_call_output", "tool_message"]


def tool_message(tool_call: Any, result: Any) -> dict[str, Any]:
    """The Chat Completions ``{"role": "tool", "tool_call_id", "content"}`` message for a result."""
    parsed = parse_tool_call(tool_call)
    return {"role": "tool", "tool_call_id": parsed.call_id, "content": result_text(result)}


def function_call_output(item: Any, result: Any) -> dict[str, Any]:
    """The Responses API ``function_call_output`` input item for a result."""
    parsed = parse_tool_call(item)
    return {"type": "function_call_output", "call_id": parsed.call_id, "output": result_text(result)}
