"""A real upstream MCP server for the gateway tests (the SDK's low-level server API, stdio).

Every execution of a tool appends one JSON line to the file named by ``UPSTREAM_LOG``: the tool, its
arguments and the ``_meta`` it received, so the tests count executions and read the idempotency key.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anyio
import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

TOOLS = [
    types.Tool(
        name="charge",
        description="Charge a card (a side effect).",
        input_schema={
            "type": "object",
            "properties": {"amount": {"type": "integer"}, "delay": {"type": "number"}},
            "required": ["amount"],
        },
    ),
    types.Tool(
        name="flaky",
        description="Fails with isError.",
        input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
    ),
    types.Tool(
        name="die",
        description="The server process dies mid-call.",
        input_schema={"type": "object", "properties": {}},
    ),
    types.Tool(
        name="wipe",
        description="Destructive.",
        input_schema={"type": "object", "properties": {"what": {"type": "string"}}},
        annotations=types.ToolAnnotations(destructive_hint=True),
    ),
    types.Tool(
        name="peek",
        description="Read-only (says the server).",
        input_schema={"type": "object", "properties": {}},
        annotations=types.ToolAnnotations(read_only_hint=True),
    ),
]


def _log(name: str, args: dict[str, Any], meta: Any) -> None:
    # Read when a tool runs, not at import: the docs plugin imports every module under tests/.
    with open(os.environ["UPSTREAM_LOG"], "a") as f:
        f.write(json.dumps({"tool": name, "args": args, "meta": dict(meta or {}), "pid": os.getpid()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    if params.name == "die":
        _log(params.name, args, params.meta)
        os._exit(3)
    if params.name == "charge" and args.get("delay"):
        await anyio.sleep(float(args["delay"]))
    _log(params.name, args, params.meta)
    if params.name == "flaky":
        return types.CallToolResult(content=[types.TextContent(text=f"flaky failed {args.get('n')}")], is_error=True)
    text = f"{params.name} done {json.dumps(args, sort_keys=True)} at {time.time_ns()}"
    return types.CallToolResult(content=[types.TextContent(text=text)], structured_content={"ok": True, "args": args})


server = Server("upstream", on_list_tools=list_tools, on_call_tool=call_tool)


async def main() -> None:
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
