"""Inbound decisions: Slack button clicks and signed webhook decisions, as plain functions and an ASGI app.

``handle_slack`` and ``handle_webhook`` take the raw body and the headers and return an
``InboundResponse`` (status, JSON body). Work that may be slow (updating the Slack message) is left
in ``response.after``, to be called once the answer is sent: Slack wants its answer within 3 seconds.
Every refusal is an audit event: unverifiable requests as ``inbound_refused`` (tool
``approvals.slack`` / ``approvals.webhook``), decisions the ledger refuses as ``approval_refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from standardwebhooks import Webhook

from ..errors import ApprovalRefused, ConfigurationError
from ._slack import APPROVE_ACTION, REJECT_ACTION, verify_slack
from ._webhook import check_secret

if TYPE_CHECKING:
    from .._ledger import Ledger

__all__ = ["ApprovalsApp", "InboundResponse", "handle_slack", "handle_webhook"]


@dataclass
class InboundResponse:
    """What to answer: an HTTP status and a JSON body; then call ``after()`` (if set)."""

    status: int
    body: dict[str, Any]
    after: Callable[[], None] | None = field(default=None, repr=False)

    def json(self) -> bytes:
        """The body, encoded."""
        return json.dumps(self.body).encode()


def _refuse_inbound(ledger: Ledger, source: str, status: int, why: str, detail: Mapping[str, Any]) -> InboundResponse:
    ledger.approvals.refuse_inbound(f"approvals.{source}", why, detail)
    return InboundResponse(status, {"ok": False, "error": why})


def _record_decision(ledger: Ledger, approval_id: str, decision: str, by: str, reason: str | None) -> InboundResponse:
    try:
        if decision == "approve":
            approval = ledger.approvals.approve(approval_id, by=by, reason=reason, notify=False)
        else:
            approval = ledger.approvals.reject(approval_id, by=by, reason=reason or f"rejected by {by}", notify=False)
    except ApprovalRefused as e:
        return InboundResponse(409, {"ok": False, "error": e.why, "approval_id": approval_id})
    return InboundResponse(
        200,
        {"ok": True, "approval_id": approval_id, "status": approval.status.value, "by": by},
        after=lambda: ledger.approvals.announce_decision(approval_id),
    )


def handle_slack(ledger: Ledger, body: bytes, headers: Mapping[str, str], signing_secret: str) -> InboundResponse:
    """Handle a Slack interactivity request (a click on Approve or Reject)."""
    why = verify_slack(signing_secret, headers, body)
    if why is not None:
        return _refuse_inbound(ledger, "slack", 401, why, {"bytes": len(body)})
    try:
        form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
        payload = json.loads(form["payload"][0])
        action = payload["actions"][0]
        user = str(payload["user"]["id"])
        approval_id = str(action["value"])
        action_id = action["action_id"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return _refuse_inbound(ledger, "slack", 400, f"not a block_actions payload: {e!r}", {})
    if action_id not in (APPROVE_ACTION, REJECT_ACTION):
        return _refuse_inbound(ledger, "slack", 400, f"unknown action {action_id!r}", {"user": user})
    decision = "approve" if action_id == APPROVE_ACTION else "reject"
    reason = "approved in Slack" if decision == "approve" else "rejected in Slack"
    response = _record_decision(ledger, approval_id, decision, user, reason)
    if response.status != 200:
        # Slack shows nothing for a button's error status: answer 200, and tell the clicker through the
        # interaction's response_url (an ephemeral message) once the answer is sent.
        why = f"Not recorded: {response.body['error']}"
        response.body["text"] = why
        response.status = 200
        response_url = payload.get("response_url")
        if isinstance(response_url, str) and response_url.startswith(("https://", "http://")):
            response.after = lambda: _tell(response_url, why)
    return response


def _tell(response_url: str, text: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the decision was refused and audited either way
        httpx.post(
            response_url,
            json={"response_type": "ephemeral", "replace_original": False, "text": text},
            timeout=5,
        )


def handle_webhook(ledger: Ledger, body: bytes, headers: Mapping[str, str], secret: str) -> InboundResponse:
    """Handle a signed decision: ``{"approval_id", "payload_hash", "decision", "by", "reason"}``."""
    lower = {k.lower(): v for k, v in headers.items()}
    message_id = lower.get("webhook-id", "")
    try:
        data = Webhook(secret).verify(body, lower)
    except Exception as e:  # the library raises its own error, or ValueError on malformed headers
        return _refuse_inbound(ledger, "webhook", 401, f"signature check failed: {e}", {"webhook_id": message_id})
    if not ledger.approvals.remember_inbound(message_id, "webhook"):
        return _refuse_inbound(ledger, "webhook", 409, "replayed webhook-id", {"webhook_id": message_id})
    try:
        return _webhook_decision(ledger, data, message_id)
    except Exception:
        # Nothing was decided (e.g. the database failed): let the sender's retry with this id through.
        ledger.approvals.forget_inbound(message_id)
        raise


def _webhook_decision(ledger: Ledger, data: Any, message_id: str) -> InboundResponse:
    try:
        approval_id = str(data["approval_id"])
        payload_hash = str(data["payload_hash"])
        decision = data["decision"]
        by = str(data["by"])
        reason = data.get("reason")
    except (KeyError, TypeError) as e:
        return _refuse_inbound(ledger, "webhook", 400, f"decision body lacks {e}", {"webhook_id": message_id})
    if decision not in ("approve", "reject") or not by:
        return _refuse_inbound(ledger, "webhook", 400, "decision must be 'approve' or 'reject' with a 'by'", {})
    approval = ledger.approvals.get(approval_id)
    if approval is not None and approval.payload_hash != payload_hash:
        return _refuse_inbound(
            ledger,
            "webhook",
            409,
            "payload_hash does not match the approval: the decision was made on other arguments",
            {"approval_id": approval_id, "webhook_id": message_id},
        )
    return _record_decision(ledger, approval_id, decision, by, reason if isinstance(reason, str) else None)


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ApprovalsApp:
    """ASGI app: ``POST /slack/interactions`` and ``POST /webhooks/decisions``."""

    def __init__(self, ledger: Ledger, *, slack_signing_secret: str | None, webhook_secret: str | None) -> None:
        if not slack_signing_secret and not webhook_secret:
            raise ConfigurationError("approvals_app needs slack_signing_secret and/or webhook_secret")
        if webhook_secret:
            check_secret(webhook_secret, "approvals_app")  # refuse a malformed secret at start-up
        self.ledger = ledger
        self.slack_signing_secret = slack_signing_secret
        self.webhook_secret = webhook_secret

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        response = await self._route(scope["method"], path, body, headers)
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": response.json()})
        if response.after is not None:
            await asyncio.to_thread(response.after)

    async def _route(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> InboundResponse:
        if path == "/slack/interactions" and self.slack_signing_secret:
            handler: Callable[[], InboundResponse] = lambda: handle_slack(  # noqa: E731
                self.ledger, body, headers, str(self.slack_signing_secret)
            )
        elif path == "/webhooks/decisions" and self.webhook_secret:
            handler = lambda: handle_webhook(self.ledger, body, headers, str(self.webhook_secret))  # noqa: E731
        else:
            return InboundResponse(404, {"ok": False, "error": f"no endpoint {path}"})
        if method != "POST":
            return InboundResponse(405, {"ok": False, "error": "use POST"})
        return await asyncio.to_thread(handler)
