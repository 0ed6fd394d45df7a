"""The ``Effect`` of the handler running in this context (set by the drivers around each handler call)."""

from __future__ import annotations

from contextvars import ContextVar

from ._models import Effect

_current: ContextVar[Effect | None] = ContextVar("agent_ledger_current_effect", default=None)


def current_effect() -> Effect | None:
    """The ``Effect`` of the ledger handler running in this context, or ``None`` outside one.

    Set by the ledger around each handler call (sync and async, tools and steps) and reset after it, so
    code called by a handler (an HTTP client's auth, a logger) can read ``idem_key`` without the handler
    passing it along. A thread or task the handler starts sees it only if it copies the context.
    """
    return _current.get()
