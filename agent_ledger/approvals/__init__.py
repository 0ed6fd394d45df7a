"""Approval channels: where approval requests are announced and decisions come back.

A channel is any object with ``request(approval)`` (called once when a request is opened; it may return
a small JSON mapping to remember, such as a chat message id) and optionally ``decided(approval, state)``
(called with that mapping after each vote, while ``approval.status`` is still pending and
``approval.progress`` tells how far the quorum is, and once the request is settled: approved, rejected
or superseded). Either may be a coroutine function. A channel
that raises never loses the request: the failure is audited and the approval can still be decided from
the Python API or the CLI.

``ApprovalService`` (a ledger's ``ledger.approvals``) is where requests are read and decided and the
channels are told; the ``Ledger`` methods, the CLI and the inbound endpoints here all use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .._models import Approval
from .._text import DEFAULT_AUDIT_INTERVAL, DEFAULT_MAX_BODY_BYTES
from ..errors import ConfigurationError, SlackError, WebhookDeliveryError
from ._service import ApprovalService

if TYPE_CHECKING:
    from ._inbound import ApprovalsApp, InboundResponse, handle_slack, handle_webhook
    from ._slack import SlackChannel, sign_slack, verify_slack
    from ._webhook import WebhookChannel, signed_headers

__all__ = [
    "DEFAULT_AUDIT_INTERVAL",
    "DEFAULT_MAX_BODY_BYTES",
    "ApprovalService",
    "ApprovalsApp",
    "CallbackChannel",
    "Channel",
    "InboundResponse",
    "SlackChannel",
    "SlackError",
    "WebhookChannel",
    "WebhookDeliveryError",
    "handle_slack",
    "handle_webhook",
    "sign_slack",
    "signed_headers",
    "verify_slack",
]

# The HTTP channels and endpoints (httpx, standardwebhooks) load on first use: ``Ledger`` imports this
# package for ``ApprovalService``, and ``import agent_ledger`` stays free of them.
_LAZY = {
    "ApprovalsApp": "_inbound",
    "InboundResponse": "_inbound",
    "handle_slack": "_inbound",
    "handle_webhook": "_inbound",
    "SlackChannel": "_slack",
    "sign_slack": "_slack",
    "verify_slack": "_slack",
    "WebhookChannel": "_webhook",
    "signed_headers": "_webhook",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


@runtime_checkable
class Channel(Protocol):
    """Announces approval requests (and, optionally, their decisions)."""

    def request(self, approval: Approval) -> Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None:
        """Announce a new request; return what to remember for ``decided`` (or None)."""
        ...


class CallbackChannel:
    """Calls your function with each new request (and another one with each decision, if given)."""

    def __init__(
        self,
        on_request: Callable[[Approval], Any],
        on_decided: Callable[[Approval], Any] | None = None,
        *,
        name: str = "callback",
    ) -> None:
        if not callable(on_request):
            raise ConfigurationError(f"on_request must be callable, not {on_request!r}")
        self.on_request = on_request
        self.on_decided = on_decided
        self.name = name

    def request(self, approval: Approval) -> Any:
        """Pass the request to ``on_request`` (its awaitable, if it is async, is awaited by the ledger)."""
        return self.on_request(approval)

    def decided(self, approval: Approval, state: Mapping[str, Any] | None) -> Any:
        """Pass the decided approval to ``on_decided`` (if any)."""
        return self.on_decided(approval) if self.on_decided is not None else None
