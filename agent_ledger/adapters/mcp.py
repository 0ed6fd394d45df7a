"""Model Context Protocol: run-once MCP tool calls, as a gateway in front of any MCP server or in a client.

Two ways in, one rule (the key is the workflow id + the tool name + the canonical arguments; a repeated
call replays the recorded result without reaching the server; concurrent identical calls reach it once):

- ``McpGateway`` (and ``serve_stdio``, behind ``agent-ledger mcp-proxy``): an MCP server that lists
  exactly the upstream server's tools and forwards each ``tools/call`` through the ledger. The workflow id
  comes from the request's ``_meta["agent-ledger/workflow-id"]``, else the gateway's ``workflow_id``;
  with neither, the call is refused with an MCP error (never a per-session random id: that would defeat
  run-once across reconnects).
- ``LedgerClientSession``: wraps an ``mcp.ClientSession`` so that its ``call_tool`` goes through the ledger.

Either way the upstream receives the effect's idempotency key in ``_meta["agent-ledger/idempotency-key"]``,
the same on every attempt of a call. An upstream tool error (``isError``) is recorded as a failure and
retried or replayed by the tool's ``on_error`` policy. The upstream dying mid-call leaves the effect
``unknown`` (it may have acted), like any crash, and the caller gets an error at once instead of a hang.

Requires the ``mcp`` extra: ``pip install 'agent-ledger[mcp]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import anyio
import mcp.types as types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from .._context import current_effect
from .._ledger import CallOptions, Ledger, current_workflow
from .._models import ToolCall
from ..errors import ApprovalPending, LedgerError, NoWorkflow, RecordedError

__all__ = [
    "IDEMPOTENCY_KEY_META",
    "WORKFLOW_ID_META",
    "LedgerClientSession",
    "McpGateway",
    "serve_stdio",
]

WORKFLOW_ID_META = "agent-ledger/workflow-id"
"""The ``_meta`` entry of a ``tools/call`` request naming the workflow the call belongs to."""
IDEMPOTENCY_KEY_META = "agent-ledger/idempotency-key"
"""The ``_meta`` entry carrying the effect's idempotency key to the upstream server."""

_MAX_WORKFLOW_ID = 255


class _UpstreamToolError(Exception):
    """The upstream answered the call with ``isError``: recorded as the call's failure.

    ``result`` is the upstream's own ``CallToolResult``; the message is its text content, which is what
    a replay (``on_error="replay"``) shows.
    """

    def __init__(self, tool: str, result: types.CallToolResult) -> None:
        super().__init__(_text(result) or f"upstream tool {tool!r} reported an error")
        self.tool = tool
        self.result = result


class _UpstreamLost(BaseException):
    """The upstream connection broke while the call was in flight: the outcome is unknown.

    A BaseException on purpose: the ledger records an interrupted handler as ``unknown`` (it may have
    acted) instead of as a failure that a later call would retry.
    """

    def __init__(self, tool: str, cause: BaseException) -> None:
        why = cause.message if isinstance(cause, MCPError) else (str(cause) or type(cause).__name__)
        super().__init__(f"the upstream MCP server went away during {tool!r}: {why}.")
        self.cause = cause


class _UpstreamDown(Exception):
    """The upstream connection was already gone before the call was sent: nothing was executed."""


def _text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


class _Forwarder:
    """Calls one upstream session through a ledger (shared by the gateway and the client wrapper)."""

    def __init__(
        self,
        ledger: Ledger,
        session: ClientSession,
        options: CallOptions | None,
        tool_options: Mapping[str, CallOptions] | None,
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise TypeError(f"ledger must be a Ledger, not {type(ledger).__name__}")
        self.ledger = ledger
        self.session = session
        self.options: CallOptions = dict(options or {})  # type: ignore[assignment]
        self.tool_options = {name: dict(o) for name, o in (tool_options or {}).items()}
        self.down = False
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {}

    def options_for(self, tool: str, extra: CallOptions | None = None) -> CallOptions:
        merged: dict[str, Any] = {**self.options, **self.tool_options.get(tool, {}), **(extra or {})}
        return cast(CallOptions, merged)

    def handler(self, tool: str) -> Callable[..., Awaitable[Any]]:
        """One handler per tool name: it takes the arguments as keywords and reads the running Effect."""
        found = self._handlers.get(tool)
        if found is None:
            # The ledger binds the arguments to the handler's signature: any names fit **arguments.
            found = self._handlers[tool] = functools.partial(self._forward, tool)
        return found

    async def _forward(self, tool: str, /, **arguments: Any) -> dict[str, Any]:
        effect = current_effect()
        if effect is None:  # pragma: no cover - only the ledger calls this
            raise RuntimeError("the MCP forwarder runs only inside a ledger call")
        if self.down:
            raise _UpstreamDown(f"the upstream MCP server is not running; {tool!r} was not sent")
        try:
            result = await self.session.call_tool(
                tool, arguments, meta=cast(Any, {IDEMPOTENCY_KEY_META: effect.idem_key})
            )
        except MCPError as e:
            if e.error.code == types.CONNECTION_CLOSED:
                self.down = True
                raise _UpstreamLost(tool, e) from e
            raise  # the upstream answered with a protocol error: it did not run the tool
        except _CLOSED as e:
            self.down = True
            raise _UpstreamLost(tool, e) from e
        if result.is_error:
            raise _UpstreamToolError(tool, result)
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)

    async def call(
        self, workflow_id: str, tool: str, arguments: Mapping[str, Any] | None, extra: CallOptions | None = None
    ) -> types.CallToolResult:
        """The upstream's result for this call, executed at most once per key (ledger errors propagate)."""
        call = ToolCall(workflow_id=workflow_id, tool=tool, args=dict(arguments or {}))
        try:
            data = await self.ledger.arun(call, self.handler(tool), **self.options_for(tool, extra))
        except _UpstreamToolError as e:
            return e.result
        except RecordedError as e:
            # A failure replayed by on_error="replay": answer as the upstream did, with its text.
            return _error(e.message)
        return types.CallToolResult.model_validate(data)


class McpGateway:
    """An MCP server in front of an upstream ``ClientSession`` that runs each tool call once.

    ``workflow_id`` is the default workflow for calls whose ``_meta`` names none. ``require_approval``
    lists tools that need a human decision first; ``approve_destructive`` adds every tool the upstream
    annotates with ``destructiveHint`` (annotations only ever add protection: ``readOnlyHint`` removes
    none). ``approvers`` limits who may decide. ``options`` apply to every tool and ``tool_options`` per
    tool name (any ``CallOptions``: ``on_error``, ``lease``, ``wait``, ``reconcile``, approvals,
    ``limits``...); a call over a declared limit answers with a tool error giving the budget.

    A pending approval answers with an MCP tool error naming the approval id; a rejected, unknown or
    otherwise refused call answers with a tool error that says why. A call without a workflow id, or to
    a tool the upstream does not list, is an MCP protocol error.
    """

    def __init__(
        self,
        ledger: Ledger,
        upstream: ClientSession,
        *,
        workflow_id: str | None = None,
        require_approval: Iterable[str] = (),
        approve_destructive: bool = False,
        approvers: Iterable[str] | None = None,
        options: CallOptions | None = None,
        tool_options: Mapping[str, CallOptions] | None = None,
    ) -> None:
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise ValueError("workflow_id must be a non-empty string or None")
        if isinstance(require_approval, str):
            raise TypeError("require_approval must be a list of tool names, not a string")
        self.workflow_id = workflow_id
        self.require_approval = frozenset(require_approval)
        self.approve_destructive = approve_destructive
        self.approvers = None if approvers is None else tuple(approvers)
        self._forwarder = _Forwarder(ledger, upstream, options, tool_options)
        self._tools: dict[str, types.Tool] | None = None

    async def tools(self) -> list[types.Tool]:
        """The upstream's tools (names, descriptions, input schemas), listed once and then kept."""
        if self._tools is None:
            found: dict[str, types.Tool] = {}
            cursor: str | None = None
            while True:
                params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
                page = await self._forwarder.session.list_tools(params=params)
                found.update((t.name, t) for t in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            self._tools = found
        return list(self._tools.values())

    def _needs_approval(self, tool: types.Tool) -> bool:
        if tool.name in self.require_approval:
            return True
        return bool(self.approve_destructive and tool.annotations and tool.annotations.destructive_hint)

    def _workflow(self, meta: Mapping[str, Any] | None) -> str:
        sent = (meta or {}).get(WORKFLOW_ID_META)
        if sent is not None:
            if not isinstance(sent, str) or not sent.strip() or len(sent) > _MAX_WORKFLOW_ID:
                raise MCPError(
                    types.INVALID_PARAMS,
                    f"_meta[{WORKFLOW_ID_META!r}] must be a non-empty string of at most {_MAX_WORKFLOW_ID} characters",
                )
            return sent
        if self.workflow_id is not None:
            return self.workflow_id
        raise MCPError(
            types.INVALID_PARAMS,
            f"no workflow id: send it in the request's _meta[{WORKFLOW_ID_META!r}] or start the gateway with "
            "--workflow ID (agent_ledger runs a call once per workflow, so it needs to know which one; it never "
            "invents a per-session id, which would run calls again after a reconnect)",
        )

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None, meta: Mapping[str, Any] | None = None
    ) -> types.CallToolResult:
        """Answer one ``tools/call``: the recorded or upstream result, or a tool error saying what to do."""
        workflow_id = self._workflow(meta)
        tools = {t.name: t for t in await self.tools()}
        tool = tools.get(name)
        if tool is None:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {name[:200]!r}: the upstream server does not list it")
        extra: CallOptions = {}
        if self._needs_approval(tool):
            extra["requires_approval"] = True
            if self.approvers is not None:
                extra["approvers"] = self.approvers
        try:
            return await self._forwarder.call(workflow_id, name, arguments, extra)
        except ApprovalPending as e:
            return _error(
                f"approval required: this call to {name!r} waits for a human decision on approval {e.approval_id}. "
                f"Ask an approver to decide it (e.g. `agent-ledger approvals approve {e.approval_id} --by NAME`), "
                "then retry this same call with the same arguments: it runs once approved."
            )
        except _UpstreamLost as e:
            return _error(
                f"{e} The outcome of this call is unknown (it may have run); it will not be repeated. "
                "Check the upstream system, then settle it with `agent-ledger resolve`."
            )
        except LedgerError as e:  # rejected, unknown outcome, still running elsewhere, payload mismatch...
            return _error(str(e))
        except _UpstreamDown as e:
            return _error(str(e))
        except MCPError as e:
            return _error(f"the upstream MCP server refused the call: {e.message}")

    def server(self, name: str = "agent-ledger-mcp-proxy") -> Server[Any]:
        """A low-level MCP ``Server`` answering ``tools/list`` and ``tools/call`` through this gateway."""

        async def on_list_tools(
            ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            return types.ListToolsResult(tools=await self.tools())

        async def on_call_tool(
            ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
        ) -> types.CallToolResult:
            return await self.call_tool(params.name, params.arguments, cast(Any, params.meta))

        return Server(name, on_list_tools=on_list_tools, on_call_tool=on_call_tool)


async def serve_stdio(
    ledger: Ledger,
    upstream: StdioServerParameters,
    **gateway_options: Any,
) -> None:
    """Start the upstream MCP server (stdio) and serve the gateway on this process's stdin/stdout.

    ``gateway_options`` are ``McpGateway``'s keyword arguments. Returns when the client disconnects.
    """
    async with stdio_client(upstream) as (up_read, up_write), ClientSession(up_read, up_write) as session:
        await session.initialize()
        gateway = McpGateway(ledger, session, **gateway_options)
        await gateway.tools()
        server = gateway.server()
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


class LedgerClientSession:
    """An ``mcp.ClientSession`` whose ``call_tool`` runs each call once per workflow through the ledger.

    The workflow is ``workflow_id``, else the enclosing ``ledger.workflow(...)``, else ``NoWorkflow`` is
    raised. The upstream's ``isError`` result is returned as the session would (and recorded as a failure,
    retried or replayed by ``on_error``); ledger outcomes (``ApprovalPending``, ``OutcomeUnknown``...)
    raise; the upstream dying mid-call raises the session's own error and leaves the effect ``unknown``.
    Every other attribute is the wrapped session's.
    """

    def __init__(
        self,
        ledger: Ledger,
        session: ClientSession,
        *,
        workflow_id: str | None = None,
        tool_options: Mapping[str, CallOptions] | None = None,
        **options: Any,
    ) -> None:
        self._forwarder = _Forwarder(ledger, session, cast(CallOptions, options), tool_options)
        self.workflow_id = workflow_id

    @property
    def session(self) -> ClientSession:
        """The wrapped session."""
        return self._forwarder.session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._forwarder.session, name)

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> types.CallToolResult:
        """``ClientSession.call_tool`` through the ledger (the key carries in ``_meta``, replays skip it)."""
        workflow_id = self.workflow_id or current_workflow()
        if workflow_id is None:
            raise NoWorkflow(name)
        try:
            return await self._forwarder.call(workflow_id, name, arguments)
        except _UpstreamLost as e:
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise RuntimeError(str(e)) from None
