"""The agent-ledger command: demo, history, show, resolve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
