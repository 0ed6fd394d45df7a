"""Redacted arguments cannot be recovered without the redaction key from anything stored, logged,
traced or sent.

The attack: a 4-digit PIN has 10,000 values. Someone holding a database dump, a webhook body, a log
or a trace (but not the redaction key) hashes every candidate the ways the ledger could have (the
key, the payload hash, a plain hash of the value) and looks for a match. They must find none; and
the PIN's text must not appear in any recorded error, traceback or late completion.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from agent_ledger import ConfigurationError, Effect, Ledger, OutcomeUnknown, PayloadMismatch, ToolCall, _keys
from agent_ledger.approvals import SlackChannel, WebhookChannel

PIN = "4821"
CARD = "4111111111111111"
KEY = "redaction-key-for-tests-0123456789"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HEX = re.compile(r"[0-9a-f]{64}")


class Captured:
    """Bodies sent by the channels, through httpx MockTransports."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def webhook(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.content.decode())
        return httpx.Response(200)

    def slack(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.content.decode())
        return httpx.Response(200, json={"ok": True, "channel": "C1", "ts": "1.2"})


def _attackers_hashes(workflow_id: str, tool: str, others: dict[str, Any], key: list[str] | None) -> dict[str, str]:
    """Every hash an attacker without the redaction key can compute, for each of the 10,000 PINs
    (hashes that do not depend on the PIN, like the key of a tool keyed on other arguments, left out)."""
    found: dict[str, str | None] = {}
    for n in range(10_000):
        pin = f"{n:04d}"
        args = {**others, "pin": pin}
        plain = _keys.redacted(pin)  # an unkeyed hash of the value
        for norm in (_keys.normalise(args), {**_keys.normalise(args), "pin": plain}):
            key_args = {k: norm[k] for k in key} if key else norm
            for h in (_keys.compute_key(workflow_id, tool, key_args), _keys.payload_hash(tool, norm)):
                digest = h.split(":", 1)[1]
                found[digest] = pin if found.get(digest, pin) == pin else None
        found[plain["$redacted"].split(":", 1)[1]] = pin
    return {h: p for h, p in found.items() if p is not None}


def test_enumerating_pins_finds_nothing_stored_logged_traced_or_sent(
    make_ledger: Callable[..., Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sent = Captured()
    channels = [
        WebhookChannel(
            "https://hooks.example.test/approvals",
            WEBHOOK_SECRET,
            client=httpx.Client(transport=httpx.MockTransport(sent.webhook)),
        ),
        SlackChannel("xoxb-test", "C1", client=httpx.Client(transport=httpx.MockTransport(sent.slack))),
    ]
    ledger = make_ledger(redaction_key=KEY, tracer_provider=provider, channels=channels)
    runs: list[str] = []

    @ledger.tool("bank.pay", redact=["pin", "card"])
    def pay(pin: str, card: str, amount: int) -> str:
        runs.append(f"pay {pin}")
        return "paid"

    @ledger.tool("bank.check", redact=["pin"])
    def check(pin: str, user: str) -> str:
        runs.append(f"check {pin}")
        raise ValueError(f"PIN {pin} rejected for {user}")

    @ledger.tool("bank.unlock", redact=["pin"], key=["user"])
    def unlock(pin: str, user: str) -> str:
        runs.append(f"unlock {pin}")
        return "unlocked"

    @ledger.tool("bank.transfer", redact=["pin"], requires_approval=True)
    def transfer(pin: str, amount: int) -> str:
        runs.append(f"transfer {pin}")
        return "sent"

    @ledger.tool("bank.late", redact=["pin"])
    def late(pin: str, effect: Effect) -> str:
        runs.append(f"late {pin}")
        # Someone settles the call by hand while it runs: this attempt's failure is fenced off and kept
        # as a late_completion row, which must not hold the PIN either.
        ledger.resolve(effect.key, retry=True, by="ops", force=True)
        raise RuntimeError(f"card locked after PIN {pin}")

    with caplog.at_level(logging.DEBUG, logger="agent_ledger"), ledger.workflow("order-1"):
        assert pay(PIN, CARD, 100) == "paid"
        assert pay(PIN, CARD, 100) == "paid"  # replayed
        with pytest.raises(ValueError):
            check(PIN, "ann")
        unlock(PIN, "ann")
        with pytest.raises(PayloadMismatch) as mismatch:  # the refusal is audited with the payload hash
            unlock("0000", "ann")
        assert mismatch.value.fields == ["pin"]
        from agent_ledger import ApprovalPending

        with pytest.raises(ApprovalPending) as pending:
            transfer(PIN, 50)
        ledger.approve(pending.value.approval_id, by="alice")
        assert transfer(PIN, 50) == "sent"
        with pytest.raises(RuntimeError):
            late(PIN)

    assert runs == ["pay 4821", "check 4821", "unlock 4821", "transfer 4821", "late 4821"]

    # The stored error of the failing handler is scrubbed (message and traceback).
    (checked,) = ledger.effects(tool="bank.check")
    assert checked.error is not None and checked.error.message == "PIN [redacted] rejected for ann"
    assert checked.error.traceback and PIN not in checked.error.traceback
    late_rows = [e for e in ledger.events(workflow_id="order-1") if e.kind == "late_completion"]
    assert len(late_rows) == 1 and late_rows[0].detail is not None
    assert late_rows[0].detail["error"]["message"] == "card locked after PIN [redacted]"

    # Everything an attacker could hold without the key.
    artifacts: list[str] = []
    t = ledger.tables
    with ledger._rt.engine.connect() as conn:
        for table in (t.effects, t.events, t.approvals, t.inbound):
            artifacts += [repr(dict(row)) for row in conn.execute(select(table)).mappings()]
    artifacts += sent.bodies
    artifacts += [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    artifacts += [span.to_json() for span in exporter.get_finished_spans()]
    assert len(sent.bodies) >= 3  # webhook request + decision, Slack post (+ update)
    assert any('"approval.requested"' in b for b in sent.bodies)  # the webhook
    assert any('"blocks"' in b for b in sent.bodies)  # the Slack message
    blob = "\n".join(artifacts)
    assert "hmac-sha256:" in blob  # the redacted args are there, as keyed hashes

    hashes = set(HEX.findall(blob))
    for workflow_id, tool, others, key in [
        ("order-1", "bank.check", {"user": "ann"}, None),
        ("order-1", "bank.unlock", {"user": "ann"}, ["user"]),
        ("order-1", "bank.transfer", {"amount": 50}, None),
        ("order-1", "bank.late", {}, None),
    ]:
        table = _attackers_hashes(workflow_id, tool, others, key)
        recovered = {table[h] for h in hashes if h in table}
        assert recovered == set(), f"{tool}: PIN recovered from {recovered}"
    # The card and the PIN in words never appear (errors, tracebacks, late completions, spans, logs, bodies).
    assert CARD not in blob
    assert f"PIN {PIN}" not in blob and f"'{PIN}'" not in blob and f'"{PIN}"' not in blob


def test_redact_without_a_key_is_refused(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    with pytest.raises(ConfigurationError, match="redaction_key"):

        @ledger.tool("pay", redact=["pin"])
        def pay(pin: str) -> str:
            return "paid"

    runs: list[str] = []
    with pytest.raises(ConfigurationError, match="redaction_key"):
        ledger.run(
            ToolCall(workflow_id="w", tool="pay", args={"pin": PIN}),
            handler=lambda pin: runs.append(pin),
            redact=["pin"],
        )
    assert runs == [] and ledger.effects() == []
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        make_ledger(redaction_key="short")


def test_redacted_call_replays_and_detects_changes_under_the_same_key(make_ledger: Callable[..., Ledger]) -> None:
    """The keyed hashes keep calls deterministic: same PIN replays, another PIN is another call."""
    ledger = make_ledger(redaction_key=KEY)
    other = make_ledger(redaction_key=KEY)  # another process with the same key
    runs: list[str] = []

    def pay(pin: str, amount: int) -> str:
        runs.append(pin)
        return f"paid {amount}"

    call = ToolCall(workflow_id="w", tool="pay", args={"pin": PIN, "amount": 5})
    assert ledger.run(call, handler=pay, redact=["pin"]) == "paid 5"
    assert other.run(call, handler=pay, redact=["pin"]) == "paid 5"
    other.run(ToolCall(workflow_id="w", tool="pay", args={"pin": "1111", "amount": 5}), handler=pay, redact=["pin"])
    assert runs == [PIN, "1111"]
    (rec, _) = ledger.effects(tool="pay")
    expected = _keys.redacted(PIN, KEY.encode())
    assert rec.args == {"pin": expected, "amount": 5}
    assert rec.key == _keys.compute_key("w", "pay", {"pin": expected, "amount": 5})
    assert rec.payload_hash == _keys.payload_hash("pay", {"pin": expected, "amount": 5})


def test_interrupted_and_unreconciled_errors_are_scrubbed(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(redaction_key=KEY)
    PIN = "zq-4821-secret"  # a text no hash or timestamp can contain by chance

    def interrupted(pin: str) -> str:
        raise KeyboardInterrupt(f"stopped at {pin}")

    with pytest.raises(KeyboardInterrupt):
        ledger.run(ToolCall(workflow_id="w", tool="stop", args={"pin": PIN}), handler=interrupted, redact=["pin"])
    (rec,) = ledger.effects(tool="stop")
    assert rec.status.value == "unknown" and rec.error is not None
    assert rec.error.message == "stopped at [redacted]" and PIN not in (rec.error.traceback or "")

    def reconcile(effect: Effect) -> Any:
        raise LookupError(f"no charge for {effect.args['pin']}")

    calls: list[str] = []
    with pytest.raises(OutcomeUnknown) as info:
        ledger.run(
            ToolCall(workflow_id="w", tool="stop", args={"pin": PIN}),
            handler=lambda pin: calls.append(pin),
            redact=["pin"],
            reconcile=reconcile,
        )
    assert calls == [] and PIN not in str(info.value)
    events = ledger.events(workflow_id="w")
    assert PIN not in json.dumps([e.model_dump(mode="json") for e in events])
    assert PIN not in json.dumps(ledger.effects(tool="stop")[0].model_dump(mode="json"))
