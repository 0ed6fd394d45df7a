"""A ledger built before ``os.fork()``: the child's claims are the child's, and stay live after the parent exits.

Real processes: a parent process builds the ledger (and uses it, so pools and threads exist), forks,
and exits; the child runs a slow handler. A second process (this test) then calls the same key. The
child's claim must look live (its process is alive): the handler runs once, nothing becomes
``unknown``, under ``on_crash="retry"`` and under the default policy, on both backends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_ledger import InProgress, Ledger, ToolCall

try:
    from tests._workers import log_line, read_lines
except ImportError:  # pragma: no cover - tests/ itself on sys.path
    from _workers import log_line, read_lines  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

PARENT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from agent_ledger import Ledger, ToolCall

    url, log, go, mode = sys.argv[1:5]

    def line(text):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (text + "\\n").encode())
        os.close(fd)

    def slow(n):
        line(f"start {os.getpid()}")
        while not os.path.exists(go):
            time.sleep(0.01)
        return f"done by {os.getpid()}"

    async def aslow(n):
        line(f"start {os.getpid()}")
        while not os.path.exists(go):
            await asyncio.sleep(0.01)
        return f"done by {os.getpid()}"

    ledger = Ledger(url, auto_migrate=True)
    # Use the ledger in the parent first: pools, the heartbeat thread and the owner id all exist.
    ledger.run(ToolCall(workflow_id="warm-up", tool="warm", args={}), handler=lambda: "warm")
    call = ToolCall(workflow_id="forked", tool="slow", args={"n": 1})
    planned = ledger.run(call, handler=aslow) if mode == "async-planned-before-fork" else None
    line(f"parent {os.getpid()} {ledger.owner}")
    pid = os.fork()
    if pid == 0:
        try:
            if planned is not None:
                out = asyncio.run(planned)
            else:
                out = ledger.run(call, handler=slow)
            line(f"child {os.getpid()} {ledger.owner} {out}")
            ledger.close()
        finally:
            os._exit(0)
    if planned is not None:
        planned.close()
    line(f"forked {pid}")
    # The parent exits now, while the child runs the handler.
    """
)


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("mode", ["sync", "async-planned-before-fork"])
@pytest.mark.parametrize("policy", ["retry", "unknown"])
def test_forked_childs_live_claim_is_not_taken_over_after_the_parent_exits(
    db_url: str, make_ledger: Callable[..., Ledger], tmp_path: Path, policy: str, mode: str
) -> None:
    log = str(tmp_path / "executions.log")
    go = str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as err:  # not a pipe: the child inherits it and outlives the parent
        parent = subprocess.run(
            [sys.executable, "-c", PARENT, db_url, log, go, mode],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=120,
        )
    assert parent.returncode == 0, errors.read_text()
    lines = read_lines(log)
    parent_pid = int(next(x for x in lines if x.startswith("parent ")).split()[1])
    child_pid = int(next(x for x in lines if x.startswith("forked ")).split()[1])
    _wait_for(lambda: any(x.startswith(f"start {child_pid}") for x in read_lines(log)), "the child's handler")
    assert not _alive(parent_pid), "the parent must be gone before the second caller looks"
    assert _alive(child_pid)

    def again(n: int) -> str:
        log_line(log, f"start {os.getpid()}")
        return f"done by {os.getpid()}"

    second = make_ledger()
    call = ToolCall(workflow_id="forked", tool="slow", args={"n": 1})
    try:
        # The child is alive and runs the handler: a second caller waits for it (here: not at all).
        with pytest.raises(InProgress):
            second.run(call, handler=again, on_crash=policy, wait=0)  # type: ignore[arg-type]
        record = second.effect(second.effects(workflow_id="forked")[0].key)
        assert record is not None and record.status.value == "running"
        assert record.owner is not None and f":{child_pid}:" in record.owner
    finally:
        Path(go).touch()
    _wait_for(lambda: any(x.startswith(f"child {child_pid}") for x in read_lines(log)), "the child to finish")

    # Now the recorded result is replayed; the handler ran exactly once, in the child.
    assert second.run(call, handler=again, on_crash=policy) == f"done by {child_pid}"  # type: ignore[arg-type]
    starts = [x for x in read_lines(log) if x.startswith("start ")]
    assert starts == [f"start {child_pid}"]
    record = second.effect(second.effects(workflow_id="forked")[0].key)
    assert record is not None and record.status.value == "succeeded" and record.attempts == 1
    kinds = [e.kind for e in record.events]
    assert "unknown" not in kinds and "marked_unknown" not in kinds and "late_completion" not in kinds, kinds
    child_line = next(x for x in read_lines(log) if x.startswith(f"child {child_pid}")).split()
    parent_owner = next(x for x in read_lines(log) if x.startswith("parent ")).split()[2]
    assert child_line[2] != parent_owner and f":{child_pid}:" in child_line[2]
