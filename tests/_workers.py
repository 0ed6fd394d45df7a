"""Worker processes for the adversarial tests (started with multiprocessing's spawn context).

Every handler appends one line to a log file with a single O_APPEND write, so the parent counts
executions across processes (and across kills) exactly.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from typing import Any

from openai.types.chat import ChatCompletion

from agent_ledger import Effect, InProgress, Ledger, LedgerError, StorageError, ToolCall, _keys
from agent_ledger._flow import utcnow


def stale_claim(led: Ledger, call: ToolCall, owner: str = "elsewhere:4242:deadbeef", ago: float = 60) -> str:
    """A claim left by a worker on another host that died ``ago`` seconds ago (negative: lease still live)."""
    args = _keys.normalise(call.args)
    key = _keys.compute_key(call.workflow_id, call.tool, args)
    then = utcnow() - dt.timedelta(seconds=ago)
    led._rt.do(
        led._rt.store.claim_new(
            key=key,
            workflow_id=call.workflow_id,
            tool=call.tool,
            payload_hash=_keys.payload_hash(call.tool, args),
            args=args,
            owner=owner,
            lease_expires_at=then,
            now=then,
        )
    )
    return key


def log_line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def race(url: str, rounds: int, barrier: Any, results: Any, log: str) -> None:
    """Race the other workers on one key per round; report what each call returned."""
    ledger = Ledger(url, lease=10, wait=30)
    pid = os.getpid()

    def handler(r: int, effect: Effect) -> dict[str, Any]:
        log_line(log, f"{r} {pid}")
        time.sleep(0.005)
        return {"round": r, "winner": pid, "attempt": effect.attempt}

    for r in range(rounds):
        barrier.wait(timeout=60)
        call = ToolCall(workflow_id=f"race-{r}", tool="race", args={"r": r})
        results.put((r, pid, ledger.run(call, handler=handler)))
    ledger.close()


def victim(url: str, workflow: str, log: str, work_seconds: float, lease: float, on_crash: str, results: Any) -> None:
    """Run one call whose handler takes a while; the parent may SIGKILL or SIGSTOP us mid-way."""
    ledger = Ledger(url, lease=lease)

    def handler(n: int) -> str:
        log_line(log, f"start {os.getpid()}")
        time.sleep(work_seconds)
        log_line(log, f"done {os.getpid()}")
        return f"by {os.getpid()}"

    try:
        out = ledger.run(
            ToolCall(workflow_id=workflow, tool="victim", args={"n": 1}),
            handler=handler,
            on_crash=on_crash,  # type: ignore[arg-type]
        )
        results.put(("ok", out))
    except LedgerError as e:
        results.put(("error", type(e).__name__))
    ledger.close()


def agent(url: str, log: str, die_after: int | None) -> None:
    """A three-step agent; SIGKILLs itself after step `die_after` (as a crash would)."""
    ledger = Ledger(url)

    def tool(name: str) -> Any:
        @ledger.tool(name)
        def step(order: str) -> str:
            log_line(log, name)
            return f"{name} done for {order}"

        return step

    steps = [tool("reserve"), tool("charge"), tool("ship")]
    with ledger.workflow("order-777"):
        for i, step in enumerate(steps, start=1):
            step("order-777")
            if die_after == i:
                os.kill(os.getpid(), signal.SIGKILL)
    ledger.close()


def steady(url: str, calls: int, log: str, results: Any) -> None:
    """Make `calls` calls one after another, retrying through database outages."""
    ledger = Ledger(url, lease=1.0, wait=5)

    def handler(i: int) -> int:
        log_line(log, str(i))
        time.sleep(0.01)
        return i * i

    for i in range(calls):
        call = ToolCall(workflow_id="steady", tool="square", args={"i": i})
        deadline = time.monotonic() + 60
        while True:
            try:
                out = ledger.run(call, handler=handler)
                results.put((i, "ok", out))
                break
            except StorageError as e:
                results.put((i, "storage_error", str(e)[:300]))
            except InProgress:
                pass
            except LedgerError as e:
                results.put((i, type(e).__name__, str(e)[:300]))
                break
            if time.monotonic() > deadline:
                results.put((i, "gave_up", ""))
                break
            time.sleep(0.2)
    ledger.close()


def sweeper(url: str, barrier: Any, results: Any) -> None:
    """One of several concurrent recovery sweepers."""
    ledger = Ledger(url)
    ledger._rt.ensure_schema()
    barrier.wait(timeout=60)
    report = ledger.recover(batch_size=5)
    results.put((os.getpid(), report.marked_unknown))
    ledger.close()


def decide_approval(url: str, approval_id: str, decision: str, who: str, barrier: Any, results: Any) -> None:
    """One of several processes deciding the same approval at the same moment."""
    from agent_ledger import ApprovalRefused

    ledger = Ledger(url)
    ledger._rt.ensure_schema()
    barrier.wait(timeout=60)
    try:
        if decision == "approve":
            ledger.approve(approval_id, by=who)
        else:
            ledger.reject(approval_id, by=who, reason=f"{who} says no")
        results.put((who, decision, "won"))
    except ApprovalRefused as e:
        results.put((who, decision, e.why))
    ledger.close()


def approval_call(url: str, log: str, amount: int, results: Any) -> None:
    """Call an approval-gated charge once; report ApprovalPending's id or the result."""
    from agent_ledger import ApprovalPending

    ledger = Ledger(url)

    @ledger.tool("stripe.charge", requires_approval=True, approvers={"alice"})
    def charge(customer: str, amount: int) -> dict[str, Any]:
        log_line(log, f"charge {amount} {os.getpid()}")
        return {"charged": amount}

    with ledger.workflow("order-456"):
        try:
            results.put(("ok", charge("cus_123", amount)))
        except ApprovalPending as e:
            results.put(("pending", e.approval_id))
    ledger.close()


def scripted_completion(run_no: int, turn: int) -> Any:
    """A scripted 'model': a real ChatCompletion that answers differently in every run."""
    if turn == 0:
        amount = 100 if run_no == 1 else 250  # a resumed agent asking again would get another answer
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_run{run_no}",
                    "type": "function",
                    "function": {"name": "charge", "arguments": f'{{"customer": "cus_1", "amount": {amount}}}'},
                }
            ],
        }
    else:
        message = {"role": "assistant", "content": f"Done (run {run_no})."}
    return ChatCompletion.model_validate(
        {
            "id": f"chatcmpl-{run_no}-{turn}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        }
    )


def chat_agent(url: str, log: str, run_no: int, die_after_charge: bool, record_turns: bool) -> None:
    """An agent loop: ask the model, run its tool call, ask again. SIGKILLs itself after the charge."""
    ledger = Ledger(url)

    def ask(turn: int) -> ChatCompletion:
        log_line(log, f"model run{run_no} turn{turn}")
        completion: ChatCompletion = scripted_completion(run_no, turn)
        return completion

    def charge(customer: str, amount: int) -> dict[str, Any]:
        log_line(log, f"charge {amount}")
        return {"charged": amount}

    with ledger.workflow("chat-1"):
        for turn in range(2):
            completion = ledger.step("llm", ask, turn) if record_turns else ask(turn)
            calls = completion.choices[0].message.tool_calls or []
            for call in calls:
                ledger.run(call, handler=charge)
                if die_after_charge:
                    os.kill(os.getpid(), signal.SIGKILL)
            if not calls:
                log_line(log, f"answer {completion.choices[0].message.content}")
    ledger.close()


def slow_winner(url: str, workflow: str, log: str, work_seconds: float, results: Any) -> None:
    """Run one call whose handler takes ``work_seconds``; report when ``run`` returned (after its commit)."""
    ledger = Ledger(url)

    def handler(n: int) -> str:
        log_line(log, f"start {os.getpid()}")
        results.put(("started", time.time()))
        time.sleep(work_seconds)
        return "winner's result"

    out = ledger.run(ToolCall(workflow_id=workflow, tool="slow", args={"n": 1}), handler=handler)
    results.put(("committed", time.time(), out))
    ledger.close()


def approve_then_charge(url: str, approval_id: str, who: str, barrier: Any, results: Any, log: str) -> None:
    """One of three approvers clicking Approve on a quorum-2 request at the same moment, then calling the
    gated charge (as the agent would once it hears of the approval); reports both outcomes."""
    from agent_ledger import ApprovalPending, ApprovalRefused

    ledger = Ledger(url)
    ledger._rt.ensure_schema()

    @ledger.tool("refunds.issue", requires_approval=True, approvers={"ann", "bob", "cat"}, quorum=2)
    def refund(order: str, amount: int) -> dict[str, Any]:
        log_line(log, f"{os.getpid()} refund {order} {amount}")
        return {"refunded": amount}

    barrier.wait(timeout=60)
    try:
        ledger.approve(approval_id, by=who)
        voted = "recorded"
    except ApprovalRefused as e:
        voted = e.why
    try:
        with ledger.workflow("refund-1"):
            ran: Any = refund("ord_1", 2500)
    except ApprovalPending:
        ran = "pending"
    results.put((who, voted, ran))
    ledger.close()


def patient_waiter(url: str, workflow: str, log: str, slow_poll: bool, mode: str, go: Any, results: Any) -> None:
    """Once ``go`` is set, call the key ``slow_winner`` is running and report when the result came back.
    With ``slow_poll`` the waiter polls only every 10 s, so only the completion's notification can explain
    a prompt return."""
    import asyncio

    from agent_ledger import _flow

    if slow_poll:
        _flow.POLL_FIRST = 10.0
        _flow.POLL_CAPS = ((float("inf"), 10.0),)
    ledger = Ledger(url, wait=60)
    ledger.migrate()

    def handler(n: int) -> str:
        log_line(log, f"start {os.getpid()}")
        return "waiter's result"

    call = ToolCall(workflow_id=workflow, tool="slow", args={"n": 1})
    results.put(("ready", time.time(), None))
    go.wait(60)
    out = ledger.run(call, handler=handler) if mode == "sync" else asyncio.run(ledger.arun(call, handler=handler))
    results.put(("waited", time.time(), out))
    ledger.close()


def storm_caller(url: str, workflow: str, keys: int, seed: int, log: str, barrier: Any, results: Any) -> None:
    """Call the same ``keys`` keys as every other storm caller, in an order of its own; each execution is
    logged, and the caller reports how many results it saw that were not the key's."""
    import random

    ledger = Ledger(url, wait=120)
    order = list(range(keys))
    random.Random(seed).shuffle(order)

    def handler(k: int) -> int:
        log_line(log, f"run {k} {os.getpid()}")
        return k * 2

    barrier.wait(60)
    wrong = sum(
        ledger.run(ToolCall(workflow_id=workflow, tool="storm", args={"k": k}), handler=handler) != k * 2 for k in order
    )
    results.put(wrong)
    ledger.close()
