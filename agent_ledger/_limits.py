"""Runtime limits: budgets and loop guards, declared in code and enforced in the claim. Pure: no I/O.

A ``Limit`` is validated when it is declared (``ConfigurationError``). For each call it covers,
``charges_for`` turns it into a ``_decide.Charge`` (which budget, how much, which fixed window) before any
I/O, refusing bad amounts with ``InvalidArguments``. The storage layer consumes the charges in the
transaction that claims the key (``_store``, ``_fast``); ``_decide.decide_limit`` says which one did
not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from ._decide import Charge
from ._models import ToolCall
from ._text import MAX_NAME, text_problem
from .errors import ConfigurationError, InvalidArguments

__all__ = ["EPOCH", "Limit", "charges_for", "limits_option", "window_bounds"]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""The start of every window: fixed windows are aligned to the Unix epoch; a limit without a window
has one window, starting here and never ending."""

Number = int | float | Decimal
PER_KINDS = ("workflow", "tool", "ledger")
MAX_AMOUNT = float(2**53)
"""The largest cap or amount: budgets are stored as doubles, exact for integers up to 2**53."""


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None when it is not a number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


@dataclass(frozen=True)
class Limit:
    """A cap on what calls may consume, enforced in the transaction that claims each call's key.

    ``max``: the cap (>= 0). ``count``: what one execution consumes: ``1`` (default: count executions),
    the name of a numeric argument (its value), or a function of the ``ToolCall`` returning a number.
    ``per``: whose budget: ``"workflow"`` (default), ``"tool"``, ``"ledger"``, or a function of the
    ``ToolCall`` returning a scope string (a tenant, a customer). ``window``: None (the scope's whole
    life) or seconds / a ``timedelta``: a fixed window aligned to the epoch, after which usage starts
    again. ``name``: how it is reported (default from the fields; limits with the same name and scope
    share one budget). ``on_exceed``: ``"raise"`` (``LimitExceeded``) or ``"approval"`` (ask a human to
    let this exact call run past the limit).
    """

    max: Number
    count: Number | str | Callable[[ToolCall], Number] = 1
    per: Literal["workflow", "tool", "ledger"] | Callable[[ToolCall], str] = "workflow"
    window: float | timedelta | None = None
    name: str | None = None
    on_exceed: Literal["raise", "approval"] = "raise"
    _seconds: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cap = _number(self.max)
        if cap is None or cap < 0 or cap > MAX_AMOUNT:
            raise ConfigurationError(f"Limit(max=...) must be a number from 0 to 2**53, not {self.max!r}")
        count = self.count
        if isinstance(count, str):
            if text_problem(count, MAX_NAME) is not None:
                raise ConfigurationError(f"Limit(count=...) must name an argument, not {count!r}")
        elif not callable(count):
            amount = _number(count)
            if amount is None or amount < 0 or amount > MAX_AMOUNT:
                raise ConfigurationError(
                    f"Limit(count=...) must be a number >= 0, an argument name or a function of the call, not {count!r}"
                )
        if not callable(self.per) and self.per not in PER_KINDS:
            raise ConfigurationError(
                f"Limit(per=...) must be 'workflow', 'tool', 'ledger' or a function of the call, not {self.per!r}"
            )
        window = self.window
        seconds: float | None = None
        if window is not None:
            raw = window.total_seconds() if isinstance(window, timedelta) else _number(window)
            if raw is None or not raw > 0:
                raise ConfigurationError(f"Limit(window=...) must be seconds > 0 or a timedelta, not {window!r}")
            seconds = float(raw)
        object.__setattr__(self, "_seconds", seconds)
        if self.on_exceed not in ("raise", "approval"):
            raise ConfigurationError(f"Limit(on_exceed=...) must be 'raise' or 'approval', not {self.on_exceed!r}")
        if self.name is not None and text_problem(self.name, 200) is not None:
            raise ConfigurationError(f"Limit(name=...) {text_problem(self.name, 200)}")

    @property
    def window_seconds(self) -> float | None:
        """The window in seconds (None: no window)."""
        return self._seconds

    def default_name(self, tool: str | None) -> str:
        """The name reported for this limit: its ``name``, or one made from its fields (prefixed with
        the tool it is declared on, so the same ``Limit`` on two tools makes two budgets)."""
        if self.name is not None:
            return self.name
        what = self.count if isinstance(self.count, str) else ("calls" if self.count == 1 else "count")
        per = self.per if isinstance(self.per, str) else "scope"
        made = f"{what}/{per}"
        if self._seconds is not None:
            made += f"/{self._seconds:g}s"
        return f"{tool}:{made}" if tool is not None else made


def limits_option(value: object, what: str) -> tuple[Limit, ...]:
    """The ``limits=`` option as a tuple of ``Limit`` (``ConfigurationError`` otherwise)."""
    if value is None:
        return ()
    if isinstance(value, (Limit, str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{what} limits= takes a list of Limit, not {value!r}")
    out = tuple(value)
    for item in out:
        if not isinstance(item, Limit):
            raise ConfigurationError(f"{what} limits= takes Limit objects, not {item!r}")
    return out


def window_bounds(seconds: float | None, now: datetime) -> tuple[datetime, datetime | None]:
    """The fixed window holding ``now``: windows are aligned to the epoch (not sliding)."""
    if seconds is None:
        return EPOCH, None
    elapsed = (now - EPOCH).total_seconds()
    start = EPOCH + timedelta(seconds=math.floor(elapsed / seconds) * seconds)
    return start, start + timedelta(seconds=seconds)


def _amount(limit: Limit, call: Callable[[], ToolCall], args: Mapping[str, Any], tool: str) -> float:
    count = limit.count
    if isinstance(count, str):
        if count not in args:
            raise InvalidArguments(
                f"tool {tool!r}: limit counts argument {count!r}, which the call does not have", path=f"args.{count}"
            )
        value = args[count]
        amount = _number(value)
        if amount is None:
            raise InvalidArguments(
                f"tool {tool!r}: limit counts argument {count!r}, which is {type(value).__name__}, not a finite number",
                path=f"args.{count}",
            )
        where = f"argument {count!r}"
    elif callable(count):
        try:
            value = count(call())
        except Exception as e:
            raise ConfigurationError(f"tool {tool!r}: the count function of a limit raised {e!r}") from e
        amount = _number(value)
        if amount is None:
            raise InvalidArguments(f"tool {tool!r}: the count function of a limit returned {value!r}, not a number")
        where = "the count function"
    else:
        amount = float(count)
        where = "count"
    if amount < 0:
        raise InvalidArguments(f"tool {tool!r}: a limit's amount ({where}) is {amount:g}, which is negative")
    if amount > MAX_AMOUNT:
        raise InvalidArguments(f"tool {tool!r}: a limit's amount ({where}) is {amount:g}, over the largest, 2**53")
    return amount


def _scope(limit: Limit, call: Callable[[], ToolCall], workflow_id: str, tool: str) -> tuple[str, str]:
    per = limit.per
    if per == "workflow":
        return workflow_id, "workflow"
    if per == "tool":
        return tool, "tool"
    if per == "ledger":
        return "ledger", "ledger"
    assert callable(per)
    try:
        scope = per(call())
    except Exception as e:
        raise ConfigurationError(f"tool {tool!r}: the per function of a limit raised {e!r}") from e
    problem = text_problem(scope, MAX_NAME)
    if problem is not None:
        raise InvalidArguments(f"tool {tool!r}: the per function of a limit returned a scope that {problem}")
    return scope, "custom"


def charges_for(
    declared: Iterable[tuple[Limit, str | None]],
    *,
    workflow_id: str,
    tool: str,
    args: Mapping[str, Any],
    now: datetime,
) -> tuple[Charge, ...]:
    """What one execution of this call consumes from each budget of its limits (``declared``: each
    limit with the tool it was declared on, None for the ledger's), computed before any I/O.

    ``InvalidArguments`` for an amount that is missing, not a number or negative; ``ConfigurationError``
    when two different limits of the call share a name and a scope (one budget counted twice)."""
    made: ToolCall | None = None

    def call() -> ToolCall:
        nonlocal made
        if made is None:
            made = ToolCall(workflow_id=workflow_id, tool=tool, args=dict(args))
        return made

    out: list[Charge] = []
    seen: dict[tuple[str, str], Limit] = {}
    for limit, where in declared:
        name = limit.default_name(where)
        if len(name) > MAX_NAME:
            raise ConfigurationError(
                f"tool {tool!r}: the limit name {name[:60]!r}... is over {MAX_NAME} characters: give the limit a name="
            )
        scope, per = _scope(limit, call, workflow_id, tool)
        other = seen.get((name, scope))
        if other is not None:
            if other == limit:
                continue
            raise ConfigurationError(
                f"tool {tool!r}: two different limits named {name!r} apply to this call with scope {scope!r}; "
                f"give them different names"
            )
        seen[(name, scope)] = limit
        start, end = window_bounds(limit.window_seconds, now)
        out.append(
            Charge(
                name=name,
                scope=scope,
                per=per,
                tool=where,
                window_start=start,
                window_end=end,
                amount=_amount(limit, call, args, tool),
                max=float(limit.max),
                on_exceed=limit.on_exceed,
            )
        )
    return tuple(out)
