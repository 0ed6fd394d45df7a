"""Adapters: tool calls in each SDK's own shape, turned into ``ToolCall``s and answered in that shape.

``parse_tool_call(obj)`` recognises, without importing any SDK:

- OpenAI Chat Completions ``message.tool_calls[i]`` (``type="function"``, JSON-string ``function.arguments``),
- OpenAI Responses API ``function_call`` output items (JSON-string ``arguments``),
- Anthropic ``tool_use`` content blocks (``input`` is already a dict),
- LangChain tool-call dicts (``{"name", "args", "id"}``),

and the same shapes as plain dicts. The SDK's per-attempt id (``tool_call.id``, ``call_id``) is kept
only to answer the model: it is never part of the key, because every retry gets a fresh one.

Per-SDK helpers that build what each SDK expects back live in ``agent_ledger.adapters.openai``,
``.anthropic``, ``.langchain`` and ``.openai_agents`` (the last two import their SDK lazily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArguments

__all__ = ["ParsedCall", "is_sdk_tool_call", "parse_tool_call", "result_text"]


@dataclass(frozen=True)
class ParsedCall:
    """A tool call lifted out of an SDK object."""

    name: str
    args: dict[str, Any]
    call_id: str | None
    """The SDK's per-attempt id, for the reply to the model only; never part of the key."""
    kind: str
    """``openai.chat``, ``openai.responses``, ``anthropic``, or ``langchain``."""


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _json_args(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    if not isinstance(raw, str):
        raise InvalidArguments(f"{where} must be a JSON string, not {type(raw).__name__}", path="args")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidArguments(
            f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {raw[:200]!r}", path="args"
        ) from e
    if not isinstance(value, dict):
        raise InvalidArguments(f"{where} must be a JSON object, not {type(value).__name__}: {raw[:200]!r}", path="args")
    return value


def _shape(obj: Any) -> str | None:
    """Which supported tool-call shape ``obj`` has (a ``ParsedCall.kind``), by its fields alone; or None."""
    kind = _get(obj, "type")
    function = _get(obj, "function")
    if function is not None and kind in ("function", None) and _get(function, "name"):
        return "openai.chat"
    if kind == "function_call" and _get(obj, "name"):
        return "openai.responses"
    if kind == "tool_use" and _get(obj, "name"):
        return "anthropic"
    if isinstance(obj, dict) and "name" in obj and "args" in obj and kind in ("tool_call", None):
        return "langchain"
    return None


def is_sdk_tool_call(obj: Any) -> bool:
    """Whether ``obj`` has one of the supported SDK tool-call shapes (its arguments are not parsed)."""
    return _shape(obj) is not None


def parse_tool_call(obj: Any) -> ParsedCall:
    """Lift name, arguments and the SDK's call id out of a supported tool-call object."""
    shape = _shape(obj)
    if shape == "openai.chat":
        function = _get(obj, "function")
        args = _json_args(_get(function, "arguments"), "OpenAI tool_call.function.arguments")
        return ParsedCall(str(_get(function, "name")), args, _get(obj, "id"), shape)
    if shape == "openai.responses":
        args = _json_args(_get(obj, "arguments"), "OpenAI function_call.arguments")
        return ParsedCall(str(_get(obj, "name")), args, _get(obj, "call_id"), shape)
    if shape == "anthropic":
        raw = _get(obj, "input")
        if raw is not None and not isinstance(raw, dict):
            raise InvalidArguments(f"Anthropic tool_use.input must be an object, not {type(raw).__name__}", path="args")
        return ParsedCall(str(_get(obj, "name")), dict(raw or {}), _get(obj, "id"), shape)
    if shape == "langchain":
        raw = obj["args"]
        if not isinstance(raw, dict):
            raise InvalidArguments(f"LangChain tool call args must be a dict, not {type(raw).__name__}", path="args")
        return ParsedCall(str(obj["name"]), dict(raw), obj.get("id"), shape)
    raise InvalidArguments(
        f"not a tool call: {type(obj).__qualname__} is neither a ToolCall nor an OpenAI, Anthropic or LangChain "
        f"tool call"
    )


def result_text(result: Any) -> str:
    """A tool result as the text most SDKs send back to the model (strings as is, the rest as JSON)."""
    if isinstance(result, str):
        return result
    import pydantic_core

    return json.dumps(pydantic_core.to_jsonable_python(result), ensure_ascii=False)
