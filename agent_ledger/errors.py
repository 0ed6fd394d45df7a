"""The errors agent_ledger raises on purpose, in one hierarchy.

::

    LedgerError
    ├── ConfigurationError     a ledger, tool or call was set up wrongly (bad option, unknown URL)
    ├── InvalidArguments       args that cannot be canonicalised, are too large or do not fit the handler
    ├── NoWorkflow             a decorated tool was called with no ``ledger.workflow(...)`` in context
    ├── PayloadMismatch        the key is taken by a call with a different payload
    ├── ResultNotReplayable    the key succeeded but its result could not be stored or rebuilt
    ├── RecordedError          the key failed before and its policy replays the failure
    ├── StepDivergence         a re-run called a different recorded step at the same position
    ├── InProgress             another worker holds the key and did not finish within ``wait``
    ├── OutcomeUnknown         a worker died mid-call: the side effect may or may not have happened
    ├── ApprovalPending        the call waits for a human decision (``approval_id``)
    ├── ApprovalRejected       a human rejected exactly this call
    ├── ApprovalMismatch       the arguments changed after they were approved
    ├── ApprovalRefused        a decision that cannot be taken (late, expired, superseded, twice, own, unlisted)
    ├── IllegalTransition      a state change the effect state machine does not allow
    ├── LimitExceeded          a declared ``Limit``'s budget cannot pay for this call; nothing ran
    ├── ChannelError           an approval channel could not announce a request or a decision
    │   ├── SlackError         Slack's Web API answered ``ok: false`` (or not at all)
    │   └── WebhookDeliveryError  every delivery attempt of a webhook failed
    └── StorageError           the database failed or is unreachable
        └── SchemaMissing      the ledger's tables are missing or out of date

``ConfigurationError`` and ``InvalidArguments`` are ``ValueError``s too. Every error carries the effect
``key`` when there is one, and its message says what is wrong and, where the caller can do something
about it, what to do.

Not in the tree: what your own code raises (a handler's exception reaches the caller as it is, and is
recorded), and the errors of database drivers, which arrive wrapped in ``StorageError``. A channel
error never reaches the caller of ``run()``: the ledger audits it as ``notification_failed`` and the
request can still be decided; it is raised to whoever calls a channel's hooks directly.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from ._hide import hide

__all__ = [
    "ApprovalMismatch",
    "ApprovalPending",
    "ApprovalRefused",
    "ApprovalRejected",
    "ChannelError",
    "ConfigurationError",
    "IllegalTransition",
    "InProgress",
    "InvalidArguments",
    "LedgerError",
    "LimitExceeded",
    "NoWorkflow",
    "OutcomeUnknown",
    "PayloadMismatch",
    "RecordedError",
    "ResultNotReplayable",
    "SchemaMissing",
    "SlackError",
    "StepDivergence",
    "StorageError",
    "WebhookDeliveryError",
]


def _hidden(args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(hide(a) if isinstance(a, str) else a for a in args)


class LedgerError(Exception):
    """Base class of every error raised by agent_ledger."""

    key: str | None = None


class ConfigurationError(LedgerError, ValueError):
    """A ledger, tool or call was configured with an invalid option.

    Its message never holds a credential: URLs in it are shown with their password masked.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*_hidden(args))


class InvalidArguments(LedgerError, ValueError):
    """Arguments that cannot be canonicalised, are too large, or do not fit the handler.

    ``path`` names the offending argument (for example ``args.items[2].price``) when there is one.
    Nothing is written to the ledger when this is raised.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NoWorkflow(LedgerError):
    """A decorated tool was called outside ``with ledger.workflow(...)``."""

    def __init__(self, tool: str) -> None:
        thread = threading.current_thread()
        in_thread = ""
        if thread is not threading.main_thread():
            in_thread = (
                f". It was called in the thread {thread.name!r}: threads do not inherit the workflow of the "
                f"code that started them. Submit the call with `wf.submit(executor, fn, *args)` inside "
                f"`with ledger.workflow(...) as wf:`, or with "
                f"`executor.submit(contextvars.copy_context().run, fn, *args)`"
            )
        super().__init__(
            f"tool {tool!r} was called with no workflow in context: wrap the call in "
            f"`with ledger.workflow('<workflow id>'):` (or `async with`), or use "
            f"ledger.run(ToolCall(workflow_id=..., tool=..., args=...), handler=...){in_thread}"
        )
        self.tool = tool


class PayloadMismatch(LedgerError):
    """The key is already recorded for a call whose full payload differs.

    Raised when a tool keys on a subset of its arguments and the other arguments changed. The handler is
    not run and the other payload's result is never returned. ``fields`` lists the differing arguments.
    """

    def __init__(self, key: str, tool: str, fields: list[str]) -> None:
        shown = ", ".join(fields) if fields else "(fields not recoverable from the stored arguments)"
        super().__init__(
            f"key {key} of tool {tool!r} is already recorded with a different payload; "
            f"differing arguments: {shown}. The handler was not run. Use a different workflow id "
            f"or include these arguments in the tool's key."
        )
        self.key = key
        self.tool = tool
        self.fields = fields


class ResultNotReplayable(LedgerError):
    """The key already succeeded, but its result cannot be returned again.

    The handler is not run again. ``result_repr`` is the ``repr`` recorded at the time, and ``reason``
    says why the result could not be stored or rebuilt.
    """

    def __init__(self, key: str, tool: str, reason: str, result_repr: str | None) -> None:
        super().__init__(
            f"key {key} of tool {tool!r} already succeeded and will not run again, but its result "
            f"cannot be replayed: {reason}. Recorded repr: {result_repr!r}. Return JSON-serialisable "
            f"values (or pydantic models / dataclasses) from tools so that replays can rebuild them."
        )
        self.key = key
        self.tool = tool
        self.reason = reason
        self.result_repr = result_repr


class RecordedError(LedgerError):
    """A replayed failure: the key failed before and the tool's error policy replays errors.

    ``error_type`` is the qualified name of the original exception class, ``message`` its text and
    ``traceback`` the formatted traceback recorded when it happened.
    """

    def __init__(self, key: str, tool: str, attempt: int, error_type: str, message: str, traceback: str | None) -> None:
        super().__init__(
            f"{error_type}: {message} (recorded failure of tool {tool!r}, key {key}, attempt {attempt}; "
            f"replayed because the tool's on_error policy is 'replay')"
        )
        self.key = key
        self.tool = tool
        self.attempt = attempt
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class StepDivergence(LedgerError):
    """A re-run of a workflow called a different step at a position the first run recorded.

    The recorded steps replay in order; if the agent's code or inputs changed so that it now asks for
    another step there, its later tool calls can no longer be matched to the recorded ones.
    """

    def __init__(self, workflow_id: str, position: int, name: str, key: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r}: this run calls step {name!r} at position {position}, but the recorded "
            f"run called a different step there (key {key}). The agent took a different path than the run it "
            f"is resuming; use a new workflow id to start over, or restore the code that made the recording."
        )
        self.key = key
        self.workflow_id = workflow_id
        self.position = position
        self.name = name


class InProgress(LedgerError):
    """Another worker holds the key and did not finish within the ``wait`` timeout."""

    def __init__(self, key: str, tool: str, owner: str | None, since: datetime | None, waited: float) -> None:
        super().__init__(
            f"key {key} of tool {tool!r} is being executed by {owner or 'another worker'} since "
            f"{since.isoformat() if since else 'an unknown time'}; waited {waited:.3f}s for its outcome. "
            f"Call again later (the result will be replayed) or raise `wait`."
        )
        self.key = key
        self.tool = tool
        self.owner = owner
        self.since = since
        self.waited = waited


class OutcomeUnknown(LedgerError):
    """A worker died or lost its lease mid-call: the side effect may or may not have happened.

    The ledger will not run the handler again on its own. Resolve the effect with the tool's
    ``reconcile=`` callback, ``ledger.resolve(key, result=... | error=... | retry=True, by=...)`` or
    ``agent-ledger resolve KEY``. Carries ``key``, ``tool``, ``tool_args`` (the stored arguments),
    ``owner`` (the last worker) and ``attempt``.
    """

    def __init__(
        self,
        key: str,
        tool: str,
        args: Any,
        owner: str | None,
        attempt: int,
        detail: str | None = None,
    ) -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"outcome of tool {tool!r} (key {key}, attempt {attempt}) is unknown: its worker "
            f"{owner or '(unknown)'} stopped before recording a result{extra}. The side effect may or "
            f"may not have happened, so it is not run again automatically. Check downstream "
            f"(for example by the idempotency key {key}), then resolve it: "
            f"ledger.resolve({key!r}, result=...) if it happened, ledger.resolve({key!r}, retry=True) "
            f"if it did not, or `agent-ledger resolve {key} ...`."
        )
        self.key = key
        self.tool = tool
        self.tool_args = args  # not ``args``: that is Exception's own tuple of constructor arguments
        self.owner = owner
        self.attempt = attempt


class ApprovalPending(LedgerError):
    """The call needs a human approval that has not been given yet.

    ``approval_id`` names the request (approve it with ``ledger.approve(approval_id, by=...)``, the CLI or a
    channel); ``key``, ``tool`` and ``args`` say exactly what is waiting. Call again with the same
    arguments once it is approved: the call then runs once.
    """

    def __init__(self, approval_id: str, key: str, tool: str, args: Any, expires_at: datetime) -> None:
        super().__init__(
            f"tool {tool!r} needs human approval before it runs with these exact arguments: {args!r}. "
            f"Approval {approval_id} is pending until {expires_at.isoformat()}. Do not change the arguments "
            f"(that would need a new approval); call again once it is approved."
        )
        self.approval_id = approval_id
        self.key = key
        self.tool = tool
        self.tool_args = args
        self.expires_at = expires_at


class ApprovalRejected(LedgerError):
    """A human rejected this exact call. ``by`` is who, ``reason`` why."""

    def __init__(self, approval_id: str, key: str, tool: str, args: Any, by: str | None, reason: str | None) -> None:
        super().__init__(
            f"The call to {tool!r} with arguments {args!r} was rejected by {by or 'an approver'}"
            f"{': ' + reason if reason else ' (no reason given)'}. It was not executed. Do not retry it with "
            f"the same arguments; tell the user and ask how to proceed. (approval {approval_id})"
        )
        self.approval_id = approval_id
        self.key = key
        self.tool = tool
        self.tool_args = args
        self.by = by
        self.reason = reason


class ApprovalMismatch(LedgerError):
    """The arguments handed to the handler no longer hash to the approved payload; nothing ran."""

    def __init__(self, approval_id: str, key: str, tool: str, approved_hash: str, actual_hash: str) -> None:
        super().__init__(
            f"tool {tool!r} (key {key}): the arguments changed after approval {approval_id} was given "
            f"(approved payload {approved_hash[:15]}…, about to run {actual_hash[:15]}…). The handler was not "
            f"run and the approval is used up; call again to request approval for the new arguments."
        )
        self.approval_id = approval_id
        self.key = key
        self.tool = tool
        self.approved_hash = approved_hash
        self.actual_hash = actual_hash


class ApprovalRefused(LedgerError):
    """A decision that cannot be taken: unknown id, already settled, expired or superseded, a second vote
    by the same approver, the requester deciding their own request, or an unlisted approver."""

    def __init__(self, approval_id: str, why: str) -> None:
        super().__init__(f"approval {approval_id}: {why}")
        self.approval_id = approval_id
        self.why = why


class IllegalTransition(LedgerError):
    """A state change that the effect state machine does not allow (see ``agent_ledger.TRANSITIONS``)."""

    def __init__(self, state: str | None, event: str) -> None:
        super().__init__(f"an effect in state {state or '(new)'!s} cannot take event {event!r}")
        self.state = state
        self.event = event


def _shown(value: float) -> str:
    return f"{value:g}" if value != int(value) or abs(value) >= 1e15 else str(int(value))


class LimitExceeded(LedgerError):
    """A declared ``Limit`` has not enough budget left for this call: the handler did not run.

    ``limit`` is the limit's name, ``scope`` whose budget it is (a workflow id, a tool, ``ledger``, or
    what the limit's ``per`` function returned), ``used`` and ``max`` the budget's state, ``requested``
    what this call needs, ``window_end`` when a windowed budget starts again (None: never). The message
    is written to be handed back to a model. The same call succeeds later if the window moved on or the
    usage was reset (``ledger.reset_usage``).
    """

    def __init__(
        self,
        *,
        limit: str,
        scope: str,
        used: float,
        max: float,
        requested: float,
        key: str,
        tool: str,
        window_end: datetime | None,
    ) -> None:
        again = (
            f" The budget starts again at {window_end.isoformat()}."
            if window_end is not None
            else " Do not retry this call: it will be refused again until the budget is reset."
        )
        super().__init__(
            f"budget {limit}/{scope} used {_shown(used)} of {_shown(max)}; this call needs {_shown(requested)}. "
            f"Tool {tool!r} was not run.{again}"
        )
        self.limit = limit
        self.scope = scope
        self.used = used
        self.max = max
        self.requested = requested
        self.key = key
        self.tool = tool
        self.window_end = window_end


class ChannelError(LedgerError):
    """An approval channel could not announce a request or a decision.

    Raised by a channel's ``request`` / ``decided`` hooks; the ledger catches it, audits it as
    ``notification_failed`` and keeps the request, which can still be decided from the API or the CLI.
    """


class SlackError(ChannelError):
    """Slack's Web API answered with ``ok: false`` (or not at all)."""


class WebhookDeliveryError(ChannelError):
    """Every delivery attempt of a webhook failed."""


class StorageError(LedgerError):
    """The database failed, is unreachable, or returned something the ledger cannot use.

    Its message never holds the database password, even when the driver's own message quoted it.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*_hidden(args))


class SchemaMissing(StorageError):
    """The ledger's tables are missing or lack columns: run the migrations."""
