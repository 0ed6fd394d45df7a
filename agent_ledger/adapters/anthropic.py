"""Anthropic: answer ``tool_use`` content blocks with the matching ``tool_result`` block."""

from __future__ import annotations

from typing import Any

from . import parse_tool_call, result_text

__all__ = ["tool_result"]


def tool_result(block: Any, result: Any, *, is_error: bool = False) -> dict[str, Any]:
    """The ``{"type": "tool_result", "tool_use_id", "content"}`` block answering ``block``."""
    parsed = parse_tool_call(block)
    out: dict[str, Any] = {"type": "tool_result", "tool_use_id": parsed.call_id, "content": result_text(result)}
    if is_error:
        out["is_error"] = True
    return out
