"""Slack and webhook approval channels over real HTTP on loopback.

A local stand-in for Slack's Web API records the posted and updated messages; the inbound app runs
under uvicorn and is called with httpx. Every forged, stale, replayed or unauthorised decision is
refused and audited.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook

from agent_ledger import ApprovalPending, ApprovalStatus, Ledger, ToolCall
from agent_ledger.approvals import SlackChannel, WebhookChannel, sign_slack, signed_headers, verify_slack

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CHARGE = ToolCall(workflow_id="order-456", tool="stripe.charge", args={"amount": 100, "customer": "cus_123"})


class Recorder:
    """A loopback HTTP server that records requests; ``respond`` decides the answer."""

    def __init__(self, respond: Callable[[str, dict[str, str], bytes], tuple[int, Any]]) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.respond = respond
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, answer = outer.respond(self.path, headers, body)
                outer.requests.append((self.path, headers, body))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def json_bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(b) for p, _h, b in self.requests if p.endswith(path)]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_slack() -> Iterator[Recorder]:
    def respond(path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if headers.get("authorization") != "Bearer xoxb-test":
            return 200, {"ok": False, "error": "invalid_auth"}
        if path.endswith("chat.postMessage"):
            return 200, {"ok": True, "channel": "C123", "ts": "1700000000.000100"}
        if path.endswith("chat.update"):
            time.sleep(0.5)  # a slow Slack must not delay the answer to the click
            return 200, {"ok": True, "channel": "C123", "ts": "1700000000.000100"}
        if path.endswith("/respond"):  # an interaction's response_url
            return 200, {"ok": True}
        return 404, {"ok": False, "error": "unknown_method"}

    rec = Recorder(respond)
    yield rec
    rec.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def slack_click(
    approval_id: str, user: str, action: str = "agent_ledger_approve", response_url: str | None = None
) -> bytes:
    payload = {
        "type": "block_actions",
        "response_url": response_url,
        "user": {"id": user, "username": user.lower()},
        "actions": [{"action_id": action, "block_id": "agent_ledger_decision", "value": approval_id}],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()


def rendered(block: dict[str, Any]) -> str:
    """A rich_text block as a reader sees it (bold as *x*, users as <@id>)."""
    out = []
    for section in block["elements"]:
        for e in section["elements"]:
            if e["type"] == "user":
                out.append(f"<@{e['user_id']}>")
            else:
                out.append(f"*{e['text']}*" if e.get("style", {}).get("bold") else e["text"])
    return "".join(out)


def slack_headers(body: bytes, secret: str = SIGNING_SECRET, at: int | None = None) -> dict[str, str]:
    ts = str(at if at is not None else int(time.time()))
    return {
        "x-slack-request-timestamp": ts,
        "x-slack-signature": sign_slack(secret, ts, body),
        "content-type": "application/x-www-form-urlencoded",
    }


def test_slacks_documented_signing_example() -> None:
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert sign_slack(SIGNING_SECRET, "1531420618", body) == expected
    headers = {"X-Slack-Request-Timestamp": "1531420618", "X-Slack-Signature": expected}
    assert verify_slack(SIGNING_SECRET, headers, body, now=1531420618 + 30) is None
    assert "stale" in str(verify_slack(SIGNING_SECRET, headers, body, now=1531420618 + 301))
    assert "does not match" in str(verify_slack(SIGNING_SECRET, headers, body + b"x", now=1531420618))


def test_slack_request_click_and_update(
    make_ledger: Callable[..., Ledger], fake_slack: Recorder, serve: Callable[[Any], str]
) -> None:
    slack = SlackChannel(token="xoxb-test", channel="C123", api_url=fake_slack.url)
    ledger = make_ledger(channels=[slack])
    runs: list[int] = []

    def charge(amount: int, customer: str) -> dict[str, Any]:
        runs.append(amount)
        return {"charged": amount}

    opts: dict[str, Any] = {"requires_approval": True, "approvers": {"U123"}}
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=charge, **opts)
    approval_id = info.value.approval_id

    (posted,) = fake_slack.json_bodies("chat.postMessage")
    assert posted["channel"] == "C123"
    blocks = posted["blocks"]
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "Approval needed: stripe.charge"}}
    (preformatted,) = [e for e in blocks[2]["elements"] if e["type"] == "rich_text_preformatted"]
    assert preformatted["elements"][0]["text"] == json.dumps(CHARGE.args, indent=2, sort_keys=True)
    assert blocks[3]["elements"][0]["text"].startswith("payload `v1:")
    buttons = blocks[-1]["elements"]
    assert [(b["action_id"], b["value"]) for b in buttons] == [
        ("agent_ledger_approve", approval_id),
        ("agent_ledger_reject", approval_id),
    ]
    assert all("cus_123" not in b["value"] for b in buttons)  # never the args
    assert ledger.approval(approval_id).model_dump()["approval_id"] == approval_id  # type: ignore[union-attr]

    base = serve(ledger.approvals_app(slack_signing_secret=SIGNING_SECRET))
    body = slack_click(approval_id, "U123")
    response = httpx.post(f"{base}/slack/interactions", content=body, headers=slack_headers(body), timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "approved"
    # The answer came before Slack's (slow) chat.update was done.
    assert fake_slack.json_bodies("chat.update") == []
    deadline = time.monotonic() + 10
    while not fake_slack.json_bodies("chat.update") and time.monotonic() < deadline:
        time.sleep(0.02)
    (updated,) = fake_slack.json_bodies("chat.update")
    assert (updated["channel"], updated["ts"]) == ("C123", "1700000000.000100")
    assert all(b["type"] != "actions" for b in updated["blocks"])
    assert "*Approved* by <@U123>" in rendered(updated["blocks"][-1])

    assert ledger.run(CHARGE, handler=charge, **opts) == {"charged": 100}
    assert ledger.run(CHARGE, handler=charge, **opts) == {"charged": 100}
    assert runs == [100]


def test_slack_refusals_are_audited(
    make_ledger: Callable[..., Ledger], fake_slack: Recorder, serve: Callable[[Any], str]
) -> None:
    ledger = make_ledger(channels=[SlackChannel(token="xoxb-test", channel="C123", api_url=fake_slack.url)])
    with pytest.raises(ApprovalPending) as info:
        ledger.run(
            CHARGE, handler=lambda amount, customer: pytest.fail("ran"), requires_approval=True, approvers={"U123"}
        )
    approval_id = info.value.approval_id
    base = serve(ledger.approvals_app(slack_signing_secret=SIGNING_SECRET, audit_interval=0))  # a row each
    url = f"{base}/slack/interactions"
    body = slack_click(approval_id, "U123")

    forged = dict(slack_headers(body), **{"x-slack-signature": "v0=" + "0" * 64})
    assert httpx.post(url, content=body, headers=forged).status_code == 401
    assert httpx.post(url, content=body, headers=slack_headers(body, secret="not-the-secret")).status_code == 401
    stale = slack_headers(body, at=int(time.time()) - 600)
    assert httpx.post(url, content=body, headers=stale).status_code == 401
    tampered = slack_click(approval_id, "U999")
    assert httpx.post(url, content=tampered, headers=slack_headers(body)).status_code == 401

    outsider = slack_click(approval_id, "U666", response_url=fake_slack.url + "respond")
    answer = httpx.post(url, content=outsider, headers=slack_headers(outsider))
    assert answer.status_code == 200 and "may not decide" in answer.json()["text"]
    deadline = time.monotonic() + 10
    while not fake_slack.json_bodies("respond") and time.monotonic() < deadline:
        time.sleep(0.02)
    (told,) = fake_slack.json_bodies("respond")  # the clicker is told, privately, why nothing happened
    assert told["response_type"] == "ephemeral" and "may not decide" in told["text"]
    assert ledger.approval(approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]

    first = httpx.post(url, content=body, headers=slack_headers(body))
    double = httpx.post(url, content=body, headers=slack_headers(body))
    assert first.json()["status"] == "approved"
    assert "already approved" in double.json()["text"]

    events = ledger.events(workflow_id="-")
    assert [e.detail["why"][:20] for e in events if e.detail] == [
        "X-Slack-Signature do",
        "X-Slack-Signature do",
        "stale X-Slack-Reques",
        "X-Slack-Signature do",
    ]
    refused = [e for e in ledger.events(workflow_id="order-456") if e.kind == "approval_refused"]
    assert [e.owner for e in refused] == ["U666", "U123"]


def webhook_decision(approval_id: str, payload_hash: str, decision: str, by: str = "ops-bot") -> str:
    return json.dumps(
        {"approval_id": approval_id, "payload_hash": payload_hash, "decision": decision, "by": by, "reason": "ok"}
    )


def test_webhook_out_is_signed_and_retried(make_ledger: Callable[..., Ledger]) -> None:
    failures = {"left": 2}

    def respond(path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if failures["left"]:
            failures["left"] -= 1
            return 503, {"error": "try later"}
        return 204, {}

    receiver = Recorder(respond)
    try:
        hook = WebhookChannel(url=receiver.url + "approvals", secret=WEBHOOK_SECRET, backoff=0.01)
        ledger = make_ledger(channels=[hook])
        with pytest.raises(ApprovalPending) as info:
            ledger.run(CHARGE, handler=lambda amount, customer: 1, requires_approval=True)
        assert [status for _id, status in hook.deliveries] == [503, 503, 204]
        assert {mid for mid, _ in hook.deliveries} == {f"{info.value.approval_id}.requested"}
        _path, headers, body = receiver.requests[-1]
        data = Webhook(WEBHOOK_SECRET).verify(body, headers)  # the receiver's own check
        assert data["type"] == "approval.requested"
        assert data["approval"]["approval_id"] == info.value.approval_id
        assert data["approval"]["args"] == CHARGE.args
        kinds = [e.kind for e in ledger.events(workflow_id="order-456")]
        assert kinds == ["approval_requested", "notified"]
    finally:
        receiver.close()


def test_failed_webhook_never_loses_the_request(make_ledger: Callable[..., Ledger]) -> None:
    receiver = Recorder(lambda path, headers, body: (500, {"error": "down"}))
    try:
        hook = WebhookChannel(url=receiver.url, secret=WEBHOOK_SECRET, attempts=3, backoff=0.01)
        ledger = make_ledger(channels=[hook])
        with pytest.raises(ApprovalPending) as info:
            ledger.run(CHARGE, handler=lambda amount, customer: "charged", requires_approval=True)
        assert len(hook.deliveries) == 3
        failed = [e for e in ledger.events(workflow_id="order-456") if e.kind == "notification_failed"]
        assert len(failed) == 1 and failed[0].detail and "3 attempt(s) failed" in failed[0].detail["error"]
        ledger.approve(info.value.approval_id, by="alice")  # the CLI/API still decide it
        assert ledger.run(CHARGE, handler=lambda amount, customer: "charged", requires_approval=True) == "charged"
    finally:
        receiver.close()


def test_webhook_decisions_are_verified(make_ledger: Callable[..., Ledger], serve: Callable[[Any], str]) -> None:
    ledger = make_ledger()
    runs: list[int] = []

    def charge(amount: int, customer: str) -> str:
        runs.append(amount)
        return "charged"

    opts: dict[str, Any] = {"requires_approval": True, "approvers": {"ops-bot"}}
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=charge, **opts)
    approval = ledger.approval(info.value.approval_id)
    assert approval is not None
    base = serve(ledger.approvals_app(webhook_secret=WEBHOOK_SECRET, audit_interval=0))  # a row each
    url = f"{base}/webhooks/decisions"

    def post(body: str, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(url, content=body, headers=headers, timeout=10)

    good = webhook_decision(approval.approval_id, approval.payload_hash, "approve")
    other = "whsec_" + "A" * 32
    stale = datetime.now(timezone.utc) - timedelta(minutes=6)
    assert post(good, signed_headers(other, "msg_1", good)).status_code == 401
    assert post(good, signed_headers(WEBHOOK_SECRET, "msg_2", good, at=stale)).status_code == 401
    assert (
        post(good, dict(signed_headers(WEBHOOK_SECRET, "msg_3", good), **{"webhook-signature": "v1,Zm9v"})).status_code
        == 401
    )
    wrong_hash = webhook_decision(approval.approval_id, "v1:" + "0" * 64, "approve")
    assert post(wrong_hash, signed_headers(WEBHOOK_SECRET, "msg_4", wrong_hash)).status_code == 409
    intruder = webhook_decision(approval.approval_id, approval.payload_hash, "approve", by="mallory")
    assert post(intruder, signed_headers(WEBHOOK_SECRET, "msg_5", intruder)).status_code == 409
    assert ledger.approval(approval.approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]

    headers = signed_headers(WEBHOOK_SECRET, "msg_6", good)
    accepted = post(good, headers)
    assert accepted.status_code == 200 and accepted.json()["status"] == "approved"
    replayed = post(good, headers)
    assert replayed.status_code == 409 and "replayed" in replayed.json()["error"]

    assert ledger.run(CHARGE, handler=charge, **opts) == "charged"
    assert runs == [100]
    inbound = [e.detail["why"].split(":")[0] for e in ledger.events(workflow_id="-") if e.detail]
    assert inbound == [
        "signature check failed",
        "signature check failed",
        "signature check failed",
        "payload_hash does not match the approval",
        "replayed webhook-id",
    ]
    refused = [e for e in ledger.events(workflow_id="order-456") if e.kind == "approval_refused"]
    assert [e.owner for e in refused] == ["mallory"]


def test_app_routes(make_ledger: Callable[..., Ledger], serve: Callable[[Any], str]) -> None:
    base = serve(make_ledger().approvals_app(webhook_secret=WEBHOOK_SECRET))
    assert httpx.post(f"{base}/slack/interactions", content=b"x").status_code == 404  # no Slack secret given
    assert httpx.get(f"{base}/webhooks/decisions").status_code == 405


def test_reject_in_slack_and_several_channels_keep_their_state(
    make_ledger: Callable[..., Ledger], fake_slack: Recorder, serve: Callable[[Any], str]
) -> None:
    channels = [
        SlackChannel(token="xoxb-test", channel="C123", api_url=fake_slack.url, name="slack-ops"),
        SlackChannel(token="xoxb-test", channel="C123", api_url=fake_slack.url, name="slack-finance"),
    ]
    ledger = make_ledger(channels=channels)
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=lambda amount, customer: pytest.fail("ran"), requires_approval=True)
    assert len(fake_slack.json_bodies("chat.postMessage")) == 2
    base = serve(ledger.approvals_app(slack_signing_secret=SIGNING_SECRET))
    body = slack_click(info.value.approval_id, "U777", action="agent_ledger_reject")
    answer = httpx.post(f"{base}/slack/interactions", content=body, headers=slack_headers(body))
    assert answer.json()["status"] == "rejected"
    deadline = time.monotonic() + 10
    while len(fake_slack.json_bodies("chat.update")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    updates = fake_slack.json_bodies("chat.update")
    assert len(updates) == 2 and all("*Rejected* by <@U777>" in rendered(u["blocks"][-1]) for u in updates)
    rejected = ledger.approval(info.value.approval_id)
    assert rejected is not None and rejected.reason == "rejected in Slack"


def test_async_callback_channel_from_sync_code(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger.approvals import CallbackChannel

    seen: list[str] = []

    async def announce(approval: Any) -> None:
        seen.append(approval.approval_id)

    ledger = make_ledger(channels=[CallbackChannel(announce)])
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=lambda amount, customer: 1, requires_approval=True)
    assert seen == [info.value.approval_id]


def test_unknown_approval_ids_are_refused_and_audited(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import ApprovalRefused

    ledger = make_ledger()
    with pytest.raises(ApprovalRefused, match="no such approval"):
        ledger.approve("apr_nope", by="alice")
    (event,) = ledger.events(workflow_id="-")
    assert event.kind == "approval_refused" and event.owner == "alice"


def test_signed_headers_accept_any_aware_time() -> None:
    at = datetime.now(timezone(timedelta(hours=2)))
    headers = signed_headers(WEBHOOK_SECRET, "msg_tz", "{}", at=at)
    assert Webhook(WEBHOOK_SECRET).verify("{}", headers) == {}
    with pytest.raises(ValueError, match="aware"):
        signed_headers(WEBHOOK_SECRET, "msg_tz", "{}", at=datetime.now())


def test_channel_errors_are_ledger_errors(fake_slack: Recorder) -> None:
    """Set-up mistakes are ConfigurationErrors (still ValueErrors); delivery failures are ChannelErrors."""
    from agent_ledger import ChannelError, ConfigurationError, InvalidArguments, LedgerError, SlackError
    from agent_ledger import WebhookDeliveryError as DeliveryError
    from agent_ledger.approvals import ApprovalsApp, CallbackChannel

    refused: list[Callable[[], Any]] = [
        lambda: SlackChannel(token="", channel="C1"),
        lambda: WebhookChannel(url="", secret=WEBHOOK_SECRET),
        lambda: WebhookChannel(url="http://127.0.0.1:9/", secret=WEBHOOK_SECRET, attempts=0),
        lambda: ApprovalsApp(None, slack_signing_secret=None, webhook_secret=None),  # type: ignore[arg-type]
        lambda: CallbackChannel("not callable"),  # type: ignore[arg-type]
    ]
    for make in refused:
        with pytest.raises(ConfigurationError) as info:
            make()
        assert isinstance(info.value, ValueError) and isinstance(info.value, LedgerError)
    for bad in ("whsec_", "whsec_!!!!"):  # the library's own error becomes ours, without the secret
        for make_with in (
            lambda s: WebhookChannel(url="http://127.0.0.1:9/", secret=s),
            lambda s: ApprovalsApp(None, slack_signing_secret=None, webhook_secret=s),  # type: ignore[arg-type]
        ):
            with pytest.raises(ConfigurationError, match="secret is not usable") as info:
                make_with(bad)
            assert bad not in str(info.value)
    with pytest.raises(InvalidArguments, match="aware"):
        signed_headers(WEBHOOK_SECRET, "msg", "{}", at=datetime.now())

    approval = _an_approval()
    with pytest.raises(SlackError, match="invalid_auth") as slack_info:
        SlackChannel(token="xoxb-wrong", channel="C123", api_url=fake_slack.url).request(approval)
    receiver = Recorder(lambda path, headers, body: (500, {"error": "down"}))
    try:
        with pytest.raises(DeliveryError, match="2 attempt") as hook_info:
            WebhookChannel(url=receiver.url, secret=WEBHOOK_SECRET, attempts=2, backoff=0.01).request(approval)
    finally:
        receiver.close()
    for err in (slack_info.value, hook_info.value):
        assert isinstance(err, ChannelError) and isinstance(err, LedgerError)


def _an_approval() -> Any:
    from agent_ledger import Approval

    now = datetime.now(timezone.utc)
    return Approval(
        approval_id="apr_test",
        workflow_id="wf",
        key="k",
        tool="stripe.charge",
        args={"amount": 1},
        payload_hash="v1:abc",
        status=ApprovalStatus.PENDING,
        approvers=None,
        requested_at=now,
        expires_at=now + timedelta(hours=1),
        decided_at=None,
        decided_by=None,
        reason=None,
        consumed_at=None,
    )
