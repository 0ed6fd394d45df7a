"""Webhooks: approval requests POSTed with Standard Webhooks signatures, retried with backoff."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import httpx
from standardwebhooks import Webhook

from .._hide import hide, hide_url
from .._models import Approval, ApprovalStatus
from ..errors import ConfigurationError, InvalidArguments, WebhookDeliveryError

__all__ = ["WebhookChannel", "WebhookDeliveryError", "signed_headers"]


def check_secret(secret: str, who: str) -> None:
    """Refuse a webhook secret that Standard Webhooks cannot use (the message never shows the secret)."""
    try:
        Webhook(secret)
    except Exception as e:  # the library raises its own errors (an empty or undecodable secret)
        raise ConfigurationError(f"{who}: the webhook secret is not usable ({type(e).__name__}: {e})") from None


def signed_headers(secret: str, message_id: str, body: str, *, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)."""
    if at is not None and at.tzinfo is None:
        raise InvalidArguments("signed_headers needs an aware datetime (e.g. datetime.now(timezone.utc))")
    when = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, when, body),
        "content-type": "application/json",
    }


def approval_payload(event: str, approval: Approval) -> dict[str, Any]:
    """The JSON body of an outbound approval event (requests say how to answer them)."""
    payload: dict[str, Any] = {
        "type": event,
        "approval": approval.model_dump(mode="json"),
        "progress": approval.progress,
    }
    if event != "approval.requested":
        return payload
    return {
        **payload,
        "decide": {
            "how": "POST a signed JSON body to your approvals app at /webhooks/decisions",
            "body": {
                "approval_id": approval.approval_id,
                "payload_hash": approval.payload_hash,
                "decision": "approve | reject",
                "by": "<approver name>",
                "reason": "<optional text>",
            },
        },
    }


class WebhookChannel:
    """POSTs each approval request (and each vote and the outcome) to ``url``, signed per Standard Webhooks.

    The message id is stable across retries (``<approval id>.requested``), so a receiver can
    deduplicate. Failures are retried ``attempts`` times with exponential backoff; if all fail, the
    ledger audits ``notification_failed`` and the approval can still be decided from the CLI or API.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        attempts: int = 4,
        backoff: float = 0.25,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
        name: str = "webhook",
    ) -> None:
        self.name = name
        if not url or not secret:
            raise ConfigurationError("WebhookChannel needs a url and a secret (whsec_...)")
        check_secret(secret, "WebhookChannel")  # refuse a malformed secret now, not at the first delivery
        if attempts < 1:
            raise ConfigurationError("attempts must be at least 1")
        self.url = url
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._client = client
        self.deliveries: list[tuple[str, int | str]] = []
        """(message id, HTTP status or error) of every attempt, newest last."""

    def _deliver(self, message_id: str, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        client = self._client or httpx.Client(timeout=self.timeout)
        last = ""
        try:
            for attempt in range(self.attempts):
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    response = client.post(
                        self.url, content=body, headers=signed_headers(self.secret, message_id, body)
                    )
                except httpx.HTTPError as e:
                    last = hide(f"{type(e).__name__}: {e}")
                    self.deliveries.append((message_id, last))
                    continue
                self.deliveries.append((message_id, response.status_code))
                if response.status_code < 300:
                    return
                last = f"HTTP {response.status_code}"
        finally:
            if self._client is None:
                client.close()
        # Audited and logged by the ledger: the URL's credentials (user:password@, ?token=) are masked.
        raise WebhookDeliveryError(f"{hide_url(self.url)}: {self.attempts} attempt(s) failed, last: {last}")

    def request(self, approval: Approval) -> None:
        """Deliver ``approval.requested``."""
        self._deliver(f"{approval.approval_id}.requested", approval_payload("approval.requested", approval))

    def decided(self, approval: Approval, state: Mapping[str, Any] | None) -> None:
        """Deliver ``approval.voted`` after a vote short of the quorum (message id ``<id>.vote.<n>``, n
        approvals so far), else ``approval.decided`` (approved, rejected or superseded)."""
        if approval.status is ApprovalStatus.PENDING:
            n = len(approval.approved_by)
            self._deliver(f"{approval.approval_id}.vote.{n}", approval_payload("approval.voted", approval))
            return
        self._deliver(f"{approval.approval_id}.decided", approval_payload("approval.decided", approval))
