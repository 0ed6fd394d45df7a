"""Audit queries, export, redaction, retention, the testing plugin, OpenTelemetry spans and logs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_ledger import InvalidArguments, Ledger, PayloadMismatch, Status, ToolCall, compute_key
from agent_ledger._flow import utcnow


def seed(ledger: Ledger) -> None:
    def ok(n: int) -> int:
        return n

    def bad(n: int) -> int:
        raise ValueError("no")

    for wf, tool, n in [("a", "t1", 1), ("a", "t2", 2), ("b", "t1", 3)]:
        ledger.run(ToolCall(workflow_id=wf, tool=tool, args={"n": n}), handler=ok)
    with pytest.raises(ValueError):
        ledger.run(ToolCall(workflow_id="b", tool="t3", args={"n": 4}), handler=bad)


def test_filters(ledger: Ledger) -> None:
    before = utcnow()
    seed(ledger)
    assert [r.args["n"] for r in ledger.effects(workflow_id="a")] == [1, 2]
    assert [r.args["n"] for r in ledger.effects(tool="t1")] == [1, 3]
    assert [r.args["n"] for r in ledger.effects(status="failed")] == [4]
    assert [r.args["n"] for r in ledger.effects(status=Status.SUCCEEDED, workflow_id="b")] == [3]
    assert len(ledger.effects(since=before)) == 4 and ledger.effects(until=before) == []
    assert len(ledger.effects(limit=2)) == 2
    assert all(r.events for r in ledger.effects())
    with pytest.raises(InvalidArguments, match="aware datetime"):
        ledger.effects(since=before.replace(tzinfo=None))
    with pytest.raises(InvalidArguments, match=r"status must be one of running, succeeded, .* not .bogus."):
        ledger.effects(status="bogus")


def test_export_json_lines_api_and_cli(ledger: Ledger, db_url: str) -> None:
    seed(ledger)
    out = io.StringIO()
    assert ledger.export(out, workflow_id="b") == 2
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["tool"], x["status"]) for x in lines] == [("t1", "succeeded"), ("t3", "failed")]
    assert lines[1]["error"]["message"] == "no" and lines[1]["events"][0]["kind"] == "failed"
    cli = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "export", "--url", db_url, "--status", "succeeded"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert sorted(json.loads(x)["args"]["n"] for x in cli.stdout.splitlines()) == [1, 2, 3]


def test_redacted_arguments_are_stored_only_as_a_hash(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(redaction_key="s3cret-s3cret-s3cret")
    runs: list[str] = []

    @ledger.tool("pay", redact=["card_number"])
    def pay(card_number: str, amount: int) -> str:
        runs.append(card_number)
        return "paid"

    with ledger.workflow("w"):
        assert pay("4242424242424242", 100) == "paid"
        assert pay("4242424242424242", 100) == "paid"
    (rec,) = ledger.history("w")
    assert rec.args["amount"] == 100
    assert rec.args["card_number"]["$redacted"].startswith("hmac-sha256:")
    assert "4242" not in json.dumps(rec.model_dump(mode="json"))
    # The key covers the value through its keyed hash (a plain hash of the value could be enumerated).
    assert rec.key != compute_key("w", "pay", {"card_number": "4242424242424242", "amount": 100})
    assert rec.key == compute_key("w", "pay", {"card_number": rec.args["card_number"], "amount": 100})
    assert runs == ["4242424242424242"]

    @ledger.tool("pay2", redact=["card_number"], key=["amount"])
    def pay2(card_number: str, amount: int) -> str:
        return "paid"

    with ledger.workflow("w"):
        pay2("4242424242424242", 5)
        with pytest.raises(PayloadMismatch) as info:
            pay2("5555555555554444", 5)
    assert info.value.fields == ["card_number"]


def test_prune_by_age_and_by_tool_retention(ledger: Ledger, db_url: str) -> None:
    runs: list[str] = []

    def work(n: int) -> int:
        runs.append(f"{n}")
        return n

    ledger.run(ToolCall(workflow_id="w", tool="short", args={"n": 1}), handler=work, retention=1.5)
    ledger.run(ToolCall(workflow_id="w", tool="long", args={"n": 2}), handler=work)
    with pytest.raises(ValueError):
        ledger.run(ToolCall(workflow_id="w", tool="x", args={"n": 3}), handler=lambda n: int("x"))
    from _workers import stale_claim

    stale_claim(ledger, ToolCall(workflow_id="w", tool="crashed", args={"n": 9}))
    assert ledger.prune() == 0
    time.sleep(1.6)
    assert ledger.prune() == 1  # only the short-retention tool
    assert sorted(r.tool for r in ledger.history("w")) == ["crashed", "long", "x"]
    cli = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "prune", "--older-than", "0s", "--json", "--url", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {"deleted": 2}
    assert [r.tool for r in ledger.history("w")] == ["crashed"]  # unsettled effects are never pruned
    assert ledger.events(workflow_id="w") == []
    # A pruned call is forgotten: it runs again.
    ledger.run(ToolCall(workflow_id="w", tool="short", args={"n": 1}), handler=work)
    assert runs == ["1", "2", "1"]
    bad = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "prune", "--older-than", "soon", "--url", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_spans_and_structured_logs(make_ledger: Callable[..., Ledger], caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ledger = make_ledger(tracer_provider=provider)
    call = ToolCall(workflow_id="w", tool="stripe.charge", args={"amount": 1})
    with caplog.at_level(logging.DEBUG, logger="agent_ledger"):
        ledger.run(call, handler=lambda amount: "ok")
        ledger.run(call, handler=lambda amount: "ok")
        with pytest.raises(ZeroDivisionError):
            ledger.run(ToolCall(workflow_id="w", tool="div", args={"x": 0}), handler=lambda x: 1 / x)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["agent_ledger stripe.charge", "agent_ledger stripe.charge", "agent_ledger div"]
    attrs: list[dict[str, Any]] = [dict(s.attributes or {}) for s in spans]
    assert attrs[0]["agent_ledger.key"] == compute_key("w", "stripe.charge", {"amount": 1})
    assert (attrs[0]["agent_ledger.outcome"], attrs[0]["agent_ledger.attempt"], attrs[0]["agent_ledger.replay"]) == (
        "executed",
        1,
        False,
    )
    assert (attrs[1]["agent_ledger.outcome"], attrs[1]["agent_ledger.replay"]) == ("replayed", True)
    assert attrs[2]["agent_ledger.outcome"] == "raised ZeroDivisionError"
    assert spans[2].status.status_code.name == "ERROR"
    records = [r for r in caplog.records if hasattr(r, "agent_ledger")]
    assert [r.agent_ledger["outcome"] for r in records] == ["executed", "replayed", "raised ZeroDivisionError"]
    assert [r.levelname for r in records] == ["INFO", "DEBUG", "INFO"]


def test_testing_plugin_gives_isolated_ledgers(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["agent_ledger.testing"]')
    pytester.makepyfile(
        """
        from agent_ledger import ToolCall

        def test_one(ledger):
            runs = []
            call = ToolCall(workflow_id="w", tool="t", args={})
            ledger.run(call, handler=lambda: runs.append(1))
            ledger.run(call, handler=lambda: runs.append(1))
            assert runs == [1]

        def test_two_is_isolated(ledger):
            assert ledger.history("w") == []

        def test_factory_shares_one_database(ledger_factory):
            first, second = ledger_factory(), ledger_factory()
            call = ToolCall(workflow_id="w", tool="t", args={})
            first.run(call, handler=lambda: "once")
            assert second.run(call, handler=lambda: "twice") == "once"
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


GLOBAL_PROVIDER_SCRIPT = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from agent_ledger import Ledger, ToolCall

ledger = Ledger(sys.argv[1], auto_migrate=True)
calls = []
def handler(n):
    calls.append(n)
    return n
ledger.run(ToolCall(workflow_id="w", tool="before", args={"n": 1}), handler=handler)  # no provider yet
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the application sets the global provider after a first call
ledger.run(ToolCall(workflow_id="w", tool="after", args={"n": 2}), handler=handler)
ledger.run(ToolCall(workflow_id="w", tool="after", args={"n": 2}), handler=handler)
print([s.name for s in exporter.get_finished_spans()], calls)
"""


def test_a_global_tracer_provider_set_after_the_first_call_records_the_next_calls(tmp_path: Path) -> None:
    # The ledger reads the API's global provider directly on each call (the public call costs a raised
    # KeyError per call): a provider set later must still be found, and the handler runs once per key.
    url = f"sqlite:///{tmp_path / 'otel.db'}"
    out = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_SCRIPT, url], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['agent_ledger after', 'agent_ledger after'] [1, 2]"
