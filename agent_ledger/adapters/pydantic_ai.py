"""Pydantic AI: every tool call of a toolset runs once per workflow through the ledger.

``wrap_toolset(ledger, toolset)`` returns a toolset to pass to ``Agent(toolsets=[...])``. Each call's key
is the workflow id + the tool name + the validated arguments (never Pydantic AI's per-attempt
``tool_call_id``), so an agent run again in the same workflow (after a crash, a retry, a restart) replays
the tools that already ran instead of running them twice.

The workflow is ``workflow_id`` when given, else the enclosing ``ledger.workflow(...)``. The ledger's
outcomes reach the model the framework's own way: a pending approval, a rejection, an unknown outcome, a
call still running elsewhere or a call over a declared limit (``limits=[Limit(...)]``: the model reads
the budget) become ``ToolFailed`` (a failed tool result the model sees, with the approval id and what to
do, without spending its retry budget); a call without a workflow raises ``NoWorkflow`` (a programming
error, not the model's).

Requires the ``pydantic-ai`` extra: ``pip install 'agent-ledger[pydantic-ai]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from pydantic_ai import RunContext
from pydantic_ai.exceptions import ToolFailed
from pydantic_ai.toolsets import AbstractToolset, WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool

from .._ledger import CallOptions, Ledger, current_workflow
from .._models import ToolCall
from ..errors import (
    ApprovalPending,
    ApprovalRejected,
    InProgress,
    LimitExceeded,
    NoWorkflow,
    OutcomeUnknown,
    PayloadMismatch,
)

__all__ = ["LedgerToolset", "wrap_toolset"]


@dataclass
class LedgerToolset(WrapperToolset[Any]):
    """A ``WrapperToolset`` whose ``call_tool`` goes through the ledger (build it with ``wrap_toolset``)."""

    ledger: Ledger = field(kw_only=True)
    workflow_id: str | None = field(default=None, kw_only=True)
    options: dict[str, Any] = field(default_factory=dict, kw_only=True)
    tool_options: dict[str, dict[str, Any]] = field(default_factory=dict, kw_only=True)

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> Any:
        """Run the wrapped tool once for this workflow, tool and arguments; replay it after that."""
        workflow_id = self.workflow_id or current_workflow()
        if workflow_id is None:
            raise NoWorkflow(name)
        wrapped = self.wrapped

        async def handler(**_: Any) -> Any:
            return await wrapped.call_tool(name, tool_args, ctx, tool)

        options = cast(CallOptions, {**self.options, **self.tool_options.get(name, {})})
        try:
            call = ToolCall(workflow_id=workflow_id, tool=name, args=tool_args)
            return await self.ledger.arun(call, handler, **options)
        except ApprovalPending as e:
            raise ToolFailed(
                f"This call needs a human approval first (approval {e.approval_id}, pending). Tell the user; "
                "once it is approved, call the tool again with exactly the same arguments and it will run once."
            ) from e
        except (ApprovalRejected, OutcomeUnknown, InProgress, PayloadMismatch, LimitExceeded) as e:
            raise ToolFailed(str(e)) from e


def wrap_toolset(
    ledger: Ledger,
    toolset: AbstractToolset[Any],
    *,
    workflow_id: str | None = None,
    tool_options: dict[str, CallOptions] | None = None,
    **options: Any,
) -> LedgerToolset:
    """A toolset that runs each of ``toolset``'s tool calls once per workflow through ``ledger``.

    ``options`` (any ``CallOptions``: ``on_error``, ``requires_approval``, ``approvers``, ``lease``,
    ``limits``...) apply to every tool, ``tool_options`` per tool name. ``workflow_id`` fixes the workflow; without it
    the enclosing ``ledger.workflow(...)`` decides, per call.
    """
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a Ledger, not {type(ledger).__name__}")
    if not isinstance(toolset, AbstractToolset):
        raise TypeError(f"toolset must be a pydantic_ai toolset, not {type(toolset).__name__}")
    if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
        raise ValueError("workflow_id must be a non-empty string or None")
    return LedgerToolset(
        toolset,
        ledger=ledger,
        workflow_id=workflow_id,
        options=dict(options),
        tool_options={k: dict(v) for k, v in (tool_options or {}).items()},
    )
