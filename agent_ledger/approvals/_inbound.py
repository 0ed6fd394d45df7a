"""Inbound decisions: Slack button clicks and signed webhook decisions, as plain functions and an ASGI app.

``handle_slack`` and ``handle_webhook`` take the raw body and the headers and return an
``InboundResponse`` (status, JSON body). Work that may be slow (updating the Slack message) is left
in ``response.after``, to be called once the answer is sent: Slack wants its answer within 3 seconds.
Every refusal is an audit event: unverifiable requests as ``inbound_refused`` (tool
``approvals.slack`` / ``approvals.webhook``), decisions the ledger refuses as ``approval_refused``.
Refusals anyone can cause without a secret (a bad signature, an oversized body, a replayed webhook id)
are aggregated so that a flood cannot grow the database: at most one row per endpoint and status per
``audit_interval`` seconds and process, whose ``count`` says how many refusals it stands for.

Hostile values (NUL characters, lone surrogates, over-long ids or names) are refused with a 4xx before
they reach the database, on SQLite and Postgres alike; audit rows hold an escaped, truncated form.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from standardwebhooks import Webhook

from .._text import (
    DEFAULT_AUDIT_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    MAX_APPROVAL_ID,
    MAX_NAME,
    MAX_REASON,
    printable,
    text_problem,
)
from ..errors import ApprovalRefused, ConfigurationError, InvalidArguments
from ._slack import APPROVE_ACTION, REJECT_ACTION, verify_slack
from ._webhook import check_secret

if TYPE_CHECKING:
    from .._ledger import Ledger

__all__ = [
    "DEFAULT_AUDIT_INTERVAL",
    "DEFAULT_MAX_BODY_BYTES",
    "ApprovalsApp",
    "InboundResponse",
    "handle_slack",
    "handle_webhook",
]


@dataclass
class InboundResponse:
    """What to answer: an HTTP status and a JSON body; then call ``after()`` (if set)."""

    status: int
    body: dict[str, Any]
    after: Callable[[], None] | None = field(default=None, repr=False)

    def json(self) -> bytes:
        """The body, encoded."""
        return json.dumps(self.body).encode()


class _Throttle:
    """Per ledger and process: when the last row of each unauthenticated refusal was written, and how
    many refusals have come since then without a row of their own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[tuple[str, int], float] = {}
        self.unwritten: dict[tuple[str, int], int] = {}

    def admit(self, what: tuple[str, int], interval: float) -> int | None:
        """The count the row for this refusal carries, or None when its row is not due yet."""
        now = time.monotonic()
        with self.lock:
            last = self.last.get(what)
            if last is not None and now - last < interval:
                self.unwritten[what] = self.unwritten.get(what, 0) + 1
                return None
            self.last[what] = now
            return self.unwritten.pop(what, 0) + 1

    def drain(self) -> dict[tuple[str, int], int]:
        with self.lock:
            out, self.unwritten = self.unwritten, {}
            return out


_throttles: weakref.WeakKeyDictionary[Ledger, _Throttle] = weakref.WeakKeyDictionary()
_throttles_lock = threading.Lock()


def _throttle(ledger: Ledger) -> _Throttle:
    with _throttles_lock:
        found = _throttles.get(ledger)
        if found is None:
            found = _throttles[ledger] = _Throttle()
        return found


def _audit_refusal(ledger: Ledger, source: str, why: str, detail: Mapping[str, Any]) -> None:
    safe = {k: _safe(v) for k, v in detail.items()}
    ledger.approvals.refuse_inbound(f"approvals.{source}", printable(why, 500), safe)


def _safe(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool)) or value is None else printable(value)


def _refuse_inbound(
    ledger: Ledger,
    source: str,
    status: int,
    why: str,
    detail: Mapping[str, Any],
    *,
    throttle: float | None = None,
) -> InboundResponse:
    """Audit a refusal and answer it. ``throttle``: seconds between two rows of this kind of refusal
    (for refusals anyone can cause); the row that is written carries the ``count`` it stands for."""
    if throttle is None:
        _audit_refusal(ledger, source, why, detail)
    else:
        count = _throttle(ledger).admit((source, status), throttle)
        if count is not None:
            _audit_refusal(ledger, source, why, {**detail, "status": status, "count": count})
    return InboundResponse(status, {"ok": False, "error": printable(why, 500)})


def flush_refusals(ledger: Ledger) -> None:
    """Write one row for each kind of unauthenticated refusal counted since its last row."""
    for (source, status), count in _throttle(ledger).drain().items():
        _audit_refusal(ledger, source, "refused requests not audited one by one", {"status": status, "count": count})


def _bad_field(ledger: Ledger, source: str, name: str, value: Any, limit: int, **detail: Any) -> InboundResponse | None:
    """A 400 (audited) when a field from a request cannot be stored (NUL, lone surrogate, too long)."""
    problem = text_problem(value, limit, allow_empty=name == "reason")
    if problem is None:
        return None
    return _refuse_inbound(ledger, source, 400, f"{name} {problem}", {name: value, **detail})


def _record_decision(
    ledger: Ledger, approval_id: str, decision: str, by: str, reason: str | None, source: str
) -> InboundResponse:
    try:
        if decision == "approve":
            approval = ledger.approvals.approve(approval_id, by=by, reason=reason, notify=False)
        else:
            approval = ledger.approvals.reject(approval_id, by=by, reason=reason or f"rejected by {by}", notify=False)
    except ApprovalRefused as e:
        return InboundResponse(409, {"ok": False, "error": e.why, "approval_id": approval_id})
    except InvalidArguments as e:  # a value the ledger cannot store: the fields are checked first
        return _refuse_inbound(ledger, source, 400, str(e), {"approval_id": approval_id})
    return InboundResponse(
        200,
        {
            "ok": True,
            "approval_id": approval_id,
            "status": approval.status.value,
            "by": by,
            "progress": approval.progress,
        },
        after=lambda: ledger.approvals.announce_decision(approval_id),
    )


def handle_slack(
    ledger: Ledger,
    body: bytes,
    headers: Mapping[str, str],
    signing_secret: str,
    *,
    audit_interval: float = DEFAULT_AUDIT_INTERVAL,
) -> InboundResponse:
    """Handle a Slack interactivity request (a click on Approve or Reject).

    Unsigned requests are refused with 401, and audited at most once per ``audit_interval`` seconds
    (with a count); malformed payloads and fields that cannot be stored with 400.
    """
    why = verify_slack(signing_secret, headers, body)
    if why is not None:
        return _refuse_inbound(ledger, "slack", 401, why, {"bytes": len(body)}, throttle=audit_interval)
    try:
        form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
        payload = json.loads(form["payload"][0])
        action = payload["actions"][0]
        user = str(payload["user"]["id"])
        approval_id = str(action["value"])
        action_id = action["action_id"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
        return _refuse_inbound(ledger, "slack", 400, f"not a block_actions payload: {e!r}", {})
    if action_id not in (APPROVE_ACTION, REJECT_ACTION):
        return _refuse_inbound(ledger, "slack", 400, f"unknown action {action_id!r}", {"user": user})
    bad = _bad_field(ledger, "slack", "user", user, MAX_NAME) or _bad_field(
        ledger, "slack", "approval_id", approval_id, MAX_APPROVAL_ID, user=user
    )
    if bad is not None:
        return bad
    decision = "approve" if action_id == APPROVE_ACTION else "reject"
    reason = "approved in Slack" if decision == "approve" else "rejected in Slack"
    response = _record_decision(ledger, approval_id, decision, user, reason, "slack")
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


def handle_webhook(
    ledger: Ledger,
    body: bytes,
    headers: Mapping[str, str],
    secret: str,
    *,
    audit_interval: float = DEFAULT_AUDIT_INTERVAL,
) -> InboundResponse:
    """Handle a signed decision: ``{"approval_id", "payload_hash", "decision", "by", "reason"}``.

    Unsigned requests (401) and replayed webhook ids (409) are audited at most once per
    ``audit_interval`` seconds (with a count); malformed bodies and fields that cannot be stored get 400.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    message_id = lower.get("webhook-id", "")
    try:
        data = Webhook(secret).verify(body, lower)
    except RecursionError:  # signed, but JSON nested too deeply to parse (the library parses after checking)
        return _refuse_inbound(ledger, "webhook", 400, "body nests too deeply to parse", {"webhook_id": message_id})
    except Exception as e:  # the library raises its own error, or ValueError on malformed headers
        return _refuse_inbound(
            ledger, "webhook", 401, f"signature check failed: {e}", {"webhook_id": message_id}, throttle=audit_interval
        )
    bad = _bad_field(ledger, "webhook", "webhook_id", message_id, MAX_NAME)
    if bad is not None:
        return bad
    if not ledger.approvals.remember_inbound(message_id, "webhook"):
        return _refuse_inbound(
            ledger, "webhook", 409, "replayed webhook-id", {"webhook_id": message_id}, throttle=audit_interval
        )
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
    if not isinstance(reason, str):
        reason = None
    ids = {"webhook_id": message_id}
    bad = (
        _bad_field(ledger, "webhook", "approval_id", approval_id, MAX_APPROVAL_ID, **ids)
        or _bad_field(ledger, "webhook", "by", by, MAX_NAME, **ids)
        or _bad_field(ledger, "webhook", "payload_hash", payload_hash, MAX_NAME, **ids)
        or (_bad_field(ledger, "webhook", "reason", reason, MAX_REASON, **ids) if reason is not None else None)
    )
    if bad is not None:
        return bad
    approval = ledger.approvals.get(approval_id)
    if approval is not None and approval.payload_hash != payload_hash:
        return _refuse_inbound(
            ledger,
            "webhook",
            409,
            "payload_hash does not match the approval: the decision was made on other arguments",
            {"approval_id": approval_id, "webhook_id": message_id},
        )
    return _record_decision(ledger, approval_id, decision, by, reason, "webhook")


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ApprovalsApp:
    """ASGI app: ``POST /slack/interactions`` and ``POST /webhooks/decisions``.

    Bodies over ``max_body_bytes`` are refused with 413 before they are read: at once when
    ``Content-Length`` says so, else as soon as the bytes received pass the limit.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        slack_signing_secret: str | None,
        webhook_secret: str | None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        audit_interval: float = DEFAULT_AUDIT_INTERVAL,
    ) -> None:
        if not slack_signing_secret and not webhook_secret:
            raise ConfigurationError("approvals_app needs slack_signing_secret and/or webhook_secret")
        if webhook_secret:
            check_secret(webhook_secret, "approvals_app")  # refuse a malformed secret at start-up
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes <= 0:
            raise ConfigurationError(f"max_body_bytes must be a positive int, not {max_body_bytes!r}")
        if isinstance(audit_interval, bool) or not isinstance(audit_interval, (int, float)) or audit_interval < 0:
            raise ConfigurationError(f"audit_interval must be a number of seconds >= 0, not {audit_interval!r}")
        self.ledger = ledger
        self.slack_signing_secret = slack_signing_secret
        self.webhook_secret = webhook_secret
        self.max_body_bytes = max_body_bytes
        self.audit_interval = float(audit_interval)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    with contextlib.suppress(Exception):  # the counts are a courtesy; never fail shutdown
                        await asyncio.to_thread(flush_refusals, self.ledger)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await self._body(receive, headers)
        if isinstance(body, InboundResponse):
            response = body
        else:
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

    async def _body(self, receive: Receive, headers: Mapping[str, str]) -> bytes | InboundResponse:
        """The whole body, or a 413/400 answer once it is known to be too large (or unreadable)."""
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            digits = declared.strip()
            if not (digits.isascii() and digits.isdigit()):
                return InboundResponse(400, {"ok": False, "error": "Content-Length is not a number"})
            if len(digits) > 18 or int(digits) > limit:
                return await self._too_large(int(digits[:18]))
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._too_large(size)
            parts.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(parts)

    async def _too_large(self, size: int) -> InboundResponse:
        why = f"request body over the limit of {self.max_body_bytes} bytes"
        return await asyncio.to_thread(
            _refuse_inbound, self.ledger, "app", 413, why, {"bytes": size}, throttle=self.audit_interval
        )

    async def _route(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> InboundResponse:
        interval = self.audit_interval
        if path == "/slack/interactions" and self.slack_signing_secret:
            handler: Callable[[], InboundResponse] = lambda: handle_slack(  # noqa: E731
                self.ledger, body, headers, str(self.slack_signing_secret), audit_interval=interval
            )
        elif path == "/webhooks/decisions" and self.webhook_secret:
            handler = lambda: handle_webhook(  # noqa: E731
                self.ledger, body, headers, str(self.webhook_secret), audit_interval=interval
            )
        else:
            return InboundResponse(404, {"ok": False, "error": f"no endpoint {printable(path, 100)}"})
        if method != "POST":
            return InboundResponse(405, {"ok": False, "error": "use POST"})
        return await asyncio.to_thread(handler)
