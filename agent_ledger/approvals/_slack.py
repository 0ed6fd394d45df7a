"""Slack: approval requests as Block Kit messages with Approve/Reject buttons, and request signing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from .._models import Approval, ApprovalStatus
from ..errors import ConfigurationError, SlackError

__all__ = ["APPROVE_ACTION", "REJECT_ACTION", "SlackChannel", "SlackError", "sign_slack", "verify_slack"]

APPROVE_ACTION = "agent_ledger_approve"
REJECT_ACTION = "agent_ledger_reject"
SLACK_TOLERANCE = 300  # seconds: Slack's documented replay window
_ARGS_LIMIT = 2800  # a section's text holds 3000 characters


def sign_slack(signing_secret: str, timestamp: str, body: bytes) -> str:
    """``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}`` with the signing secret."""
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack(
    signing_secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> str | None:
    """Check ``X-Slack-Signature`` over the raw body; return None if genuine, else why not.

    Refuses a missing or non-numeric timestamp, one more than five minutes from ``now`` (replays), and
    any signature that does not match (compared in constant time). Call it before parsing the body.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get("x-slack-request-timestamp")
    signature = lower.get("x-slack-signature")
    if not timestamp or not signature:
        return "missing X-Slack-Request-Timestamp or X-Slack-Signature"
    try:
        sent = int(timestamp)
    except ValueError:
        return f"X-Slack-Request-Timestamp {timestamp!r} is not a Unix time"
    if abs((time.time() if now is None else now) - sent) > SLACK_TOLERANCE:
        return "stale X-Slack-Request-Timestamp (more than 5 minutes off): possible replay"
    if not hmac.compare_digest(sign_slack(signing_secret, timestamp, body), signature):
        return "X-Slack-Signature does not match the body"
    return None


def _escape(text: str) -> str:
    """Slack's escaping of the three characters its markup gives a meaning (links, mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _literal(text: str, **style: bool) -> dict[str, Any]:
    """A rich text element shown exactly as given: rich text is never parsed as markup."""
    element: dict[str, Any] = {"type": "text", "text": text}
    if style:
        element["style"] = style
    return element


def _who(who: str | None) -> dict[str, Any]:
    if who and who[:1] in ("U", "W") and who.isalnum():
        return {"type": "user", "user_id": who}
    return _literal(who or "someone")


def request_blocks(approval: Approval, *, buttons: bool = True) -> list[dict[str, Any]]:
    """The Block Kit message of a request: tool, workflow, the exact args, hash prefix, buttons.

    Everything the model or the caller wrote (tool name, workflow id, arguments) is shown as plain or
    rich text, never as mrkdwn: an argument holding three backticks or ``*Approved by CFO*`` is shown as
    written and cannot close the code block or add formatting.
    """
    args = json.dumps(approval.args, indent=2, sort_keys=True, ensure_ascii=False)
    shown = args
    note: list[dict[str, Any]] = []
    if len(shown) > _ARGS_LIMIT:
        shown = shown[:_ARGS_LIMIT]
        note = [
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": "_(arguments truncated; see `agent-ledger approvals list` for all of them)_",
                    }
                ],
            }
        ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Approval needed: {approval.tool}"[:150]}},
        {
            "type": "section",
            "fields": [
                {"type": "plain_text", "text": f"Workflow: {approval.workflow_id}"},
                {"type": "mrkdwn", "text": f"*Expires*\n{approval.expires_at.isoformat(timespec='seconds')}"},
            ],
        },
        {
            "type": "rich_text",
            "elements": [
                {
                    "type": "rich_text_section",
                    "elements": [_literal("Arguments, exactly as they will run", bold=True)],
                },
                {"type": "rich_text_preformatted", "elements": [_literal(shown)]},
            ],
        },
        *note,
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": f"payload `{approval.payload_hash[:15]}` · approval `{approval.approval_id}`",
                }
            ],
        },
    ]
    # Quorum progress and the requester are names people typed: rich text, never parsed as markup.
    people: list[dict[str, Any]] = []
    if approval.quorum > 1 or approval.approved_by:
        people.append({"type": "rich_text_section", "elements": [_literal(approval.progress)]})
    if approval.requested_by:
        requester = [_literal("Requested by "), _who(approval.requested_by), _literal(" (may not decide)")]
        people.append({"type": "rich_text_section", "elements": requester})
    if people:
        blocks.append({"type": "rich_text", "elements": people})
    if buttons:
        blocks.append(
            {
                "type": "actions",
                "block_id": "agent_ledger_decision",
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE_ACTION,
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve"},
                        "value": approval.approval_id,
                    },
                    {
                        "type": "button",
                        "action_id": REJECT_ACTION,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Reject"},
                        "value": approval.approval_id,
                    },
                ],
            }
        )
    return blocks


def decided_blocks(approval: Approval) -> list[dict[str, Any]]:
    """The message after a vote or the outcome: while the request is pending (short of its quorum) the
    request with its progress and buttons; once settled, without buttons, saying how it ended.

    The decider and the reason are rich text too: a reason cannot pose as another decision.
    """
    if approval.status is ApprovalStatus.PENDING:
        return request_blocks(approval)
    if approval.status is ApprovalStatus.SUPERSEDED:
        line: list[dict[str, Any]] = [
            _literal("Superseded", bold=True),
            _literal(": the call ran with other arguments; this request can no longer run"),
        ]
    else:
        verb = {ApprovalStatus.APPROVED: "Approved", ApprovalStatus.REJECTED: "Rejected"}.get(
            approval.status, approval.status.value.capitalize()
        )
        when = approval.decided_at.isoformat(timespec="seconds") if approval.decided_at else ""
        line = [_literal(verb, bold=True), _literal(" by "), _who(approval.decided_by)]
        line.append(_literal(f" {when}" + (f": {approval.reason}" if approval.reason else "")))
    return [
        *request_blocks(approval, buttons=False),
        {"type": "rich_text", "elements": [{"type": "rich_text_section", "elements": line}]},
    ]


class SlackChannel:
    """Posts each approval request to a Slack channel through ``chat.postMessage``.

    Needs a bot token with the ``chat:write`` scope. Buttons carry the approval id, never the arguments.
    After each vote the message is updated (``chat.update``) with the quorum progress; once the request
    is settled, to say how it ended, without buttons.
    Decisions come back through ``ledger.approvals_app(slack_signing_secret=...)``.
    """

    def __init__(
        self,
        token: str,
        channel: str,
        *,
        api_url: str = "https://slack.com/api/",
        timeout: float = 5.0,
        client: httpx.Client | None = None,
        name: str = "slack",
    ) -> None:
        if not token or not channel:
            raise ConfigurationError("SlackChannel needs a bot token and a channel id")
        self.name = name
        """Distinguishes channels in the audit trail and in the saved message ids: give two Slack
        channels on one ledger different names."""
        self.token = token
        self.channel = channel
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.timeout = timeout
        self._client = client

    def _call(self, method: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        client = self._client or httpx.Client(timeout=self.timeout)
        try:
            response = client.post(
                self.api_url + method,
                json=dict(payload),
                headers={"Authorization": f"Bearer {self.token}"},
            )
        finally:
            if self._client is None:
                client.close()
        try:
            data = response.json()
        except ValueError as e:
            raise SlackError(f"{method}: HTTP {response.status_code}, not JSON") from e
        if response.status_code >= 400 or not data.get("ok"):
            raise SlackError(f"{method}: {data.get('error') or f'HTTP {response.status_code}'}")
        return dict(data)

    def request(self, approval: Approval) -> dict[str, Any]:
        """Post the request; returns the message's ``channel`` and ``ts`` so it can be updated later."""
        data = self._call(
            "chat.postMessage",
            {
                "channel": self.channel,
                "text": _escape(f"Approval needed: {approval.tool} in workflow {approval.workflow_id}"),
                "blocks": request_blocks(approval),
            },
        )
        return {"channel": data["channel"], "ts": data["ts"]}

    def decided(self, approval: Approval, state: Mapping[str, Any] | None) -> None:
        """Update the message (needs the ``channel``/``ts`` kept from ``request``): after a vote short of
        the quorum, the progress ("1 of 2 approvals: alice") with the buttons; once settled, how it ended
        (approved, rejected, superseded), without buttons."""
        if not state or "ts" not in state:
            return
        if approval.status is ApprovalStatus.PENDING:
            text = f"{approval.tool}: {approval.progress}"
        elif approval.decided_by:
            text = f"{approval.tool}: {approval.status.value} by {approval.decided_by}"
        else:
            text = f"{approval.tool}: {approval.status.value}"
        self._call(
            "chat.update",
            {"channel": state["channel"], "ts": state["ts"], "text": _escape(text), "blocks": decided_blocks(approval)},
        )
