"""``Ledger``: the public entry point (explicit ``run``, the ``@tool`` decorator, workflows, audit)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
import sys
import typing
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, ParamSpec, Protocol, TypedDict, TypeVar, overload

from pydantic import TypeAdapter
from typing_extensions import Unpack

from . import _keys
from ._decide import Policy, lease_over, transition
from ._flow import (
    HOST,
    ApprovalPolicy,
    Plan,
    Sweep,
    describe_error,
    encode_result,
    execute,
    owner_gone,
    utcnow,
)
from ._flow import recover as sweep_stale
from ._limits import Limit, charges_for, limits_option, window_bounds
from ._models import (
    Approval,
    AuditEvent,
    Effect,
    EffectRecord,
    ErrorInfo,
    LimitUsage,
    RecoveryReport,
    Status,
    ToolCall,
)
from ._runtime import Runtime
from ._schema import DEFAULT_PREFIX, build_tables
from ._store import Work, row_from_mapping
from ._telemetry import Telemetry
from ._text import (
    DEFAULT_AUDIT_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    MAX_NAME,
    MAX_REASON,
    check_name,
    check_text,
    printable,
    text_problem,
)
from ._timeline import (
    MAX_LIMIT as MAX_WORKFLOWS_PAGE,
)
from ._timeline import (
    NEEDS_HUMAN,
    Timeline,
    WorkflowPage,
    build_timeline,
    decode_cursor,
    encode_cursor,
    summary_from_row,
    workflows_query,
)
from .approvals._service import ApprovalService
from .errors import (
    ConfigurationError,
    IllegalTransition,
    InvalidArguments,
    LedgerError,
    NoWorkflow,
    PayloadMismatch,
    StepDivergence,
)

__all__ = ["Ledger", "Tool", "Workflow", "current_workflow"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Tool(Protocol[R_co]):
    """A function decorated with ``@ledger.tool``: same return type, called without ``effect``.

    Its parameters are the wrapped function's minus ``effect`` (which the ledger supplies). Static
    typing cannot drop one named parameter from a signature, so the arguments are typed loosely; they
    are checked against the real signature on every call (``InvalidArguments``).
    """

    tool_name: str
    ledger: Ledger

    def __call__(self, *args: Any, **kwargs: Any) -> R_co:
        """Run the tool once per key within the current workflow."""
        ...


DEFAULT_URL = "sqlite:///agent_ledger.db"
DEFAULT_LEASE = 30.0
DEFAULT_WAIT = 30.0
DEFAULT_APPROVAL_TTL = 24 * 3600.0
MIN_REDACTION_KEY = 16


@dataclass
class _WorkflowState:
    """The current workflow: its id and the position of the next recorded step in this run."""

    workflow_id: str
    next_step: int = 0
    on_behalf_of: str | None = None


_workflow: contextvars.ContextVar[_WorkflowState | None] = contextvars.ContextVar("agent_ledger_workflow", default=None)
_UNSET: Any = object()

OnError = Literal["retry", "replay"]
OnCrash = Literal["unknown", "retry"]


def _check_name(value: object, what: str) -> None:
    """``InvalidArguments`` unless ``value`` is a storable name (string, 1-255 characters, no NUL)."""
    if not isinstance(value, str):
        raise InvalidArguments(f"{what} must be a string, not {type(value).__name__}")
    check_name(value, what)


def _findable(*values: object) -> bool:
    """False when a lookup value (id, name, filter) could never have been stored: nothing matches it.

    A NUL character would make Postgres refuse the query itself (a ``StorageError``), where SQLite
    answers "nothing found"; both answer that now.
    """
    return all(v is None or (isinstance(v, str) and text_problem(v, MAX_NAME) is None) for v in values)


def current_workflow() -> str | None:
    """The workflow id set by the innermost ``ledger.workflow(...)`` in this context, if any."""
    state = _workflow.get()
    return state.workflow_id if state is not None else None


class Workflow:
    """Context manager (sync and async) that sets the workflow id for decorated tools.

    It is a context variable: it holds across ``await`` and is inherited by tasks created inside it
    (and by ``asyncio.to_thread``), but not by threads: run tools in a thread pool with
    ``wf.submit(executor, fn, *args)``. ``on_behalf_of`` names the person the agent acts for: approval
    requests made inside carry it as ``Approval.requested_by``, and that person may not approve or
    reject them.
    """

    def __init__(self, workflow_id: str, on_behalf_of: str | None = None) -> None:
        if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > 255:
            raise InvalidArguments(
                f"workflow id must be a non-empty string of at most 255 characters, not {workflow_id!r}"
            )
        _check_name(workflow_id, "workflow id")
        if on_behalf_of is not None:
            _check_name(on_behalf_of, "on_behalf_of")
        self.workflow_id = workflow_id
        self.on_behalf_of = on_behalf_of
        self._tokens: list[contextvars.Token[_WorkflowState | None]] = []
        self._states: list[_WorkflowState] = []

    def __enter__(self) -> Workflow:
        # Each entry starts counting recorded steps from 0: a re-run after a crash lines up with the first.
        self._states.append(_WorkflowState(self.workflow_id, on_behalf_of=self.on_behalf_of))
        self._tokens.append(_workflow.set(self._states[-1]))
        return self

    def __exit__(self, *exc: object) -> None:
        self._states.pop()
        _workflow.reset(self._tokens.pop())

    def submit(
        self, executor: concurrent.futures.Executor, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]:
        """``executor.submit(fn, *args, **kwargs)``, with ``fn`` running in this workflow.

        A thread does not inherit the context of the code that submits work to it, so a decorated tool
        called from a ``ThreadPoolExecutor`` would find no workflow (``NoWorkflow``). This runs ``fn`` in
        a copy of the caller's context (``contextvars.copy_context().run``) with this workflow set, so
        each submitted call belongs to this workflow and no other, however many run at once::

            with ledger.workflow("order-123") as wf, ThreadPoolExecutor() as pool:
                futures = [wf.submit(pool, charge, n) for n in range(3)]
        """
        context = contextvars.copy_context()
        state = self._states[-1] if self._states else _WorkflowState(self.workflow_id, on_behalf_of=self.on_behalf_of)
        context.run(_workflow.set, state)

        def in_workflow() -> R:
            return context.run(fn, *args, **kwargs)

        return executor.submit(in_workflow)

    async def __aenter__(self) -> Workflow:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


def _seconds(value: float | timedelta | None, name: str, *, allow_zero: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be seconds (a number) or a timedelta, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, not {value!r}")
    return float(value)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class CallOptions(TypedDict, total=False):
    """Options accepted by ``@ledger.tool(...)``, ``ledger.run(...)`` and ``ledger.arun(...)``."""

    key: Iterable[str] | None
    """Key on these arguments only (the full payload is still hashed and compared)."""
    on_error: OnError | None
    """``"retry"`` (default): a recorded failure runs again; ``"replay"``: it is re-raised."""
    retry_on: Iterable[type[BaseException]] | None
    """With failures replayed, these exception classes are retried instead."""
    on_crash: OnCrash
    """``"unknown"`` (default) or ``"retry"`` (take over a dead claim; same ``idem_key``)."""
    reconcile: Callable[[Effect], Any] | None
    """Looks an uncertain call up downstream: returns its result, or ``NOT_EXECUTED``."""
    lease: float | timedelta | None
    """Claim lifetime without a heartbeat (default: the ledger's, 30 s)."""
    wait: float | timedelta | None
    """How long a second caller waits for a running call (default: the ledger's; 0: don't wait)."""
    requires_approval: bool | Callable[[ToolCall], bool]
    """Ask a human first: ``True``, or a predicate of the call (e.g. ``lambda c: c.args["amount"] > 100``)."""
    approvers: Iterable[str] | Callable[[ToolCall], Iterable[str]] | None
    """Who may decide (user names, Slack user ids, webhook approver names); default anyone. Or a routing
    rule: a function of the call returning the names (resolved once, stored with the request)."""
    quorum: int | Callable[[ToolCall], int]
    """How many approvals from distinct approvers a request needs (default 1), or a function of the call."""
    approval_ttl: float | timedelta
    """How long a request (and an unused approval) stays valid (default 24 h)."""
    approval_wait: float | timedelta
    """Block (sync) or await (async) this long for a decision; default 0: raise ``ApprovalPending``."""
    result_type: Any
    """``ledger.run`` only: rebuild replayed results as this type (the decorator uses the annotation)."""
    redact: Iterable[str] | None
    """Secret arguments (a PIN, a card number): stored, hashed into the key and the payload hash, and sent
    only as their HMAC under ``Ledger(redaction_key=...)`` (required), and scrubbed from recorded errors."""
    retention: float | timedelta | None
    """Keep this tool's settled records at least this long; ``ledger.prune()`` removes them after."""
    limits: Iterable[Limit] | None
    """Budgets and loop guards (``Limit``) this tool's (or this call's) executions consume, checked and
    consumed in the transaction that claims the key (besides the ledger's own ``limits``)."""


@dataclass(frozen=True)
class _Options:
    """The per-tool (or per-call) options, validated once."""

    key: tuple[str, ...] | None
    policy: Policy
    lease: float | None
    wait: float | None
    reconcile: Callable[[Effect], Any] | None
    requires_approval: bool | Callable[[ToolCall], bool]
    approval: ApprovalPolicy | None
    result_type: Any
    redact: tuple[str, ...] = ()
    retention: float | None = None
    route: Callable[[ToolCall], Iterable[str]] | None = None
    """``approvers=`` as a routing rule (a function of the call), resolved per request."""
    quorum_rule: Callable[[ToolCall], int] | None = None
    """``quorum=`` as a function of the call, resolved per request."""
    limits: tuple[Limit, ...] = ()

    @staticmethod
    def build(options: CallOptions) -> _Options:
        unknown = set(options) - set(CallOptions.__annotations__)
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {sorted(unknown)}; known: {sorted(CallOptions.__annotations__)}"
            )
        on_error = options.get("on_error")
        on_crash = options.get("on_crash", "unknown")
        reconcile = options.get("reconcile")
        if on_error not in (None, "retry", "replay"):
            raise ConfigurationError(f"on_error must be 'retry' or 'replay', not {on_error!r}")
        if on_crash not in ("unknown", "retry"):
            raise ConfigurationError(f"on_crash must be 'unknown' or 'retry', not {on_crash!r}")
        retry = tuple(options.get("retry_on") or ())
        for cls in retry:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise ConfigurationError(f"retry_on must hold exception classes, not {cls!r}")
        if retry and on_error == "retry":
            raise ConfigurationError(
                "retry_on lists the errors to retry when the others are replayed; it contradicts "
                "on_error='retry' (which retries every error)"
            )
        if reconcile is not None and not callable(reconcile):
            raise ConfigurationError(f"reconcile must be callable, not {reconcile!r}")
        predicate = options.get("requires_approval")
        if callable(predicate) and _is_async(predicate):
            raise ConfigurationError(
                "requires_approval must be a plain (sync) predicate: it is asked while the call is planned, "
                "before anything is awaited"
            )
        key_names = _names(options.get("key"), "key", empty=False)
        requires = options.get("requires_approval", False)
        if not (isinstance(requires, bool) or callable(requires)):
            raise ConfigurationError(f"requires_approval must be a bool or a predicate of the call, not {requires!r}")
        raw_approvers = options.get("approvers")
        route = raw_approvers if callable(raw_approvers) else None
        names = None if route is not None else _approver_names(typing.cast(Any, raw_approvers), "approvers")
        raw_quorum = options.get("quorum", 1)
        quorum_rule = raw_quorum if callable(raw_quorum) else None
        quorum = 1 if quorum_rule is not None else _quorum(raw_quorum, "quorum")
        if names is not None and quorum > len(names):
            raise ConfigurationError(
                f"quorum={quorum} can never be reached by the {len(names)} approver(s) {list(names)}"
            )
        approval = None
        if requires is not False:
            approval = ApprovalPolicy(
                ttl=_seconds(options.get("approval_ttl", DEFAULT_APPROVAL_TTL), "approval_ttl", allow_zero=False)
                or DEFAULT_APPROVAL_TTL,
                approvers=names,
                wait=_seconds(options.get("approval_wait", 0.0), "approval_wait", allow_zero=True) or 0.0,
                quorum=quorum,
            )
        elif raw_approvers is not None or any(o in options for o in ("approval_ttl", "approval_wait", "quorum")):
            raise ConfigurationError("approvers / quorum / approval_ttl / approval_wait need requires_approval=...")
        policy = Policy(
            on_error=on_error or ("replay" if retry else "retry"),
            retry_on=tuple(_qualname(c) for c in retry),
            on_crash=on_crash,
            has_reconcile=reconcile is not None,
        )
        return _Options(
            key=key_names,
            policy=policy,
            lease=_seconds(options.get("lease"), "lease", allow_zero=False),
            wait=_seconds(options.get("wait"), "wait", allow_zero=True),
            reconcile=reconcile,
            requires_approval=requires,
            approval=approval,
            route=route,
            quorum_rule=quorum_rule,
            result_type=options.get("result_type", _UNSET),
            redact=_names(options.get("redact"), "redact") or (),
            retention=_seconds(options.get("retention"), "retention", allow_zero=False),
            limits=limits_option(options.get("limits"), "the tool's"),
        )


def _names(
    value: Iterable[str] | None, what: str, *, noun: str = "argument names", empty: bool = True
) -> tuple[str, ...] | None:
    """The option's names as a tuple (None when not given); ``ConfigurationError`` for a string, a
    non-iterable, a name that is not a non-empty string, or (``empty=False``) no names at all."""
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigurationError(f"{what} must be a list of {noun}, not the string {value!r}")
    try:
        names = tuple(value)
    except TypeError:
        raise ConfigurationError(f"{what} must be a list of {noun}, not {value!r}") from None
    if (not names and not empty) or not all(isinstance(n, str) and n for n in names):
        raise ConfigurationError(f"{what} must be a {'' if empty else 'non-empty '}list of {noun}, not {value!r}")
    return names


def _approver_names(value: Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    """Approver names, checked (a non-empty list of non-empty strings) and sorted, or None (anyone)."""
    names = _names(value, what, noun="names", empty=False)
    if names is not None and not all(text_problem(a, MAX_NAME) is None for a in names):
        raise ConfigurationError(
            f"{what}: approvers must be names of at most 255 characters, without NUL or lone surrogates, not {value!r}"
        )
    return tuple(sorted(set(names))) if names is not None else None


def _quorum(value: Any, what: str) -> int:
    """A quorum: an int of at least 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a whole number of approvals, at least 1, not {value!r}")
    return value


_DEFAULT_OPTIONS = _Options.build({})
STEP_TOOL = "agent_ledger.step"
# Steps key on their position only (the name is checked as the payload); a model call has no side
# effect to protect, so a crashed step is simply asked again.
_STEP_OPTIONS = _Options.build({"key": ["position"], "on_crash": "retry"})


_signatures: weakref.WeakKeyDictionary[Any, tuple[inspect.Signature | None, bool, bool]] = weakref.WeakKeyDictionary()


def _handler_signature(fn: Callable[..., Any]) -> tuple[inspect.Signature | None, bool, bool]:
    """(signature or None, whether it takes ``effect``, whether it is async), cached per handler: run()
    is a hot path."""
    try:
        return _signatures[fn]
    except (KeyError, TypeError):
        pass
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    p = sig.parameters.get("effect") if sig is not None else None
    found = (sig, p is not None and p.kind is not inspect.Parameter.POSITIONAL_ONLY, _is_async(fn))
    with contextlib.suppress(TypeError):  # not every callable can be weakly referenced
        _signatures[fn] = found
    return found


class _Fits:
    """Remembers (handler, argument names) that bind (bounded; a binding check is pure)."""

    def __init__(self, limit: int = 4096) -> None:
        self._seen: dict[tuple[Any, ...], None] = {}
        self._limit = limit

    def __contains__(self, item: tuple[Any, ...]) -> bool:
        try:
            return item in self._seen
        except TypeError:  # an unhashable handler
            return False

    def add(self, item: tuple[Any, ...]) -> None:
        with contextlib.suppress(TypeError):
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._seen[item] = None


_fits = _Fits()
_storable_names = _Fits()
"""(workflow id, tool) pairs that passed ``_check_name``: the check runs once per pair, not per call."""


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = type(fn).__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else None
    return call is not None and inspect.iscoroutinefunction(call)


def _sync_callables(tool: str, reconcile: Callable[..., Any] | None) -> None:
    """Refuse, when a sync tool is declared (or a sync call made), a callback only the async driver can run.

    The rule (docs/concepts.md, "Sync and async"): a tool is sync or async by its handler, decided at
    declaration; a sync tool's callbacks must be sync (the sync driver never awaits); an async tool
    may use either.
    """
    if reconcile is not None and _is_async(reconcile):
        raise ConfigurationError(
            f"tool {tool!r} is sync but its reconcile= callback is async: a sync call cannot await it. "
            f"Make the callback a plain function, or make the tool async (async def, or await ledger.arun)"
        )


class Ledger:
    """A ledger of tool calls on one database.

    ``Ledger()`` uses ``$AGENT_LEDGER_URL`` or the SQLite file ``./agent_ledger.db``. ``lease`` is how
    long a claim lives without a heartbeat, ``wait`` how long a second caller waits for a running call
    to finish (0: don't wait). Each accepts seconds or a ``timedelta``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
        max_args_bytes: int = _keys.DEFAULT_MAX_ARGS_BYTES,
        table_prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        auto_migrate: bool | None = None,
        detect_local_crashes: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        channels: Iterable[Any] = (),
        redaction_key: str | bytes | None = None,
        tracer_provider: Any = None,
        limits: Iterable[Limit] | None = None,
    ) -> None:
        resolved = url or os.environ.get("AGENT_LEDGER_URL") or DEFAULT_URL
        declared_limits = limits_option(limits, "Ledger(...)")
        if not isinstance(max_args_bytes, int) or max_args_bytes <= 0:
            raise ConfigurationError(f"max_args_bytes must be a positive int, not {max_args_bytes!r}")
        if not table_prefix.replace("_", "").isalnum():
            raise ConfigurationError(f"table_prefix must be letters, digits and underscores, not {table_prefix!r}")
        self.url = resolved
        self.lease = _seconds(lease, "lease", allow_zero=False) or DEFAULT_LEASE
        self.wait = _seconds(wait, "wait", allow_zero=True)
        self.max_args_bytes = max_args_bytes
        self.detect_local_crashes = detect_local_crashes
        self.tables = build_tables(table_prefix, schema)
        self._telemetry = Telemetry(tracer_provider)
        if redaction_key is not None and not isinstance(redaction_key, (str, bytes)):
            raise ConfigurationError("redaction_key must be a str or bytes secret")
        key_bytes = redaction_key.encode() if isinstance(redaction_key, str) else redaction_key
        if key_bytes is not None and len(key_bytes) < MIN_REDACTION_KEY:
            raise ConfigurationError(
                f"redaction_key must be at least {MIN_REDACTION_KEY} bytes (e.g. secrets.token_hex(32)): "
                f"a short key can be guessed together with the redacted values"
            )
        self.redaction_key = key_bytes
        # The owner id lives on the runtime, which gives a forked child a new one (Runtime.after_fork).
        self._rt = Runtime(resolved, self.tables, auto_migrate=auto_migrate, engine_options=engine_options)
        self.approvals = ApprovalService(self._rt, channels, actor=self.owner)
        """Approval requests of this ledger: read, approve, reject (``ApprovalService``)."""
        self._rt.approvals = self.approvals
        self._tools: dict[str, tuple[Callable[..., Any], _Options]] = {}
        self.limits = declared_limits
        """The limits every tool's executions consume (``Limit``), besides each tool's own."""

    def __repr__(self) -> str:
        return f"Ledger({self._rt.dialect}, tables={self.tables.effects.name!r})"

    @property
    def owner(self) -> str:
        """This process's owner id for the ledger's claims: ``host:pid:random``.

        Read per call, so claims always carry the pid of the process that makes them: a child forked
        from a process holding this ledger gets its own id (a claim made in the child must not look
        dead when the parent exits, nor the parent's look alive while the child runs).
        """
        return self._rt.owner

    @property
    def channels(self) -> tuple[Any, ...]:
        """The approval channels given to ``Ledger(channels=...)``: every one is told about each request
        and decision. Read-only (a tuple): the channels are fixed when the ledger is made."""
        return self.approvals.channels

    # -- lifecycle -------------------------------------------------------------------------

    def migrate(self, *, partitions: int | None = None) -> None:
        """Create or upgrade the ledger's tables with the shipped alembic migrations.

        ``partitions=N`` (Postgres; ignored on SQLite): the migration that makes the keys shard-ready
        (revision 0007) creates the tables hash-partitioned by ``workflow_id`` into N partitions (see
        docs/scaling.md); default: the ``AGENT_LEDGER_PARTITIONS`` environment variable, else plain
        tables. A database already past that revision keeps its layout.
        """
        from ._migrate import check_partitions

        self._rt.migrate(partitions=check_partitions(partitions))

    def flush(self) -> None:
        """Write buffered replay records now (they are otherwise written within half a second)."""
        self._rt.flush()

    def close(self) -> None:
        """Flush buffered records, stop background threads and close pooled connections."""
        self._rt.close()

    async def aclose(self) -> None:
        """``close()`` for async users: also disposes the async engine of the running loop."""
        await self._rt.aclose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- workflows -------------------------------------------------------------------------

    def workflow(self, workflow_id: str, *, on_behalf_of: str | None = None) -> Workflow:
        """Set the workflow id for decorated tools: ``with ledger.workflow("order-123"): charge(...)``.

        ``on_behalf_of="alice"`` records who the agent acts for: approval requests made inside carry
        ``requested_by="alice"``, and alice may not approve or reject them (separation of duties).
        """
        return Workflow(workflow_id, on_behalf_of)

    # -- planning --------------------------------------------------------------------------

    def _execute(self, plan: Plan) -> Any:
        plan.now = utcnow()  # the flow's start time, read here rather than in the flow (it does no I/O)
        seen = self._telemetry.begin(plan)
        if seen is None:
            return self._rt.run_sync(execute(plan))
        try:
            result = self._rt.run_sync(execute(plan), seen)
        except BaseException as e:
            seen.end(e)
            raise
        seen.end(None)
        return result

    async def _aexecute(self, plan: Plan) -> Any:
        owner = self.owner
        if plan.owner != owner:  # planned before an os.fork(), awaited in the child: claim as the child
            plan.owner = owner
        plan.now = utcnow()  # when the call starts, not when its coroutine was made
        seen = self._telemetry.begin(plan)
        if seen is None:
            return await self._rt.run_async(execute(plan))
        try:
            result = await self._rt.run_async(execute(plan), seen)
        except BaseException as e:
            seen.end(e)
            raise
        seen.end(None)
        return result

    def _plan(
        self,
        *,
        workflow_id: str,
        tool: str,
        args: Mapping[str, Any],
        invoke: Callable[[Effect], Any],
        options: _Options,
        decode: Callable[[Any], Any] | None,
    ) -> Plan:
        if type(workflow_id) is not str or type(tool) is not str or (workflow_id, tool) not in _storable_names:
            _check_name(workflow_id, "workflow id")
            _check_name(tool, "tool name")
            _storable_names.add((workflow_id, tool))
        normalised = _keys.normalise(dict(args), "args")
        redaction = None
        if options.redact:
            secret = self._redaction_key(tool)
            redaction = _keys.Redaction.of(options.redact, secret, args, normalised)
            # The key, the payload hash and the stored args all hold the keyed hash, never the value.
            normalised = redaction.args(normalised)
        canonical_args = _keys.canonical(normalised)  # once: the key and the payload hash reuse it
        size = len(canonical_args)
        if size > self.max_args_bytes:
            raise InvalidArguments(
                f"arguments of tool {tool!r} are {size} bytes as canonical JSON, over the limit of "
                f"{self.max_args_bytes} (Ledger(max_args_bytes=...)): store large payloads elsewhere and "
                f"pass a reference",
                path="args",
            )
        if options.key is not None:
            missing = [k for k in options.key if k not in normalised]
            if missing:
                raise InvalidArguments(
                    f"tool {tool!r} keys on {list(options.key)} but the call has no argument(s) {missing}",
                    path="args",
                )
            key_bytes = _keys.canonical({k: normalised[k] for k in options.key})
        else:
            key_bytes = canonical_args
        charges: tuple[Any, ...] = ()
        limit_approval = None
        if (self.limits or options.limits) and options is not _STEP_OPTIONS:  # a recorded step is not a tool
            charges, limit_approval = self._charges(workflow_id, tool, args, options)
        return Plan(
            store=self._rt.store,
            key=_keys.key_from_canonical(workflow_id, tool, key_bytes),
            workflow_id=workflow_id,
            tool=tool,
            args=normalised,
            call_args=dict(args),
            payload_hash=_keys.payload_from_canonical(tool, canonical_args),
            invoke=invoke,
            policy=options.policy,
            owner=self.owner,
            lease=options.lease or self.lease,
            wait=options.wait if options.wait is not None else (self.wait if self.wait is not None else DEFAULT_WAIT),
            reconcile=options.reconcile,
            decode=decode,
            detect_local_crashes=self.detect_local_crashes,
            approval=self._approval_for(options, workflow_id, tool, args),
            retention=options.retention,
            redaction=redaction,
            supersedes=options.requires_approval is not False,
            charges=charges,
            limit_approval=limit_approval,
        )

    def _charges(
        self, workflow_id: str, tool: str, args: Mapping[str, Any], options: _Options
    ) -> tuple[tuple[Any, ...], ApprovalPolicy | None]:
        """The charges of a call with limits (before any I/O: bad amounts raise here), and how to ask for
        an approval past a limit declared with ``on_exceed="approval"``."""
        declared = [(limit, None) for limit in self.limits] + [(limit, tool) for limit in options.limits]
        for limit, _where in declared:
            if isinstance(limit.count, str) and limit.count in options.redact:
                # Its amount would reach the usage table, LimitExceeded's message and the audit trail.
                raise ConfigurationError(
                    f"tool {tool!r}: a limit counts argument {limit.count!r}, which the tool redacts; count "
                    f"something else (a limit's amounts are stored and shown in clear)"
                )
        charges = charges_for(declared, workflow_id=workflow_id, tool=tool, args=args, now=utcnow())
        if not any(c.on_exceed == "approval" for c in charges):
            return charges, None
        policy = options.approval or ApprovalPolicy(ttl=DEFAULT_APPROVAL_TTL, approvers=None, wait=0.0)
        state = _workflow.get()
        if state is not None and state.on_behalf_of is not None:
            policy = dataclasses.replace(policy, requested_by=state.on_behalf_of)
        return charges, policy

    # -- limits ----------------------------------------------------------------------------

    def usage(self, workflow_id: str | None = None, tool: str | None = None) -> list[LimitUsage]:
        """How much of each budget is used in its current window, so an agent can tell the model what is
        left: with ``workflow_id``, the budgets that constrain that workflow (its own, and the shared
        per-tool and per-ledger ones; custom scopes such as tenants are listed without it); with
        ``tool``, those of limits covering that tool. Budgets of limits declared on this
        ledger and its tools that nothing consumed yet are listed too, with nothing used."""
        for value, what in ((workflow_id, "workflow id"), (tool, "tool name")):
            if value is not None:
                check_text(value, what, MAX_NAME)
        now = utcnow()
        rows = self._rt.do(self._rt.store.usage(now=now, workflow_id=workflow_id, tool=tool))
        out = {
            (r["name"], r["scope"]): LimitUsage(
                name=r["name"],
                scope=r["scope"],
                used=float(r["used"]),
                max=float(r["cap"]),
                remaining=max(0.0, float(r["cap"]) - float(r["used"])),
                window_start=r["window_start"],
                window_end=r["window_end"],
            )
            for r in rows
        }
        declared: list[tuple[Limit, str | None]] = [(limit, None) for limit in self.limits]
        for name, (_fn, options) in self._tools.items():
            if tool is None or name == tool:
                declared.extend((limit, name) for limit in options.limits)
        for limit, where in declared:
            if limit.per == "workflow":
                scope = workflow_id
            elif limit.per == "tool":
                scope = where or tool
            elif limit.per == "ledger":
                scope = "ledger"
            else:
                scope = None  # a custom scope is known only from a call
            name = limit.default_name(where)
            if scope is None or (name, scope) in out:
                continue
            start, end = window_bounds(limit.window_seconds, now)
            cap = float(limit.max)
            out[(name, scope)] = LimitUsage(name, scope, 0.0, cap, cap, start, end)
        return sorted(out.values(), key=lambda u: (u.name, u.scope))

    def reset_usage(self, name: str, scope: str, *, by: str) -> int:
        """Start a budget again: forget what the limit ``name`` used for ``scope`` (every window), with an
        audit row (``limit_reset``, by ``by``, on workflow id ``scope``). Returns how many usage rows
        were removed (0: nothing was used, nothing written)."""
        check_text(name, "limit name", MAX_NAME)
        check_text(scope, "scope", MAX_NAME)
        check_text(by, "by", MAX_NAME)
        return int(self._rt.do(self._rt.store.reset_usage(name=name, scope=scope, by=by, now=utcnow())))

    def _redaction_key(self, tool: str) -> bytes:
        if not self.redaction_key:
            raise ConfigurationError(
                f"tool {tool!r} redacts arguments but the ledger has no redaction key: pass "
                f"Ledger(redaction_key=...) (a secret of at least {MIN_REDACTION_KEY} bytes, e.g. "
                f"secrets.token_hex(32), kept like a password). A plain hash would not hide a redacted "
                f"value: a PIN or a card number is found again by hashing every candidate."
            )
        return self.redaction_key

    @staticmethod
    def _approval_for(options: _Options, workflow_id: str, tool: str, args: Mapping[str, Any]) -> ApprovalPolicy | None:
        requires = options.requires_approval
        if requires is False:
            return None
        call = ToolCall(workflow_id=workflow_id, tool=tool, args=dict(args))
        if requires is not True:
            try:
                needed = requires(call)
            except Exception as e:
                raise ConfigurationError(f"the requires_approval predicate of tool {tool!r} raised {e!r}") from e
            if not isinstance(needed, bool):
                raise ConfigurationError(
                    f"the requires_approval predicate of tool {tool!r} returned {needed!r}, not a bool"
                )
            if not needed:
                return None
        policy = options.approval
        assert policy is not None
        state = _workflow.get()
        requested_by = state.on_behalf_of if state is not None else None
        if options.route is None and options.quorum_rule is None and requested_by is None:
            return policy
        approvers, quorum = policy.approvers, policy.quorum
        if options.route is not None:
            try:
                routed = options.route(call)
            except Exception as e:
                raise ConfigurationError(f"the approvers rule of tool {tool!r} raised {e!r}") from e
            approvers = _approver_names(routed, f"the approvers rule of tool {tool!r}")
        if options.quorum_rule is not None:
            try:
                wanted = options.quorum_rule(call)
            except Exception as e:
                raise ConfigurationError(f"the quorum rule of tool {tool!r} raised {e!r}") from e
            quorum = _quorum(wanted, f"the quorum rule of tool {tool!r}")
        if approvers is not None and quorum > len(approvers):
            raise ConfigurationError(
                f"tool {tool!r}: quorum {quorum} can never be reached by the {len(approvers)} approver(s) "
                f"{list(approvers)}"
            )
        return dataclasses.replace(policy, approvers=approvers, quorum=quorum, requested_by=requested_by)

    # -- the explicit form -----------------------------------------------------------------

    @overload
    def run(
        self, call: ToolCall | Any, handler: Callable[..., Coroutine[Any, Any, R]], **options: Unpack[CallOptions]
    ) -> Coroutine[Any, Any, R]: ...

    @overload
    def run(self, call: ToolCall | Any, handler: Callable[..., R], **options: Unpack[CallOptions]) -> R: ...

    def run(self, call: ToolCall | Any, handler: Callable[..., Any], **options: Unpack[CallOptions]) -> Any:
        """Run ``handler(**call.args)`` once for this call's key; replay the recorded outcome after that.

        ``call`` is a ``ToolCall``, or an SDK's own tool-call object (an OpenAI chat tool call or
        Responses ``function_call`` item, an Anthropic ``tool_use`` block, a LangChain tool-call dict)
        inside ``ledger.workflow(...)``: its arguments are parsed and validated against the handler's
        annotations (``InvalidArguments`` otherwise, before anything runs) and its per-attempt id is
        ignored for the key.

        A sync handler returns the result; an async handler makes this return an awaitable. The handler
        also receives the ``Effect`` if it declares a parameter named ``effect``. On a replay the stored
        JSON is returned, rebuilt as ``result_type`` when given (a pydantic model, dataclass, ...). The
        options are those of ``CallOptions`` (the same as ``@ledger.tool``).
        """
        plan, is_async = self._call_plan_of(call, handler, options)
        if is_async:
            return self._aexecute(plan)
        _sync_callables(plan.tool, plan.reconcile)
        return self._execute(plan)

    async def arun(self, call: ToolCall | Any, handler: Callable[..., Any], **options: Unpack[CallOptions]) -> Any:
        """``run`` for async code: awaits async handlers and calls sync ones in the event loop."""
        plan = self._call_plan(call, handler, options)
        return await self._aexecute(plan)

    def _call_plan(self, call: Any, handler: Callable[..., Any], raw: CallOptions) -> Plan:
        return self._call_plan_of(call, handler, raw)[0]

    def _call_plan_of(self, call: Any, handler: Callable[..., Any], raw: CallOptions) -> tuple[Plan, bool]:
        """The plan of a call, and whether its handler is async (read with its signature, once)."""
        if not callable(handler):
            raise InvalidArguments(f"handler must be callable, not {handler!r}")
        options = _Options.build(raw) if raw else _DEFAULT_OPTIONS
        if not isinstance(call, ToolCall):
            call = self._from_sdk(call, handler)
        args = dict(call.args)
        sig, wants, is_async = _handler_signature(handler)
        if "effect" in args and wants:
            raise InvalidArguments(
                f"tool {call.tool!r}: the argument name 'effect' is reserved for the Effect the handler receives"
            )
        if sig is not None and (handler, *args) not in _fits:
            try:
                sig.bind(**args, **({"effect": None} if wants else {}))
            except TypeError as e:
                raise InvalidArguments(
                    f"arguments {sorted(args)} do not fit handler {getattr(handler, '__qualname__', handler)!r}: {e}"
                ) from e
            _fits.add((handler, *args))

        def invoke(effect: Effect) -> Any:
            return handler(**args, effect=effect) if wants else handler(**args)

        decode = None if options.result_type is _UNSET else TypeAdapter(options.result_type).validate_python
        plan = self._plan(
            workflow_id=call.workflow_id,
            tool=call.tool,
            args=args,
            invoke=invoke,
            options=options,
            decode=decode,
        )
        return plan, is_async

    @staticmethod
    def _from_sdk(obj: Any, handler: Callable[..., Any]) -> ToolCall:
        """A ``ToolCall`` from an SDK's tool-call object, its arguments validated against the handler."""
        from .adapters import parse_tool_call

        parsed = parse_tool_call(obj)
        workflow_id = current_workflow()
        if workflow_id is None:
            raise NoWorkflow(parsed.name)
        _check_name(parsed.name, "tool name")  # the model wrote it: refuse what ToolCall would reject raw
        return ToolCall(workflow_id=workflow_id, tool=parsed.name, args=_validated(handler, parsed.name, parsed.args))

    # -- the decorator ---------------------------------------------------------------------

    @overload
    def tool(self, name: Callable[..., R], /) -> Tool[R]: ...

    @overload
    def tool(
        self, name: str | None = None, /, **options: Unpack[CallOptions]
    ) -> Callable[[Callable[..., R]], Tool[R]]: ...

    def tool(self, name: str | Callable[..., Any] | None = None, /, **options: Unpack[CallOptions]) -> Any:
        """Make a function a ledgered tool: each call runs once per (workflow, tool, args) key.

        ``name`` defaults to ``module.qualname``. The options are those of ``CallOptions``: ``key``
        restricts the key to some arguments (the full payload is still checked); ``on_error`` /
        ``retry_on`` choose whether a recorded failure is retried or replayed; ``on_crash`` what happens
        after a worker died mid-call; ``reconcile`` looks an uncertain call up downstream;
        ``requires_approval`` asks a human first. Calls need a ``ledger.workflow(...)`` in context.
        """
        if "result_type" in options:
            raise ConfigurationError(
                "@ledger.tool rebuilds results from the return annotation; result_type is for run()"
            )
        built = _Options.build(options)
        if built.redact:
            self._redaction_key(name if isinstance(name, str) else getattr(name, "__qualname__", repr(name)))
        where = _caller_namespace()
        if callable(name):
            return self._decorate(name, None, built, where)
        if name is not None and (not isinstance(name, str) or text_problem(name, MAX_NAME) is not None):
            raise ConfigurationError(
                f"tool name must be a non-empty string of at most 255 characters, without NUL or lone "
                f"surrogates, not {name!r}"
            )

        def decorator(fn: Callable[..., R]) -> Tool[R]:
            return self._decorate(fn, name, built, where)

        return decorator

    def _decorate(
        self, fn: Callable[..., R], name: str | None, options: _Options, where: Mapping[str, Any] | None = None
    ) -> Tool[R]:
        if not callable(fn):
            raise ConfigurationError(f"@ledger.tool decorates functions, not {fn!r}")
        tool_name = name or f"{fn.__module__}.{fn.__qualname__}"
        if not _is_async(fn):
            _sync_callables(tool_name, options.reconcile)
        sig = inspect.signature(fn)
        params = sig.parameters
        wants = "effect" in params
        if wants and params["effect"].kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ConfigurationError(f"tool {tool_name!r}: the 'effect' parameter cannot be positional-only")
        public = sig.replace(parameters=[p for n, p in params.items() if n != "effect"])
        if options.key is not None:
            unknown = [k for k in options.key if k not in public.parameters]
            if unknown:
                raise ConfigurationError(
                    f"tool {tool_name!r}: key names {unknown} are not parameters of {fn.__qualname__}{public}"
                )
        by_name = not any(
            p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
            for p in public.parameters.values()
        )
        decode = _return_decoder(fn, where)
        previous = self._tools.get(tool_name)
        if previous is not None and (previous[0].__module__, previous[0].__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ConfigurationError(
                f"tool name {tool_name!r} is already used by {previous[0].__module__}.{previous[0].__qualname__} "
                f"on this ledger: give one of them another name"
            )
        self._tools[tool_name] = (fn, options)

        def plan_for(a: tuple[Any, ...], kw: dict[str, Any]) -> Plan:
            workflow_id = current_workflow()
            if workflow_id is None:
                raise NoWorkflow(tool_name)
            try:
                bound = public.bind(*a, **kw)
            except TypeError as e:
                raise InvalidArguments(f"tool {tool_name!r} called with arguments that do not fit {public}: {e}") from e
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            call_args, call_kwargs = bound.args, bound.kwargs

            def invoke(effect: Effect) -> Any:
                target: Callable[..., Any] = fn
                extra = {"effect": effect} if wants else {}
                if by_name:
                    return target(**arguments, **extra)
                return target(*call_args, **call_kwargs, **extra)

            return self._plan(
                workflow_id=workflow_id,
                tool=tool_name,
                args=arguments,
                invoke=invoke,
                options=options,
                decode=decode,
            )

        if _is_async(fn):

            @functools.wraps(fn)
            async def async_wrapper(*a: Any, **kw: Any) -> Any:
                return await self._aexecute(plan_for(a, kw))

            wrapper: Any = async_wrapper
        else:

            @functools.wraps(fn)
            def sync_wrapper(*a: Any, **kw: Any) -> Any:
                return self._execute(plan_for(a, kw))

            wrapper = sync_wrapper
        wrapper.__signature__ = public
        wrapper.tool_name = tool_name
        wrapper.ledger = self
        return typing.cast(Tool[R], wrapper)

    # -- recorded steps (model turns) -----------------------------------------------------

    @overload
    def step(self, name: str, /) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    @overload
    def step(self, name: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def step(self, name: str, fn: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any) -> Any:
        """Record a non-deterministic call (a model request) by its position in the workflow run.

        ``@ledger.step("llm")`` decorates a function; ``ledger.step("llm", fn, *args)`` calls one now.
        The first run records each step's result at its position (0, 1, 2, ... per
        ``ledger.workflow(...)`` entry); a re-run after a crash replays them in order, so the model's
        answers, and therefore the tool calls made from them, are the same as in the crashed run. A
        different step name at a recorded position raises ``StepDivergence``. Steps must be called in
        a deterministic order (not from concurrent tasks). Results come back as the function's
        return annotation (e.g. an SDK's pydantic response type).
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a step needs a non-empty name, not {name!r}")
        where = _caller_namespace()
        if fn is None:

            def decorator(f: Callable[P, R]) -> Callable[P, R]:
                return self._step_wrapper(name, f, where)

            return decorator
        return self._step_wrapper(name, fn, where)(*args, **kwargs)

    def _step_wrapper(self, name: str, fn: Callable[P, R], where: Mapping[str, Any]) -> Callable[P, R]:
        decode = _return_decoder(fn, where)

        def plan_for(a: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Plan, int]:
            state = _workflow.get()
            if state is None:
                raise NoWorkflow(f"step {name}")
            position = state.next_step
            state.next_step += 1
            plan = self._plan(
                workflow_id=state.workflow_id,
                tool=STEP_TOOL,
                args={"position": position, "name": name},
                invoke=lambda effect: fn(*a, **kw),
                options=_STEP_OPTIONS,
                decode=decode,
            )
            return plan, position

        def diverged(e: PayloadMismatch, plan: Plan, position: int) -> StepDivergence:
            return StepDivergence(plan.workflow_id, position, name, e.key or plan.key)

        if _is_async(fn):

            @functools.wraps(fn)
            async def async_step(*a: Any, **kw: Any) -> Any:
                plan, position = plan_for(a, kw)
                try:
                    return await self._aexecute(plan)
                except PayloadMismatch as e:
                    raise diverged(e, plan, position) from e

            return typing.cast(Callable[P, R], async_step)

        @functools.wraps(fn)
        def sync_step(*a: Any, **kw: Any) -> Any:
            plan, position = plan_for(a, kw)
            try:
                return self._execute(plan)
            except PayloadMismatch as e:
                raise diverged(e, plan, position) from e

        return typing.cast(Callable[P, R], sync_step)

    # -- approvals -------------------------------------------------------------------------

    def approval(self, approval_id: str) -> Approval | None:
        """One approval request by id, or None (``ledger.approvals.get``)."""
        return self.approvals.get(approval_id)

    def pending_approvals(self, workflow_id: str | None = None, tool: str | None = None) -> list[Approval]:
        """Approval requests still waiting for a decision (oldest first), optionally filtered."""
        return self.approvals.pending(workflow_id=workflow_id, tool=tool)

    def approve(self, approval_id: str, *, by: str, reason: str | None = None) -> Approval:
        """Approve a pending request, for exactly its payload: one vote by ``by``. The request is
        approved when it has ``quorum`` approvals from distinct approvers (default 1); until then the
        returned ``Approval`` is still pending, with ``approved_by`` so far.

        Raises ``ApprovalRefused`` (audited) when the id is unknown, the request was already settled,
        expired or superseded, ``by`` already voted on it, requested it, or is not one of its approvers;
        ``InvalidArguments`` (nothing written) when the id, ``by`` (at most 255 characters) or ``reason``
        (4000) is too long or holds a NUL character or a lone surrogate.
        """
        return self.approvals.approve(approval_id, by=by, reason=reason)

    def reject(self, approval_id: str, *, by: str, reason: str) -> Approval:
        """Reject a pending request (one allowed approver's rejection is a veto, whatever the quorum);
        calls with its payload then raise ``ApprovalRejected`` with ``reason``. Refused as ``approve``."""
        return self.approvals.reject(approval_id, by=by, reason=reason)

    def approvals_app(
        self,
        *,
        slack_signing_secret: str | None = None,
        webhook_secret: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        audit_interval: float = DEFAULT_AUDIT_INTERVAL,
    ) -> Any:
        """An ASGI app receiving decisions: ``POST /slack/interactions`` and ``POST /webhooks/decisions``.

        Mount it in FastAPI or Starlette (``app.mount("/approvals", ledger.approvals_app(...))``) or run
        it with any ASGI server. Each endpoint verifies its signature over the raw body before parsing;
        an endpoint whose secret is not given answers 404. Bodies over ``max_body_bytes`` (256 KiB by
        default) get 413 before they are read; refusals that need no secret (bad signature, oversized
        body, replayed webhook id) are audited at most once per ``audit_interval`` seconds per endpoint
        and status, each row with the ``count`` of refusals it stands for.
        """
        from .approvals._inbound import ApprovalsApp

        return ApprovalsApp(
            self,
            slack_signing_secret=slack_signing_secret,
            webhook_secret=webhook_secret,
            max_body_bytes=max_body_bytes,
            audit_interval=audit_interval,
        )

    # -- recovery --------------------------------------------------------------------------

    def recover(self, *, batch_size: int = 100) -> RecoveryReport:
        """Settle effects whose worker died, without waiting for the agent to call again.

        Finds running effects whose lease expired (or whose owner process on this host is gone), in
        batches locked ``FOR UPDATE SKIP LOCKED`` so several sweepers can run at once and each effect is
        handled by exactly one. A tool registered on this ledger with ``reconcile=`` is reconciled: found
        -> ``succeeded`` with the returned result, ``NOT_EXECUTED`` -> ``pending`` (the next call runs
        the handler), raised -> ``unknown``. Every other stale effect becomes ``unknown``.

        Async reconcile callbacks are awaited on an event loop of their own; inside a running event
        loop that is impossible, so ``recover()`` then refuses (``ConfigurationError``) before touching
        anything: use ``await ledger.arecover()``.
        """
        sweep = self._sweep(batch_size)
        if any(_is_async(fn) for fn, _ in sweep.tools.values()):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(self._arecover_own_loop(sweep))
            raise ConfigurationError(
                "recover() was called inside a running event loop, and tools registered here have async "
                "reconcile= callbacks, which a sync call cannot await there: use `await ledger.arecover()`"
            )
        return typing.cast(RecoveryReport, self._rt.run_sync(sweep_stale(sweep)))

    async def arecover(self, *, batch_size: int = 100) -> RecoveryReport:
        """``recover()`` for async code: the same sweep on the async driver (any reconcile callback)."""
        return typing.cast(RecoveryReport, await self._rt.run_async(sweep_stale(self._sweep(batch_size))))

    async def _arecover_own_loop(self, sweep: Sweep) -> RecoveryReport:
        try:
            return typing.cast(RecoveryReport, await self._rt.run_async(sweep_stale(sweep)))
        finally:
            await self._rt.aclose_loop()

    def _sweep(self, batch_size: int) -> Sweep:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigurationError(f"batch_size must be a positive int, not {batch_size!r}")
        return Sweep(
            store=self._rt.store,
            owner=self.owner,
            lease=self.lease,
            host_prefix=f"{HOST}:%",
            batch_size=batch_size,
            tools={
                name: (reconcile, opts.retention)
                for name, (_fn, opts) in self._tools.items()
                if (reconcile := opts.reconcile) is not None
            },
            detect_local_crashes=self.detect_local_crashes,
        )

    # -- audit -----------------------------------------------------------------------------

    def effect(self, key: str) -> EffectRecord | None:
        """The stored effect of ``key`` with its audit events, or None."""
        if not _findable(key):
            return None
        self._rt.flush()
        found = self._rt.do(self._rt.store.load_record(key))
        return self._with_events([found])[0] if found is not None else None

    def events(self, *, workflow_id: str | None = None, key: str | None = None) -> list[AuditEvent]:
        """The audit trail of a workflow or of one key, oldest first, including events of calls that
        never ran (approval requests and decisions, refusals)."""
        if (workflow_id is None) == (key is None):
            raise InvalidArguments("events() takes exactly one of workflow_id=... or key=...")
        if not _findable(workflow_id, key):
            return []
        self._rt.flush()
        store = self._rt.store
        if workflow_id is not None:
            stored = self._rt.do(store.events_for_workflow(workflow_id))
            rows = self._rt.do(store.effects(workflow_id=workflow_id))
        else:
            found = self._rt.do(store.load_record(str(key)))
            # An effect row names the key's workflow (its shard); a key without one (a call refused
            # before it ran) is looked for everywhere.
            stored = self._rt.do(
                store.events_for_keys([str(key)], [found["workflow_id"]] if found is not None else None)
            )
            rows = [found] if found is not None else []
        return _merged([AuditEvent.model_validate(dict(e)) for e in stored], rows)

    def effects(
        self,
        *,
        workflow_id: str | None = None,
        tool: str | None = None,
        status: Status | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[EffectRecord]:
        """Effects matching every given filter (created in ``[since, until)``), oldest first, with events."""
        if not _findable(workflow_id, tool):
            return []
        self._rt.flush()
        for name, when in (("since", since), ("until", until)):
            if when is not None and (not isinstance(when, datetime) or when.tzinfo is None):
                raise InvalidArguments(f"{name} must be an aware datetime, not {when!r}")
        state = None
        if status is not None:
            try:
                state = Status(status).value
            except ValueError:
                choices = ", ".join(s.value for s in Status)
                raise InvalidArguments(f"status must be one of {choices}, not {printable(status, 40)!r}") from None
        rows = self._rt.do(
            self._rt.store.effects(
                workflow_id=workflow_id, tool=tool, status=state, since=since, until=until, limit=limit
            )
        )
        return self._with_events(rows)

    def _with_events(self, rows: Sequence[Mapping[str, Any]]) -> list[EffectRecord]:
        by_key: dict[str, list[AuditEvent]] = {}
        keys = [r["key"] for r in rows]
        for i in range(0, len(keys), 500):
            workflows = sorted({r["workflow_id"] for r in rows[i : i + 500]})  # the shards to ask
            for e in self._rt.do(self._rt.store.events_for_keys(keys[i : i + 500], workflows)):
                by_key.setdefault(e["key"], []).append(AuditEvent.model_validate(dict(e)))
        return [_record(m, by_key.get(m["key"], [])) for m in rows]

    def export(self, out: typing.IO[str], **filters: Any) -> int:
        """Write matching effects (``effects()`` filters), with their events, as JSON lines; returns the count."""
        records = self.effects(**filters)
        for rec in records:
            out.write(rec.model_dump_json() + "\n")
        return len(records)

    def prune(self, *, older_than: float | timedelta | None = None, batch_size: int = 500) -> int:
        """Delete settled records (succeeded or failed) past their tool's ``retention``, or finished more
        than ``older_than`` ago, with their events and approvals. Returns how many effects were deleted.

        A pruned call is forgotten: calling it again runs the handler again. Unsettled effects (running,
        unknown, pending) are never pruned. Works in batches of ``batch_size`` effects, each deleted with
        its events in its own short transaction, walking an index from where the last batch stopped: a
        prune of millions of rows does not hold up live calls.
        """
        cutoff_s = _seconds(older_than, "older_than", allow_zero=True)
        now = utcnow()
        cutoff = now - timedelta(seconds=cutoff_s) if cutoff_s is not None else None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArguments(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        deleted = 0
        # Past retention first (its index, in order), then anything finished before the cutoff. Each batch
        # is its own short transaction: live calls never wait for a prune for longer than one batch.
        for before in (None, cutoff) if cutoff is not None else (None,):
            after = None
            while True:
                rows = self._rt.do(
                    self._rt.store.prunable(now=now, finished_before=before, limit=batch_size, after=after)
                )
                if not rows:
                    break
                deleted += int(self._rt.do(self._rt.store.delete_keys([r["key"] for r in rows])))
                if len(rows) < batch_size:
                    break
                after = rows[-1]["retain_until"] if before is None else rows[-1]["key"]
        return deleted

    def history(self, workflow_id: str) -> list[EffectRecord]:
        """The workflow's effects in the order they were first called, each with its audit events."""
        return self.effects(workflow_id=workflow_id)

    def timeline(self, workflow_id: str) -> Timeline:
        """The whole story of a workflow, in time order: every effect with its attempts, replays,
        approval requests and votes (quorum progress), refusals, late completions, resolutions, durations
        and outcomes. Three queries, whatever the number of effects. An unknown workflow id gives an
        empty ``Timeline`` (``timeline.empty``)."""
        if not _findable(workflow_id):
            return Timeline(workflow_id=printable(workflow_id, MAX_NAME))
        self._rt.flush()
        store = self._rt.store
        effects = self._rt.do(store.effects(workflow_id=workflow_id))
        events = self._rt.do(store.events_for_workflow(workflow_id))
        approvals = self._rt.do(store.approvals(status=None, workflow_id=workflow_id, tool=None, now=None))
        return build_timeline(workflow_id, effects, events, approvals, utcnow())

    def workflows(
        self,
        *,
        status: Status | str | None = None,
        since: datetime | timedelta | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> WorkflowPage:
        """Workflows, newest activity first: id, first and last activity, effects by status, pending
        approval requests, unknown outcomes and whether a person is needed. One aggregate query.

        ``status`` keeps workflows with at least one effect in that status (or ``"needs_human"``: a
        pending approval request or an unknown outcome); ``since`` (a datetime, or a timedelta before
        now) and ``until`` bound the last activity. At most ``limit`` (1 to 500) lines; pass the page's
        ``next_cursor`` as ``cursor`` for the next page.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_WORKFLOWS_PAGE:
            raise InvalidArguments(f"limit must be an int from 1 to {MAX_WORKFLOWS_PAGE}, not {limit!r}")
        state: str | None = None
        if status is not None:
            state = NEEDS_HUMAN if status == NEEDS_HUMAN else None
            if state is None:
                try:
                    state = Status(status).value
                except ValueError:
                    choices = ", ".join([*(s.value for s in Status), NEEDS_HUMAN])
                    raise InvalidArguments(f"status must be one of {choices}, not {printable(status, 40)!r}") from None
        now = utcnow()
        if isinstance(since, timedelta):
            since = now - since
        for name, when in (("since", since), ("until", until)):
            if when is not None and (not isinstance(when, datetime) or when.tzinfo is None):
                raise InvalidArguments(f"{name} must be an aware datetime, not {when!r}")
        after = decode_cursor(cursor) if cursor is not None else None
        self._rt.flush()
        stmt = workflows_query(
            self.tables, now=now, status=state, since=since, until=until, after=after, limit=limit + 1
        )
        rows = [summary_from_row(m) for m in self._rt.do(Work(((stmt, {}),), "rows", False, "workflows"))]
        more = len(rows) > limit
        rows = rows[:limit]
        following = encode_cursor(rows[-1].last_at, rows[-1].workflow_id) if more and rows else None
        return WorkflowPage(workflows=rows, next_cursor=following)

    def console_app(self, *, auth: Any, max_body_bytes: int = 64 * 1024) -> Any:
        """The web console as an ASGI app (needs ``pip install 'agent-ledger[console]'``): the approvals
        inbox, workflows and their timelines, unknown outcomes to settle. Mount it in Starlette or FastAPI
        (``app.mount("/ledger", ledger.console_app(auth=...))``) or serve it with any ASGI server.

        ``auth`` is a ``ConsoleAuth`` (per-user tokens and/or a trusted header set by an SSO proxy):
        the console never runs without one. Decisions and resolutions are made as the authenticated
        user, through the same service as ``approve`` / ``reject`` / ``resolve``. Request bodies over
        ``max_body_bytes`` are refused with 413 before they are read. See docs/console.md.
        """
        from .console._app import build_app

        return build_app(self, auth, max_body_bytes=max_body_bytes)

    def resolve(
        self,
        key: str,
        *,
        result: Any = _UNSET,
        error: BaseException | str | None = None,
        retry: bool = False,
        by: str,
        reason: str | None = None,
        force: bool = False,
    ) -> EffectRecord:
        """Settle an effect whose outcome the ledger cannot know (or correct a failed one) by hand.

        Exactly one of ``result=`` (it happened: later calls replay this), ``error=`` (it failed: later
        calls follow the error policy) or ``retry=True`` (it did not happen: the next call runs the
        handler again). ``by`` names who decided; it is audited. A running effect whose lease is live is
        refused unless ``force=True``.
        """
        chosen = [result is not _UNSET, error is not None, bool(retry)]
        if sum(chosen) != 1:
            raise InvalidArguments("resolve takes exactly one of result=..., error=... or retry=True")
        if not isinstance(by, str) or not by:
            raise InvalidArguments("resolve needs by='<who decided>' for the audit trail")
        check_text(by, "by", MAX_NAME)
        if reason is not None:
            check_text(reason, "reason", MAX_REASON, allow_empty=True)
        if text_problem(key, MAX_NAME) is not None:
            raise LedgerError(f"no effect with key {printable(key, 100)!r}")
        found = self._rt.do(self._rt.store.load_record(key))
        if found is None:
            raise LedgerError(f"no effect with key {key!r}")
        row = row_from_mapping(found)
        now = utcnow()
        if row.status is Status.RUNNING and not force and not lease_over(row, now, owner_gone(row.owner)):
            until = (row.lease_expires_at or now).isoformat()  # a live lease has an end
            raise LedgerError(
                f"key {key} is running in {row.owner} with a live lease until {until}; "
                f"wait for it, or pass force=True if you know that worker is gone"
            )
        store = self._rt.store
        if result is not _UNSET:
            data, replayable, _shown, why = encode_result(result)
            if not replayable:
                raise InvalidArguments(f"resolve(result=...) needs a JSON-serialisable result: {why}")
            transition(row.status, "resolve_result")
            work = store.resolve(
                row=row, event="resolve_result", by=by, now=now, result=data, result_replayable=True, reason=reason
            )
        elif error is not None:
            info = (
                describe_error(error)
                if isinstance(error, BaseException)
                else {"type": "agent_ledger.ResolvedError", "message": str(error), "traceback": None, "classes": []}
            )
            work = store.resolve(row=row, event="resolve_error", by=by, now=now, error=info, reason=reason)
        else:
            work = store.resolve(row=row, event="resolve_retry", by=by, now=now, reason=reason)
        if not self._rt.do(work):
            raise IllegalTransition(row.status.value, "resolve (the effect changed meanwhile; look again)")
        record = self.effect(key)
        assert record is not None
        return record


def _success_event(m: Mapping[str, Any]) -> AuditEvent | None:
    """The "succeeded" audit event of an effect, read from its row (its durable execution record).

    A success is not written twice: the completion statement that marks the row succeeded is the
    record, and ``succeeded`` is terminal. Resolutions by hand have their own ``resolved`` event.
    """
    if m["status"] != Status.SUCCEEDED.value or m["owner"] is None or m["finished_at"] is None:
        return None
    detail: dict[str, Any] = {}
    if m["started_at"] is not None:
        detail["duration_ms"] = round((m["finished_at"] - m["started_at"]).total_seconds() * 1000, 3)
    if m["result_replayable"] is False:
        detail["not_replayable"] = True
    return AuditEvent(
        id=0,
        key=m["key"],
        workflow_id=m["workflow_id"],
        tool=m["tool"],
        kind="succeeded",
        attempt=m["attempt"],
        owner=m["owner"],
        at=m["finished_at"],
        detail=detail,
    )


def _merged(events: list[AuditEvent], rows: Iterable[Mapping[str, Any]]) -> list[AuditEvent]:
    """Stored events plus the success events read from effect rows, in time order (stable)."""
    extra = [ev for m in rows if (ev := _success_event(m)) is not None]
    # By time, not by id: replay records are written in batches, after events that happened later.
    return sorted([*events, *extra], key=lambda e: e.at)


def _record(m: Mapping[str, Any], events: list[AuditEvent]) -> EffectRecord:
    events = _merged(events, [m])
    error = m["error"]
    return EffectRecord(
        key=m["key"],
        workflow_id=m["workflow_id"],
        tool=m["tool"],
        status=Status(m["status"]),
        attempts=m["attempt"],
        payload_hash=m["payload_hash"],
        args=m["args"],
        result=m["result"],
        result_replayable=m["result_replayable"],
        result_repr=m["result_repr"],
        error=ErrorInfo.model_validate(error) if error else None,
        owner=m["owner"],
        lease_expires_at=m["lease_expires_at"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        replays=sum(int((e.detail or {}).get("count", 1)) for e in events if e.kind == "replayed"),
        events=events,
    )


def _validated(handler: Callable[..., Any], tool: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate (and coerce) a model's arguments against the handler's annotated parameters."""
    from pydantic import ConfigDict, ValidationError, create_model

    try:
        sig = inspect.signature(handler)
        hints = typing.get_type_hints(handler)
    except (TypeError, ValueError, NameError):
        return dict(args)
    fields: dict[str, Any] = {}
    extra: Literal["allow", "forbid"] = "forbid"
    for name, p in sig.parameters.items():
        if name == "effect" or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
            continue
        default = p.default if p.default is not inspect.Parameter.empty else ...
        fields[name] = (hints.get(name, Any), default)
    model = create_model(
        f"{tool}_arguments", __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True), **fields
    )
    try:
        validated = model.model_validate(dict(args))
    except ValidationError as e:
        problems = "; ".join(f"args.{'.'.join(str(x) for x in err['loc']) or '?'}: {err['msg']}" for err in e.errors())
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise InvalidArguments(
            f"the model's arguments for tool {tool!r} do not fit the handler: {problems}",
            path="args." + ".".join(str(x) for x in first) if first else "args",
        ) from e
    data = dict(validated)
    data.update(validated.model_extra or {})
    return {k: data[k] for k in args}


def _caller_namespace(depth: int = 2) -> dict[str, Any]:
    """The local names where a tool or step was declared, to resolve string annotations later
    (``from __future__ import annotations`` with types imported inside a function)."""
    try:
        return dict(sys._getframe(depth).f_locals)
    except (AttributeError, ValueError):  # pragma: no cover - interpreters without frames
        return {}


def _return_decoder(fn: Callable[..., Any], localns: Mapping[str, Any] | None = None) -> Callable[[Any], Any] | None:
    """Validate replayed results into the function's annotated return type.

    Resolved now when possible, so an annotation that cannot rebuild results (say ``ChatCompletion |
    Stream[...]``) fails on the first run, not on the resumed one; a forward reference that is not
    defined yet is resolved at the first replay instead.
    """
    if inspect.signature(fn).return_annotation is inspect.Signature.empty:
        return None
    adapter: list[TypeAdapter[Any]] = []
    try:
        hint = typing.get_type_hints(fn, localns=dict(localns or {})).get("return", Any)
    except NameError:
        hint = None  # defined later: resolve lazily
    except Exception as e:
        raise ConfigurationError(f"cannot resolve the return annotation of {fn.__qualname__}: {e}") from e
    if hint is not None and hint is not Any:
        try:
            adapter.append(TypeAdapter(hint))
        except Exception as e:
            raise ConfigurationError(
                f"the return annotation of {fn.__qualname__} ({hint!r}) cannot rebuild replayed results: {e}. "
                f"Wrap the call in a function annotated with the concrete JSON-serialisable type it returns "
                f"(for example a pydantic model), or with no return annotation to replay plain JSON."
            ) from e
    elif hint is Any:
        return None

    def decode(value: Any) -> Any:
        if not adapter:
            try:
                hint = typing.get_type_hints(fn, localns=dict(localns or {})).get("return", Any)
            except Exception as e:
                raise ConfigurationError(
                    f"cannot resolve the return annotation of {fn.__qualname__} to rebuild replayed results: {e}"
                ) from e
            if hint is Any:
                return value
            adapter.append(TypeAdapter(hint))
        return adapter[0].validate_python(value)

    return decode
