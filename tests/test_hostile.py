"""Hostile input (issue 11): every request to the approvals endpoints gets a 4xx, never a 500, on
SQLite and Postgres; hostile ids, names and arguments are refused before anything is written; results
and errors the database cannot hold are recorded, never left ``running``; oversized bodies and floods
of unsigned requests cannot grow memory or the audit table; Slack messages cannot be reformatted by
arguments; an approval only counts if its decider is on the tool's current allowlist."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_ledger import (
    ApprovalPending,
    ApprovalStatus,
    InvalidArguments,
    Ledger,
    RecordedError,
    ResultNotReplayable,
    ToolCall,
)
from agent_ledger._models import Approval
from agent_ledger.approvals import sign_slack, signed_headers
from agent_ledger.approvals._slack import decided_blocks, request_blocks

SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CHARGE = ToolCall(workflow_id="order-9", tool="stripe.charge", args={"amount": 100})

NUL = "a\x00b"
SURROGATE = "a\ud800b"
LONG = "x" * 300  # over the 255 characters of names and ids (and the 40 of approval ids)
HUGE = "y" * 5000  # over every text limit (reason: 4000)


class Runs:
    def __init__(self) -> None:
        self.n = 0

    def charge(self, amount: int) -> str:
        self.n += 1
        return "charged"


def pending(ledger: Ledger, runs: Runs, **opts: Any) -> Approval:
    with pytest.raises(ApprovalPending) as info:
        ledger.run(CHARGE, handler=runs.charge, requires_approval=True, **opts)
    found = ledger.approval(info.value.approval_id)
    assert found is not None
    return found


def slack_body(approval_id: str, user: str, action: str = "agent_ledger_approve") -> bytes:
    payload = {
        "type": "block_actions",
        "user": {"id": user},
        "actions": [{"action_id": action, "block_id": "agent_ledger_decision", "value": approval_id}],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()


def slack_headers(body: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    return {"x-slack-request-timestamp": ts, "x-slack-signature": sign_slack(SLACK_SECRET, ts, body)}


def webhook_body(approval: Approval, **fields: Any) -> str:
    data = {"approval_id": approval.approval_id, "payload_hash": approval.payload_hash, "decision": "approve"}
    data["by"] = "ops-bot"
    data.update(fields)
    return json.dumps(data)


# What each hostile request changes, given the pending approval: (endpoint, body, headers).
Request = tuple[str, bytes, dict[str, str]]


def hostile_requests(approval: Approval) -> dict[str, Request]:
    out: dict[str, Request] = {}
    n = 0

    def webhook(name: str, body: str, message_id: str | None = None) -> None:
        nonlocal n
        n += 1
        headers = signed_headers(WEBHOOK_SECRET, message_id or f"msg_{n}", body)
        out[f"webhook:{name}"] = ("/webhooks/decisions", body.encode(), headers)

    def slack(name: str, body: bytes) -> None:
        out[f"slack:{name}"] = ("/slack/interactions", body, slack_headers(body))

    for label, value in (("nul", NUL), ("surrogate", SURROGATE), ("long", LONG), ("huge", HUGE)):
        webhook(f"approval_id-{label}", webhook_body(approval, approval_id=value))
        webhook(f"by-{label}", webhook_body(approval, by=value))
        webhook(f"reason-{label}", webhook_body(approval, reason=value if label != "long" else HUGE))
        webhook(f"payload_hash-{label}", webhook_body(approval, payload_hash=value))
        webhook(f"decision-{label}", webhook_body(approval, decision=value))
        slack(f"user-{label}", slack_body(approval.approval_id, value))
        slack(f"approval_id-{label}", slack_body(value, "U123"))
        slack(f"action-{label}", slack_body(approval.approval_id, "U123", action=value))
        if label != "surrogate":  # headers are latin-1: a surrogate cannot be sent
            webhook(f"webhook_id-{label}", webhook_body(approval), message_id=value)
    # Unsigned, or signed with hostile headers.
    out["webhook:unsigned-nul-id"] = ("/webhooks/decisions", b"{}", {"webhook-id": NUL, "webhook-signature": "v1,x"})
    out["slack:unsigned-nul-ts"] = ("/slack/interactions", b"x", {"x-slack-request-timestamp": NUL})
    deep = "[" * 100_000 + "]" * 100_000
    slack("deep-json", urllib.parse.urlencode({"payload": deep}).encode())
    webhook("deep-json", deep)
    webhook("list-body", json.dumps([1, 2]))
    return out


async def post_all(app: Any, requests: dict[str, Request]) -> dict[str, int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://approvals.test") as client:
        statuses = {}
        for name, (path, body, headers) in requests.items():
            response = await client.post(path, content=body, headers=headers)
            statuses[name] = response.status_code
            assert response.headers["content-type"] == "application/json", name
        return statuses


def test_hostile_inbound_requests_get_4xx_and_change_nothing(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Runs()
    approval = pending(ledger, runs)
    app = ledger.approvals_app(slack_signing_secret=SLACK_SECRET, webhook_secret=WEBHOOK_SECRET, audit_interval=0)
    requests = hostile_requests(approval)
    statuses = asyncio.run(post_all(app, requests))
    # Slack answers refused decisions with 200 plus an ephemeral message (its buttons show no error
    # status); everything else is a 4xx.
    server_errors = {name: s for name, s in statuses.items() if s >= 500}
    assert server_errors == {}
    assert statuses["webhook:deep-json"] == 400  # signed: a malformed body, not a bad signature
    assert all(400 <= s < 500 for name, s in statuses.items() if name.startswith("webhook:")), statuses
    # Nothing was decided, nothing ran, no hostile message id was remembered.
    still = ledger.approval(approval.approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and still.decided_by is None
    assert runs.n == 0 and ledger.effects() == []
    refused = [e for e in ledger.events(workflow_id="-") if e.kind == "inbound_refused"]
    assert len(refused) >= len([s for s in statuses.values() if s == 400]) > 20
    for event in refused:  # audit rows hold an escaped form of the hostile values
        assert "\x00" not in json.dumps(event.detail, ensure_ascii=False)
    # The endpoint still works for a genuine decision, and the call then runs once.
    body = webhook_body(approval)
    ok = asyncio.run(
        post_all(app, {"good": ("/webhooks/decisions", body.encode(), signed_headers(WEBHOOK_SECRET, "ok", body))})
    )
    assert ok == {"good": 200}
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True) == "charged"
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True) == "charged"
    assert runs.n == 1


@pytest.mark.parametrize(
    ("make_call", "words"),
    [
        (lambda: ToolCall(workflow_id="w", tool=NUL, args={}), "NUL"),
        (lambda: ToolCall(workflow_id=NUL, tool="t", args={}), "NUL"),
        (lambda: ToolCall.model_construct(workflow_id=SURROGATE, tool="t", args={}), "surrogate"),
        (lambda: ToolCall.model_construct(workflow_id="w", tool=LONG, args={}), "over the limit of 255"),
        (lambda: ToolCall.model_construct(workflow_id=LONG, tool="t", args={}), "over the limit of 255"),
        (lambda: ToolCall(workflow_id="w", tool="t", args={"a": NUL}), "NUL"),
        (lambda: ToolCall.model_construct(workflow_id="w", tool="t", args={"a": {"b": [SURROGATE]}}), "surrogate"),
        (lambda: ToolCall(workflow_id="w", tool="t", args={NUL: 1}), "NUL"),
        (lambda: ToolCall.model_construct(workflow_id="w", tool="t", args={"a": {SURROGATE: 1}}), "surrogate"),
    ],
    ids=[
        "tool-nul",
        "workflow-nul",
        "workflow-surrogate",
        "tool-long",
        "workflow-long",
        "args-nul",
        "args-surrogate",
        "key-nul",
        "key-surrogate",
    ],
)
def test_hostile_calls_are_refused_before_anything_is_written(
    make_ledger: Callable[..., Ledger], make_call: Callable[[], ToolCall], words: str
) -> None:
    ledger = make_ledger()
    runs = Runs()
    call = make_call()

    def handler(**kwargs: Any) -> str:
        runs.n += 1
        return "ran"

    with pytest.raises(InvalidArguments, match=words):
        ledger.run(call, handler=handler)
    with pytest.raises(InvalidArguments, match=words):
        asyncio.run(ledger.arun(call, handler=handler))
    assert runs.n == 0
    assert ledger.effects() == []


def test_hostile_workflow_and_tool_names_in_decorator_form(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import ConfigurationError

    ledger = make_ledger()
    with pytest.raises(InvalidArguments, match="NUL"):
        ledger.workflow(NUL)
    with pytest.raises(ConfigurationError, match="NUL"):
        ledger.tool(NUL)
    with ledger.workflow("w"), pytest.raises(InvalidArguments, match="NUL"):
        ledger.step(NUL, lambda: 1)
    assert ledger.effects() == []


def test_hostile_decisions_from_the_python_api(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Runs()
    approval = pending(ledger, runs)
    assert ledger.approval(NUL) is None and ledger.approval(LONG) is None
    for bad in (
        lambda: ledger.approve(NUL, by="bob"),
        lambda: ledger.approve("apr_" + LONG, by="bob"),
        lambda: ledger.approve(approval.approval_id, by=NUL),
        lambda: ledger.approve(approval.approval_id, by=LONG),
        lambda: ledger.approve(approval.approval_id, by="bob", reason=SURROGATE),
        lambda: ledger.reject(approval.approval_id, by="bob", reason=HUGE),
    ):
        with pytest.raises(InvalidArguments):
            bad()
    still = ledger.approval(approval.approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING
    assert runs.n == 0


# -- the stdlib pattern of docs/channels.md ------------------------------------------------------------


def _doc_block() -> str:
    text = (Path(__file__).parent.parent / "docs" / "channels.md").read_text()
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if "BaseHTTPRequestHandler" in b]
    return block


def _raw_post(port: int, path: str, headers: dict[str, str], body: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        # The server may answer (a refusal) and close before reading the whole body: then read its answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(head.encode("latin-1") + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


@pytest.fixture
def doc_server(
    make_ledger: Callable[..., Ledger], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, Ledger]]:
    ledger = make_ledger()  # creates the tables
    for name, value in {
        "AGENT_LEDGER_URL": db_url,
        "SLACK_BOT_TOKEN": "xoxb-test",
        "SLACK_CHANNEL_ID": "C1",
        "SLACK_SIGNING_SECRET": SLACK_SECRET,
        "AGENT_LEDGER_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    code, last = _doc_block().rstrip().rsplit("\n", 1)
    assert last.startswith("ThreadingHTTPServer(")
    namespace: dict[str, Any] = {"__name__": "doc_example"}
    exec(compile(code, "docs/channels.md", "exec"), namespace)
    namespace["ledger"].close()
    namespace["ledger"] = ledger  # the doc's handler uses the module-level name
    handler = namespace["ApprovalHandler"]
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], ledger
    server.shutdown()
    thread.join(10)


def test_docs_stdlib_server_answers_hostile_requests(doc_server: tuple[int, Ledger]) -> None:
    port, ledger = doc_server
    runs = Runs()
    approval = pending(ledger, runs)
    statuses = {}
    for name, (path, body, headers) in hostile_requests(approval).items():
        statuses[name] = _raw_post(port, path, {**headers, "content-length": str(len(body))}, body)
    statuses["no-length"] = _raw_post(port, "/webhooks/decisions", {}, b"")
    statuses["bad-length"] = _raw_post(port, "/webhooks/decisions", {"content-length": "12x"}, b"")
    statuses["negative-length"] = _raw_post(port, "/webhooks/decisions", {"content-length": "-5"}, b"")
    # Announces a gigabyte, sends nothing: refused at once, without waiting for (or reading) the body.
    statuses["too-large"] = _raw_post(port, "/webhooks/decisions", {"content-length": str(10**9)}, b"")
    assert all(0 < s < 500 for s in statuses.values()), statuses
    assert statuses["too-large"] == 413
    still = ledger.approval(approval.approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and runs.n == 0


# -- results and errors the database cannot hold ---------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [NUL, SURROGATE, {"note": NUL}, {NUL: 1}, [SURROGATE]],
    ids=["nul", "surrogate", "nested-nul", "key-nul", "list-surrogate"],
)
def test_unstorable_result_is_recorded_not_replayable(make_ledger: Callable[..., Ledger], result: Any) -> None:
    ledger = make_ledger()
    runs = Runs()

    def handler() -> Any:
        runs.n += 1
        return result

    call = ToolCall(workflow_id="w", tool="t", args={})
    assert ledger.run(call, handler=handler) == result  # the caller gets what the handler returned
    record = ledger.effects()[0]
    assert record.status.value == "succeeded"  # never left running (and later unknown)
    assert record.result_replayable is False and record.result_repr is not None
    assert "\x00" not in record.result_repr
    with pytest.raises(ResultNotReplayable):
        ledger.run(call, handler=handler)
    assert runs.n == 1


def test_unstorable_result_async(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Runs()

    async def handler() -> str:
        runs.n += 1
        return NUL

    call = ToolCall(workflow_id="w", tool="t", args={})
    assert asyncio.run(ledger.arun(call, handler=handler)) == NUL
    assert ledger.effects()[0].status.value == "succeeded"
    with pytest.raises(ResultNotReplayable):
        asyncio.run(ledger.arun(call, handler=handler))
    assert runs.n == 1


@pytest.mark.parametrize("message", [NUL, SURROGATE], ids=["nul", "surrogate"])
def test_error_with_unstorable_message_is_recorded_escaped(make_ledger: Callable[..., Ledger], message: str) -> None:
    ledger = make_ledger()
    runs = Runs()

    def handler() -> str:
        runs.n += 1
        raise ValueError(f"declined: {message}")

    call = ToolCall(workflow_id="w", tool="t", args={})
    with pytest.raises(ValueError):
        ledger.run(call, handler=handler, on_error="replay")
    record = ledger.effects()[0]
    assert record.status.value == "failed"
    assert record.error is not None and record.error.message.startswith("declined: a\\")
    with pytest.raises(RecordedError, match="declined"):
        ledger.run(call, handler=handler, on_error="replay")
    assert runs.n == 1


# -- body size and floods --------------------------------------------------------------------------------


class Receiver:
    """An ASGI receive() that hands out a body in chunks and counts how many were taken."""

    def __init__(self, chunks: int, size: int) -> None:
        self.left = chunks
        self.size = size
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        self.left -= 1
        return {"type": "http.request", "body": b"x" * self.size, "more_body": self.left > 0}


async def call_app(app: Any, headers: list[tuple[bytes, bytes]], receive: Receiver) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/webhooks/decisions", "headers": headers}
    await app(scope, receive, send)
    return int(sent[0]["status"])


def test_oversized_bodies_are_refused_before_they_are_read(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    app = ledger.approvals_app(webhook_secret=WEBHOOK_SECRET, max_body_bytes=64 * 1024)
    # Content-Length over the limit: 413 without taking a single chunk.
    declared = Receiver(chunks=2000, size=64 * 1024)
    assert asyncio.run(call_app(app, [(b"content-length", str(2000 * 64 * 1024).encode())], declared)) == 413
    assert declared.taken == 0
    # No Content-Length (chunked): 413 as soon as the bytes received pass the limit.
    streamed = Receiver(chunks=2000, size=16 * 1024)
    assert asyncio.run(call_app(app, [], streamed)) == 413
    assert streamed.taken == 5
    # A lying Content-Length (small, then more bytes) is caught by the count too.
    lying = Receiver(chunks=2000, size=16 * 1024)
    assert asyncio.run(call_app(app, [(b"content-length", b"10")], lying)) == 413
    assert lying.taken == 5
    # At the limit: read and handled (401: unsigned).
    within = Receiver(chunks=4, size=16 * 1024)
    assert asyncio.run(call_app(app, [], within)) == 401
    assert asyncio.run(call_app(app, [(b"content-length", b"1e9")], Receiver(1, 1))) == 400
    from agent_ledger import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_body_bytes"):
        ledger.approvals_app(webhook_secret=WEBHOOK_SECRET, max_body_bytes=0)
    with pytest.raises(ConfigurationError, match="audit_interval"):
        ledger.approvals_app(webhook_secret=WEBHOOK_SECRET, audit_interval=-1)


def test_a_flood_of_unsigned_requests_writes_a_few_counted_audit_rows(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    app = ledger.approvals_app(slack_signing_secret=SLACK_SECRET, webhook_secret=WEBHOOK_SECRET)

    async def flood() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://approvals.test") as client:
            for i in range(150):
                r = await client.post("/webhooks/decisions", content=b"{}", headers={"webhook-id": f"m{i}"})
                assert r.status_code == 401
                r = await client.post("/slack/interactions", content=b"payload=x")
                assert r.status_code == 401
            big = b"x" * (300 * 1024)
            for _ in range(20):
                assert (await client.post("/slack/interactions", content=big)).status_code == 413
        # lifespan shutdown writes the counts not yet written
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: dict[str, Any]) -> None:
            pass

        await app({"type": "lifespan"}, receive, send)

    asyncio.run(flood())
    rows = [e for e in ledger.events(workflow_id="-") if e.kind == "inbound_refused"]
    assert len(rows) <= 6  # one as each flood starts, one with the rest of its count at shutdown
    counts: dict[str, int] = {}
    for row in rows:
        assert row.detail is not None
        counts[row.tool] = counts.get(row.tool, 0) + row.detail["count"]
    assert counts == {"approvals.webhook": 150, "approvals.slack": 150, "approvals.app": 20}


def test_audit_interval_zero_audits_every_refusal(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    app = ledger.approvals_app(webhook_secret=WEBHOOK_SECRET, audit_interval=0)
    statuses = asyncio.run(
        post_all(app, {f"r{i}": ("/webhooks/decisions", b"{}", {"webhook-id": f"m{i}"}) for i in range(5)})
    )
    assert set(statuses.values()) == {401}
    rows = [e for e in ledger.events(workflow_id="-") if e.kind == "inbound_refused"]
    assert len(rows) == 5 and all(r.detail and r.detail["count"] == 1 for r in rows)


# -- Slack formatting ------------------------------------------------------------------------------------


def _approval(args: dict[str, Any], **extra: Any) -> Approval:
    now = datetime.now(timezone.utc)
    fields: dict[str, Any] = {
        "approval_id": "apr_" + "0" * 32,
        "key": "v1:" + "0" * 64,
        "workflow_id": "order-`*evil*`-<!channel>",
        "tool": "stripe.charge",
        "payload_hash": "v1:" + "1" * 64,
        "args": args,
        "status": ApprovalStatus.PENDING,
        "approvers": None,
        "requested_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    fields.update(extra)
    return Approval(**fields)


def _mrkdwn_texts(node: Any) -> list[str]:
    """Every piece of text Slack would parse as markup (mrkdwn text objects)."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("type") == "mrkdwn":
            found.append(node["text"])
        for value in node.values():
            found.extend(_mrkdwn_texts(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_mrkdwn_texts(value))
    return found


INJECTION = "```\n*Approved by CFO* <!channel> <https://evil.example|click> &amp;\n```"


def test_slack_message_cannot_be_reformatted_by_arguments() -> None:
    approval = _approval({"memo": INJECTION, INJECTION: 1})
    blocks = request_blocks(approval)
    markup = "\n".join(_mrkdwn_texts(blocks))
    for piece in ("Approved by CFO", "<!channel>", "evil.example", "```", "*evil*"):
        assert piece not in markup
    # The arguments are shown exactly, in a preformatted rich text element (never parsed as markup).
    rich = [b for b in blocks if b["type"] == "rich_text"]
    pre = rich[0]["elements"][1]
    assert pre["type"] == "rich_text_preformatted"
    assert json.loads(pre["elements"][0]["text"]) == approval.args
    decided = _approval(
        {"memo": INJECTION},
        status=ApprovalStatus.REJECTED,
        decided_by="*CFO* <!here>",
        reason=INJECTION,
        decided_at=datetime.now(timezone.utc),
    )
    markup = "\n".join(_mrkdwn_texts(decided_blocks(decided)))
    for piece in ("Approved by CFO", "<!here>", "<!channel>", "CFO"):
        assert piece not in markup


def test_slack_fallback_text_is_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent_ledger.approvals import SlackChannel

    sent: list[dict[str, Any]] = []
    channel = SlackChannel("xoxb-test", "C1")

    def fake_call(method: str, payload: dict[str, Any]) -> dict[str, Any]:
        sent.append(payload)
        return {"ok": True, "channel": "C1", "ts": "1.2"}

    monkeypatch.setattr(channel, "_call", fake_call)
    channel.request(_approval({"a": 1}, tool="<!channel> pay"))
    assert "<!channel>" not in sent[0]["text"] and "&lt;!channel&gt;" in sent[0]["text"]


# -- which allowlist governs -----------------------------------------------------------------------------


def test_an_approval_counts_only_if_its_decider_is_on_the_current_allowlist(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger()
    runs = Runs()
    loose = pending(ledger, runs)  # requested while the tool had no allowlist
    ledger.approve(loose.approval_id, by="intern")
    # The tool now requires the CFO: the intern's approval does not authorise the call.
    strict = pending(ledger, runs, approvers={"cfo"})
    assert strict.approval_id != loose.approval_id and strict.approvers == ["cfo"]
    assert runs.n == 0
    used = ledger.approval(loose.approval_id)
    assert used is not None and used.status is ApprovalStatus.APPROVED and used.consumed_at is None
    ledger.approve(strict.approval_id, by="cfo")
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True, approvers={"cfo"}) == "charged"
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True, approvers={"cfo"}) == "charged"
    assert runs.n == 1


def test_an_approval_by_someone_still_allowed_is_used(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Runs()
    loose = pending(ledger, runs)
    ledger.approve(loose.approval_id, by="cfo")
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True, approvers={"cfo", "ceo"}) == "charged"
    assert runs.n == 1
    used = ledger.approval(loose.approval_id)
    assert used is not None and used.consumed_at is not None


def test_allowlist_rule_is_enforced_across_processes_view(make_ledger: Callable[..., Ledger]) -> None:
    """A second ledger (another process's view) with the stricter list refuses the old approval too."""
    first, second = make_ledger(), make_ledger()
    runs = Runs()
    loose = pending(first, runs)
    first.approve(loose.approval_id, by="intern")
    with pytest.raises(ApprovalPending):
        second.run(CHARGE, handler=runs.charge, requires_approval=True, approvers={"cfo"})
    assert runs.n == 0


def test_hostile_resolve_is_refused_before_anything_is_written(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import LedgerError

    ledger = make_ledger()
    runs = Runs()
    ledger.run(CHARGE, handler=runs.charge)
    key = ledger.effects()[0].key
    for bad in (
        lambda: ledger.resolve(key, result="x", by=NUL),
        lambda: ledger.resolve(key, result="x", by=LONG),
        lambda: ledger.resolve(key, result="x", by="ops", reason=SURROGATE),
    ):
        with pytest.raises(InvalidArguments):
            bad()
    with pytest.raises(LedgerError, match="no effect"):
        ledger.resolve(NUL, result="x", by="ops")
    assert [e.kind for e in ledger.events(key=key)] == ["succeeded"]  # no resolution recorded
    assert runs.n == 1


def test_unstorable_approver_names_are_refused_when_declared(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import ConfigurationError

    ledger = make_ledger()
    runs = Runs()
    for names in ({NUL}, {LONG}, {"cfo", SURROGATE}):
        with pytest.raises(ConfigurationError, match="approvers must be"):
            ledger.run(CHARGE, handler=runs.charge, requires_approval=True, approvers=names)
    assert runs.n == 0 and ledger.pending_approvals() == []


@given(st.text() | st.binary().map(repr))
def test_printable_is_always_storable(value: str) -> None:
    from agent_ledger._text import printable, text_problem

    shown = printable(value, 50)
    assert text_problem(shown, 50 * 10 + 40, allow_empty=True) is None  # escapes may lengthen it
    assert all(c.isprintable() or c in "\n\t" for c in shown)  # no terminal escapes, no bidi overrides
    if value.isprintable() and len(value) <= 50 and not any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        assert shown == value  # ordinary text is shown as it is


@given(st.text())
def test_storable_escapes_only_what_cannot_be_stored(value: str) -> None:
    from agent_ledger._text import storable, text_problem

    shown = storable(value)
    assert text_problem(shown, len(shown), allow_empty=True) is None
    if "\x00" not in value and "\\" not in value and text_problem(value, len(value), allow_empty=True) is None:
        assert shown == value  # everything storable (accents, no-break spaces, newlines) is kept as it is


def test_lookups_for_values_that_cannot_exist_find_nothing(make_ledger: Callable[..., Ledger]) -> None:
    """Postgres refuses a query holding NUL (StorageError); SQLite finds nothing. Both find nothing now."""
    ledger = make_ledger()
    runs = Runs()
    ledger.run(CHARGE, handler=runs.charge)
    for bad in (NUL, SURROGATE, LONG):
        assert ledger.effect(bad) is None
        assert ledger.history(bad) == []
        assert ledger.effects(tool=bad) == []
        assert ledger.events(workflow_id=bad) == [] and ledger.events(key=bad) == []
        assert ledger.pending_approvals(workflow_id=bad) == [] and ledger.pending_approvals(tool=bad) == []
        assert ledger.approval(bad) is None
    assert [r.tool for r in ledger.history(CHARGE.workflow_id)] == ["stripe.charge"] and runs.n == 1


# ---- the web console (issue 15) -----------------------------------------------------------------

CONSOLE_TOKEN = "ops-token-1f2e3d4c5b6a"
ConsoleRequest = tuple[str, str, dict[str, str], list[bytes]]


async def console_call(app: Any, method: str, target: str, headers: dict[str, str], chunks: list[bytes]) -> int:
    """One request straight into the ASGI app, with the path, headers and body exactly as given."""
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(path, errors="surrogateescape"),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("console.test", 80),
    }
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    queue = queue or [{"type": "http.request", "body": b"", "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


def console_battery(approval_id: str, key: str) -> dict[str, ConsoleRequest]:
    auth = {"authorization": f"Bearer {CONSOLE_TOKEN}"}
    form = {**auth, "content-type": "application/x-www-form-urlencoded"}
    out: dict[str, ConsoleRequest] = {}
    approve, resolve = f"/approvals/{approval_id}/approve", f"/effects/{key}/resolve"
    for label, raw in (("nul", "a%00b"), ("long", "x" * 300), ("surrogate", "a%ED%A0%80b"), ("latin1", "a%FFb")):
        out[f"approve-id-{label}"] = ("POST", f"/approvals/{raw}/approve", form, [b"reason=x"])
        out[f"reject-id-{label}"] = ("POST", f"/approvals/{raw}/reject", form, [b"reason=x"])
        out[f"resolve-key-{label}"] = ("POST", f"/effects/{raw}/resolve", form, [b"outcome=retry&value="])
        out[f"workflow-{label}"] = ("GET", f"/workflows/{raw}", auth, [])
        text = "y" * 5000 if label == "long" else raw  # 300 characters are a fine reason or error
        out[f"reason-{label}"] = ("POST", approve, form, [f"reason={text}".encode()])
        out[f"error-value-{label}"] = ("POST", resolve, form, [f"outcome=error&value={text}".encode()])
        if label != "long":  # a long result is a result
            out[f"result-value-{label}"] = ("POST", resolve, form, [f'outcome=result&value="{raw}"'.encode()])
        out[f"login-{label}"] = ("POST", "/login", form, [f"user={raw}&token={raw}".encode()])
        out[f"cursor-{label}"] = ("GET", f"/workflows?cursor={raw}", auth, [])
        out[f"status-{label}"] = ("GET", f"/workflows?status={raw}", auth, [])
    out["unknown-approval"] = ("POST", "/approvals/apr_0000000000000000/approve", form, [b"reason=x"])
    out["unknown-effect"] = ("POST", "/effects/v1:0000/resolve", form, [b"outcome=retry&value="])
    out["reject-huge-reason"] = ("POST", f"/approvals/{approval_id}/reject", form, [b"reason=" + b"y" * 5000])
    out["non-utf8-body"] = ("POST", approve, form, [b"reason=\xff\xfe"])
    out["json-body"] = ("POST", approve, {**auth, "content-type": "application/json"}, [b'{"reason": "x"}'])
    out["declared-huge"] = ("POST", approve, {**form, "content-length": str(10**9)}, [b"reason=x"])
    out["bad-content-length"] = ("POST", approve, {**form, "content-length": "12abc"}, [b"reason=x"])
    out["streamed-huge"] = ("POST", approve, form, [b"reason=" + b"z" * 40_000, b"z" * 40_000])
    out["twice"] = ("POST", resolve, form, [b"outcome=retry&outcome=result&value=1"])
    out["many-fields"] = ("POST", approve, form, [b"&".join(b"f%d=1" % i for i in range(50))])
    out["bad-json"] = ("POST", resolve, form, [b"outcome=result&value=%7Bnot+json"])
    out["deep-json"] = ("POST", resolve, form, [b"outcome=result&value=" + b"%5B" * 20_000])
    out["no-outcome"] = ("POST", resolve, form, [b"value=1"])
    out["bad-outcome"] = ("POST", resolve, form, [b"outcome=%3Cscript%3E&value=1"])
    out["empty-error"] = ("POST", resolve, form, [b"outcome=error&value="])
    out["result-escaped-nul"] = ("POST", resolve, form, [b"outcome=result&value=%22a%5Cu0000b%22"])
    out["result-escaped-surrogate"] = ("POST", resolve, form, [b"outcome=result&value=%22a%5Cud800b%22"])
    for bad in ("limit=abc", "limit=-1", "limit=" + "9" * 30, "since=forever", "since=1e400s", "since=-5m"):
        out[f"workflows-{bad[:14]}"] = ("GET", f"/workflows?{bad}", auth, [])
    out["auth-latin1"] = ("GET", "/", {"authorization": "Bearer \xff\xfe"}, [])
    out["auth-huge"] = ("GET", "/", {"authorization": "Bearer " + "t" * 100_000}, [])
    out["cookie-garbage"] = ("GET", "/", {"cookie": 'agent_ledger_console="\x00\\'}, [])
    out["cookie-huge"] = ("GET", "/", {"cookie": "agent_ledger_console=" + "c" * 10_000}, [])
    out["unauthenticated-approve"] = ("POST", approve, {"content-type": "application/x-www-form-urlencoded"}, [b""])
    return out


def test_hostile_console_requests_get_4xx_and_change_nothing(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import ConsoleAuth, Status

    ledger = make_ledger()
    runs = Runs()
    approval = pending(ledger, runs)

    def crash(order: str) -> None:
        runs.n += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ledger.run(ToolCall(workflow_id="order-9", tool="email.send", args={"order": "o9"}), crash)
    (unknown,) = ledger.effects(status="unknown")
    app = ledger.console_app(auth=ConsoleAuth({"ops": CONSOLE_TOKEN}))
    battery = console_battery(approval.approval_id, unknown.key)
    statuses = {name: asyncio.run(console_call(app, *request)) for name, request in battery.items()}
    assert {name: s for name, s in statuses.items() if not 400 <= s < 500} == {}
    assert statuses["declared-huge"] == statuses["streamed-huge"] == 413 and statuses["json-body"] == 415
    assert statuses["unknown-approval"] == 409 and statuses["unknown-effect"] == 404
    assert statuses["unauthenticated-approve"] == statuses["auth-huge"] == statuses["cookie-garbage"] == 401
    still = ledger.approval(approval.approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and still.approved_by == []
    record = ledger.effect(unknown.key)
    assert record is not None and record.status is Status.UNKNOWN
    assert runs.n == 1 and [e.kind for e in ledger.events(key=unknown.key)] == ["unknown"]
    # The console still works for a genuine decision.
    good = ("POST", f"/approvals/{approval.approval_id}/approve", {"authorization": f"Bearer {CONSOLE_TOKEN}"}, [])
    assert asyncio.run(console_call(app, *good)) == 200
    assert ledger.run(CHARGE, handler=runs.charge, requires_approval=True) == "charged"
    assert runs.n == 2
