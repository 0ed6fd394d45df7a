"""Breaks a new user hits first (issue 11): the demo on a reused file, pipes, reading commands that
wrote, a missing Postgres database, LangChain artifacts, dead approval requests, thread pools, and the
first call's duration."""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from agent_ledger import (
    ApprovalPending,
    ApprovalRefused,
    Ledger,
    NoWorkflow,
    PayloadMismatch,
    SchemaMissing,
    StorageError,
    ToolCall,
)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_ledger", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env=_env(),
        check=False,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("AGENT_LEDGER_URL", None)
    return env


def _tables(url: str) -> set[str]:
    engine = create_engine(url.replace("sqlite+aiosqlite", "sqlite"))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- the demo -----------------------------------------------------------------------------------


def test_demo_runs_again_on_a_reused_file_and_refuses_bad_paths(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = cli("demo", "--db", str(db), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli("demo", "--db", str(db), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert "workflow order-124" in again.stdout and "OK: the handler ran once." in again.stdout
    assert "charge_customer ran 1 time(s) and send_receipt 1 time(s) across 4 agent runs" in again.stdout
    led = Ledger(f"sqlite:///{db}")
    for workflow in ("order-123", "order-124"):  # each demo run has its own workflow, each ran once
        assert [(r.tool, r.status.value, r.attempts, r.replays) for r in led.history(workflow)] == [
            ("stripe.charge", "succeeded", 1, 3),
            ("email.send_receipt", "succeeded", 1, 0),
        ]
    led.close()

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    for bad, says in (
        (tmp_path / "no" / "such" / "dir" / "demo.db", "does not exist"),
        (tmp_path, "is a directory"),
        (text, "cannot use it as the demo's SQLite database"),
    ):
        out = cli("demo", "--db", str(bad), cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert says in out.stderr and "Traceback" not in out.stderr
    assert text.read_text() == "not a database\n"
    assert not (tmp_path / "no").exists()


# -- pipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["export"], ["history", "wf"], ["history", "wf", "--json"]])
def test_piping_into_head_exits_quietly(tmp_path: Path, command: list[str]) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Ledger(url) as led:
        for n in range(250):  # every command prints well over a pipe's buffer (64 KiB)
            call = ToolCall(workflow_id="wf", tool=f"tool.{n}.{'t' * 240}", args={"blob": "x" * 1000})
            led.run(call, handler=lambda blob: len(blob))
    writer = subprocess.Popen(
        [sys.executable, "-m", "agent_ledger", *command, "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert writer.stdout is not None and writer.stderr is not None
    head = subprocess.Popen(["head", "-n", "1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # head holds the only reader: when it exits, the pipe is closed
    first, _ = head.communicate(timeout=120)
    err = writer.stderr.read().decode()
    code = writer.wait(timeout=120)
    assert first.strip()
    assert err == "", err
    assert code == 141


# -- reading never writes -----------------------------------------------------------------------

COMMANDS = [
    ["history", "wf"],
    ["history", "wf", "--json"],
    ["show", "v1:nope"],
    ["export"],
    ["approvals", "list"],
    ["approvals", "approve", "apr_nope", "--by", "alice"],
    ["approvals", "reject", "apr_nope", "--by", "alice", "--reason", "no"],
    ["prune", "--older-than", "1d"],
    ["recover"],
    ["resolve", "v1:nope", "--retry", "--by", "alice"],
]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_commands_leave_a_sqlite_file_without_the_tables_byte_identical(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    other = data / "other.db"  # somebody else's SQLite database
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.commit()
    conn.close()
    (data / "empty.db").write_bytes(b"")
    (data / "notes.txt").write_text("not a database\n")
    before = _snapshot(data)
    for name, says in (("other.db", "has no ledger tables"), ("empty.db", "has no ledger tables"), ("notes.txt", "")):
        for command in COMMANDS:
            out = cli(*command, "--url", f"sqlite:///{data / name}")
            assert out.returncode in (2, 3), (name, command, out.stdout, out.stderr)
            assert "Traceback" not in out.stderr and says in out.stderr, (name, command, out.stderr)
        assert _snapshot(data) == before, name  # byte-identical, and no -wal / -shm files beside them
    missing = cli("history", "wf", "--url", f"sqlite:///{data / 'typo.db'}")
    assert missing.returncode == 2 and not (data / "typo.db").exists()


def test_no_command_but_migrate_creates_tables(db_url: str, tmp_path: Path) -> None:
    """On a database without the ledger's tables, and with a mistyped --table-prefix, every command
    says so (non-zero exit) and creates nothing; ``migrate`` is the one command that creates them."""
    url = db_url
    if url.startswith("sqlite"):  # an existing SQLite file with another application's table
        conn = sqlite3.connect(make_url(url).database or "")
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
        conn.close()
    else:
        engine = create_engine(url)
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE notes (body TEXT)")
        engine.dispose()
    assert _tables(url) == {"notes"}
    for command in COMMANDS:
        out = cli(*command, "--url", url)
        assert out.returncode == 3, (command, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "migrate" in out.stderr
        assert _tables(url) == {"notes"}, command
    assert cli("migrate", "--url", url).returncode == 0
    created = _tables(url)
    assert "agent_ledger_effects" in created and "agent_ledger_events" in created
    for command in COMMANDS:
        out = cli(*command, "--url", url, "--table-prefix", "agent_ledgr_")
        assert out.returncode == 3, (command, out.stdout, out.stderr)
        assert "agent_ledgr_" in out.stderr and "--table-prefix" in out.stderr, out.stderr
        assert _tables(url) == created, command
    assert cli("history", "wf", "--url", url).returncode == 0


# -- a Postgres database that does not exist ----------------------------------------------------


def test_migrate_names_a_missing_postgres_database(pg_url: str) -> None:
    name = "no_such_db_" + uuid.uuid4().hex[:8]
    url = make_url(pg_url).set(database=name, password="s3cret-pw").render_as_string(hide_password=False)
    for command in (["migrate"], ["history", "wf"]):
        out = cli(*command, "--url", url)
        assert out.returncode == 3, out.stdout + out.stderr
        assert f'database "{name}" does not exist' in out.stderr and "createdb" in out.stderr, out.stderr
        assert "s3cret" not in out.stderr + out.stdout and "Traceback" not in out.stderr
    led = Ledger(url)
    with pytest.raises(StorageError) as info:
        led.history("wf")
    assert not isinstance(info.value, SchemaMissing) and "CREATE DATABASE" in str(info.value)
    led.close()


# -- LangChain artifacts ------------------------------------------------------------------------


def test_langchain_artifact_is_kept_and_replayed(make_ledger: Callable[..., Ledger]) -> None:
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool

    from agent_ledger.adapters.langchain import wrap_tool

    runs: list[str] = []

    @tool(response_format="content_and_artifact")
    def search(query: str) -> tuple[str, dict[str, Any]]:
        """Search the catalogue."""
        runs.append(query)
        return f"2 hits for {query}", {"ids": [7, 9], "query": query}

    def call(n: int) -> dict[str, Any]:
        return {"type": "tool_call", "name": "search", "args": {"query": "lamp"}, "id": f"c{n}"}

    one, two = make_ledger(), make_ledger()  # two ledgers: like two processes on one database
    first = wrap_tool(one, search)
    assert first.response_format == "content_and_artifact"
    with one.workflow("lc-artifacts"):
        fresh = first.invoke(call(1))
        replayed = first.invoke(call(2))
    with two.workflow("lc-artifacts"):
        from_db = wrap_tool(two, search).invoke(call(3))
    for n, msg in enumerate((fresh, replayed, from_db), start=1):
        assert isinstance(msg, ToolMessage) and msg.tool_call_id == f"c{n}"
        assert msg.content == "2 hits for lamp" and msg.artifact == {"ids": [7, 9], "query": "lamp"}
    assert runs == ["lamp"]


async def test_langchain_artifact_is_kept_async(ledger: Ledger) -> None:
    from langchain_core.tools import tool

    from agent_ledger.adapters.langchain import wrap_tool

    runs: list[str] = []

    @tool(response_format="content_and_artifact")
    async def search(query: str) -> tuple[str, list[int]]:
        """Search the catalogue."""
        runs.append(query)
        return "found", [1, 2]

    safe = wrap_tool(ledger, search)
    async with ledger.workflow("lc-async"):
        for n in range(3):
            msg = await safe.ainvoke({"type": "tool_call", "name": "search", "args": {"query": "q"}, "id": f"a{n}"})
            assert msg.content == "found" and msg.artifact == [1, 2]
    assert runs == ["q"]
    await ledger.aclose()


# -- approval requests that can never run -------------------------------------------------------


def test_a_request_whose_key_ran_with_other_arguments_cannot_be_decided(ledger: Ledger) -> None:
    runs: list[int] = []

    def charge(order: str, amount: int) -> int:
        runs.append(amount)
        return amount

    def call(amount: int) -> ToolCall:
        return ToolCall(workflow_id="wf", tool="stripe.charge", args={"order": "o1", "amount": amount})

    opts: dict[str, Any] = {"key": ["order"], "requires_approval": True}
    with pytest.raises(ApprovalPending) as small:
        ledger.run(call(100), handler=charge, **opts)
    with pytest.raises(ApprovalPending) as large:
        ledger.run(call(200), handler=charge, **opts)
    assert {a.approval_id for a in ledger.pending_approvals()} == {small.value.approval_id, large.value.approval_id}
    ledger.approve(large.value.approval_id, by="alice")
    assert ledger.run(call(200), handler=charge, **opts) == 200
    assert runs == [200]

    # The 100 request can never be used (its key ran with amount=200): it is superseded, not listed,
    # and deciding it is refused with a reason, audited.
    assert ledger.pending_approvals() == []
    dead = small.value.approval_id
    for decide in (lambda: ledger.approve(dead, by="alice"), lambda: ledger.reject(dead, by="bob", reason="no")):
        with pytest.raises(ApprovalRefused) as refused:
            decide()
        assert refused.value.why == "superseded: the call ran with other arguments"
    refusals = [e for e in ledger.events(workflow_id="wf") if e.kind == "approval_refused"]
    assert [(e.owner, (e.detail or {}).get("approval_id")) for e in refusals] == [("alice", dead), ("bob", dead)]
    assert all("the call ran with other arguments" in (e.detail or {})["why"] for e in refusals)
    stored = ledger.approval(dead)
    assert stored is not None and stored.status.value == "superseded"
    with pytest.raises(PayloadMismatch):
        ledger.run(call(100), handler=charge, **opts)
    assert runs == [200]


# -- thread pools inside a workflow -------------------------------------------------------------


def test_a_tool_in_a_thread_pool_says_how_and_wf_submit_works(ledger: Ledger) -> None:
    runs: list[tuple[str | None, int]] = []
    lock = threading.Lock()

    @ledger.tool("stripe.charge")
    def charge(amount: int) -> int:
        from agent_ledger import current_workflow

        with lock:
            runs.append((current_workflow(), amount))
        return amount

    with (
        ledger.workflow("order-1"),
        concurrent.futures.ThreadPoolExecutor(4) as pool,
        pytest.raises(NoWorkflow) as info,
    ):
        pool.submit(charge, 5).result()
    message = str(info.value)
    assert "thread" in message and "wf.submit(executor, fn" in message and "copy_context().run" in message
    assert runs == []

    # Two workflows fan out on the same pool at once: each call runs in its own workflow, once.
    barrier = threading.Barrier(2)

    def fan_out(workflow: str) -> list[int]:
        with ledger.workflow(workflow) as wf:
            barrier.wait()
            futures = [wf.submit(pool, charge, n) for n in (1, 2, 3, 1, 2, 3)]
            return [f.result() for f in futures]

    with concurrent.futures.ThreadPoolExecutor(8) as pool, concurrent.futures.ThreadPoolExecutor(2) as outer:
        results = list(outer.map(fan_out, ["order-a", "order-b"]))
    assert results == [[1, 2, 3, 1, 2, 3]] * 2
    assert sorted(runs) == sorted((w, n) for w in ("order-a", "order-b") for n in (1, 2, 3))
    # The documented manual pattern works as well (and replays).
    with ledger.workflow("order-a"), concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert pool.submit(contextvars.copy_context().run, charge, 3).result() == 3
    assert len(runs) == 6
    for workflow in ("order-a", "order-b"):
        assert sorted(r.status.value for r in ledger.history(workflow)) == ["succeeded"] * 3
    # A workflow object that was not entered submits into its own workflow too.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        later = ledger.workflow("order-c")
        assert [later.submit(pool, charge, 4).result() for _ in range(2)] == [4, 4]
    assert runs[6:] == [("order-c", 4)]


# -- the first call's duration ------------------------------------------------------------------

_FIRST_CALL = """
import sys, time
from agent_ledger import Ledger, ToolCall
url, wait = sys.argv[1], float(sys.argv[2])
runs = []
def handler(n):
    runs.append(n)
    if wait:
        time.sleep(wait)
    return n
led = Ledger(url, auto_migrate=True)
led.run(ToolCall(workflow_id="wf", tool="t", args={"n": 1}), handler=handler)
(record,) = led.history("wf")
event = [e for e in record.events if e.kind == "succeeded"][0]
print(record.duration, event.detail["duration_ms"], len(runs))
led.close()
"""


@pytest.mark.parametrize("wait", [0.0, 0.05])
def test_the_first_call_in_a_process_records_the_handler_duration(db_url: str, wait: float) -> None:
    """The first call of a fresh process creates the engine, checks (here: creates) the tables and
    starts the heartbeat thread before the handler runs; none of that is the handler's duration."""
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL, db_url, str(wait)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    seconds, ms, runs = out.stdout.split()
    assert int(runs) == 1
    assert float(seconds) * 1000 == pytest.approx(float(ms), abs=0.01)
    if wait:
        assert float(seconds) >= wait  # the handler's own time is all there
    else:
        assert float(seconds) < 0.05  # a no-op, not the warm-up (a migration takes far longer)


def test_commands_still_read_a_real_ledger(tmp_path: Path) -> None:
    """The read-only check lets a real ledger's file through."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Ledger(url) as led:
        led.run(ToolCall(workflow_id="wf", tool="t", args={"a": 1}), handler=lambda a: a)
    out = cli("history", "wf", "--url", url, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["result"] == 1
    assert cli("approvals", "list", "--url", url).stdout.strip() == "no pending approval requests"
