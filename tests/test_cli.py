"""The agent-ledger command: demo, history, show, resolve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent_ledger import Ledger, ToolCall


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_ledger", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        check=False,
    )


def test_demo_runs_the_charge_once(tmp_path: Path) -> None:
    out = cli("demo", "--db", str(tmp_path / "demo.db"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "charge_customer ran 1 time(s) and send_receipt 1 time(s) across 4 agent runs" in out.stdout
    assert "OK: the handler ran once." in out.stdout
    rec = Ledger(f"sqlite:///{tmp_path / 'demo.db'}").history("order-123")
    assert [(r.tool, r.status.value, r.attempts, r.replays) for r in rec] == [
        ("stripe.charge", "succeeded", 1, 3),
        ("email.send_receipt", "succeeded", 1, 0),
    ]


def test_history_and_show(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = Ledger(url)
    led.run(ToolCall(workflow_id="wf", tool="stripe.charge", args={"amount": 5}), handler=lambda amount: amount)
    led.close()
    table = cli("history", "wf", "--url", url)
    assert table.returncode == 0 and "stripe.charge" in table.stdout and "succeeded" in table.stdout
    data = json.loads(cli("history", "wf", "--url", url, "--json").stdout)
    assert data[0]["result"] == 5 and data[0]["status"] == "succeeded"
    shown = json.loads(cli("show", data[0]["key"], "--url", url, "--json").stdout)
    assert shown["key"] == data[0]["key"]
    missing = cli("show", "v1:nope", "--url", url)
    assert missing.returncode == 1 and "no effect" in missing.stderr
    bad = cli("history", "wf", "--url", "mysql://x/y")
    assert bad.returncode == 2 and "supports postgresql" in bad.stderr


def test_reading_commands_refuse_a_missing_sqlite_file_and_bad_outputs(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    out = cli("history", "wf", "--url", missing)
    assert out.returncode == 2 and "no ledger database" in out.stderr
    assert not (tmp_path / "typo.db").exists()
    url = f"sqlite:///{tmp_path / 'l.db'}"
    Ledger(url).run(ToolCall(workflow_id="wf", tool="t", args={}), handler=lambda: 1)
    bad = cli("export", "--url", url, "--output", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert bad.returncode == 2 and "cannot write" in bad.stderr


def _story_db(tmp_path: Path) -> tuple[str, dict[str, int]]:
    """A SQLite ledger with three workflows: one told in full, one waiting for a person, one hostile."""
    from agent_ledger import ApprovalPending

    url = f"sqlite:///{tmp_path / 'story.db'}"
    led = Ledger(url, redaction_key="k" * 32)
    runs = {"refund": 0}

    def refund(amount: int, card: str) -> dict[str, int]:
        runs["refund"] += 1
        return {"amount": amount}

    call = ToolCall(workflow_id="order-1", tool="payments.refund", args={"amount": 10000, "card": "4242"})
    opts: dict[str, object] = {"requires_approval": True, "redact": ["card"]}
    try:
        led.run(call, refund, **opts)  # type: ignore[arg-type]
    except ApprovalPending as e:
        led.approve(e.approval_id, by="alice", reason="refund confirmed " + "x" * 120)
    led.run(call, refund, **opts)  # type: ignore[arg-type]
    led.run(call, refund, **opts)  # type: ignore[arg-type]
    wait = ToolCall(workflow_id="order-2", tool="wire", args={"to": "acct"})
    with pytest.raises(ApprovalPending):
        led.run(wait, lambda to: to, requires_approval=True)
    evil = ToolCall(workflow_id="evil\x1b[2J" + "w" * 60, tool="t\x1b]0;pwned\x07" + "n" * 90, args={"a": 1})
    led.run(evil, lambda a: a)
    led.close()
    return url, runs


def test_workflow_prints_the_timeline_on_80_columns(tmp_path: Path) -> None:
    url, runs = _story_db(tmp_path)
    assert runs["refund"] == 1
    out = cli("workflow", "order-1", "--url", url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    text = out.stdout
    order = [
        text.index(w) for w in ("approval requested", "approved (1 of 1)", "approval consumed", "attempt 1 succeeded")
    ]
    assert order == sorted(order)
    assert "by alice" in text and "replayed" in text and '"card": "[redacted]"' in text
    assert "4242" not in text and "hmac-sha256" not in text
    data = json.loads(cli("workflow", "order-1", "--url", url, "--json").stdout)
    assert data["workflow_id"] == "order-1" and data["counts"] == {"succeeded": 1}
    assert [e["kind"] for e in data["entries"]][:2] == ["approval_requested", "approved"]
    missing = cli("workflow", "nobody", "--url", url)
    assert missing.returncode == 1 and "nothing recorded" in missing.stderr


def test_workflow_output_escapes_terminal_control_characters(tmp_path: Path) -> None:
    url, _ = _story_db(tmp_path)
    listed = cli("workflows", "--url", url)
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "\\x1b" in listed.stdout
    evil = "evil\x1b[2J" + "w" * 60
    out = cli("workflow", evil, "--url", url)
    assert out.returncode == 0 and "\x1b" not in out.stdout and "\x07" not in out.stdout


def test_workflows_lists_filters_and_pages(tmp_path: Path) -> None:
    url, _ = _story_db(tmp_path)
    out = cli("workflows", "--url", url)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["workflow", "last", "activity", "person", "effects"]
    assert [line.split()[0] for line in lines[1:]][1:] == ["order-2", "order-1"]
    assert "1 pending approval(s)" in out.stdout
    waiting = cli("workflows", "--status", "needs_human", "--url", url)
    assert [line.split()[0] for line in waiting.stdout.splitlines()[1:]] == ["order-2"]
    done = json.loads(cli("workflows", "--status", "succeeded", "--since", "1h", "--json", "--url", url).stdout)
    assert {w["workflow_id"] for w in done["workflows"]} >= {"order-1"} and done["next_cursor"] is None
    first = json.loads(cli("workflows", "--limit", "1", "--json", "--url", url).stdout)
    assert len(first["workflows"]) == 1 and first["next_cursor"]
    text = cli("workflows", "--limit", "1", "--url", url).stdout
    assert f"more: agent-ledger workflows --cursor {first['next_cursor']}" in text
    second = json.loads(
        cli("workflows", "--limit", "1", "--cursor", first["next_cursor"], "--json", "--url", url).stdout
    )
    assert second["workflows"][0]["workflow_id"] == "order-2"
    assert cli("workflows", "--since", "soon", "--url", url).returncode == 2
    bad_cursor = cli("workflows", "--cursor", "garbage", "--url", url)
    assert bad_cursor.returncode == 1 and "cursor" in bad_cursor.stderr
    assert cli("workflows", "--limit", "0", "--url", url).returncode == 1


def test_show_prints_every_events_details(tmp_path: Path) -> None:
    url, _ = _story_db(tmp_path)
    key = json.loads(cli("workflow", "order-1", "--json", "--url", url).stdout)["effects"][0]["key"]
    out = cli("show", key, "--url", url)
    assert out.returncode == 0
    assert "attempt=None" not in out.stdout and "by=None" not in out.stdout
    events = out.stdout.split("events:")[1]
    assert "approval_requested" in events and "approval_id: apr_" in events and "quorum: 1" in events
    assert "reason: refund confirmed" in events and 'approved_by: ["alice"]' in events
    assert "duration_ms:" in events and "count: 1" in events


def test_console_refuses_to_start_without_authentication(tmp_path: Path) -> None:
    url, _ = _story_db(tmp_path)
    out = cli("console", "--url", url)
    assert out.returncode == 2 and "needs authentication" in out.stderr
    bad = cli("console", "--url", url, "--user", "alice")
    assert bad.returncode == 2 and "NAME:TOKEN" in bad.stderr
    short = cli("console", "--url", url, "--user", "alice:short-secret")
    assert short.returncode == 2 and "short-secret" not in short.stderr + short.stdout
    users = tmp_path / "users"
    users.write_text("# ops\nalice\n", encoding="utf-8")
    broken = cli("console", "--url", url, "--users-file", str(users))
    assert broken.returncode == 2 and "expected name:token" in broken.stderr


def test_console_serves_with_a_users_file(tmp_path: Path) -> None:
    import socket
    import time
    import urllib.error
    import urllib.request

    url, _ = _story_db(tmp_path)
    users = tmp_path / "users"
    users.write_text("alice:alice-token-5f2b8c1e9d\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent_ledger",
            "console",
            "--url",
            url,
            "--users-file",
            str(users),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/workflows", headers={"Authorization": "Bearer alice-token-5f2b8c1e9d"}
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert "order-1" in r.read().decode()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "alice-token-5f2b8c1e9d" not in err
