"""``agent-ledger demo``: an agent charges a customer, crashes, and is retried; the charge happens once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ._ledger import Ledger
from ._models import Effect
from .errors import ConfigurationError, StorageError

WORKFLOW = "order-123"
RUNS = 4


def agent(db: str, bank: str, crash: bool, workflow: str | None = None) -> None:
    """One run of the agent: charge the customer, then (in the crashing runs) die before finishing."""
    ledger = Ledger(f"sqlite:///{db}")

    @ledger.tool("stripe.charge")
    def charge_customer(customer: str, amount: int, currency: str, effect: Effect) -> dict[str, object]:
        with open(bank, "a") as f:  # the side effect we must not repeat
            f.write(f"charged {customer} {amount} {currency} idem={effect.idem_key}\n")
        return {"charge_id": "ch_" + effect.idem_key[3:15], "amount": amount, "currency": currency}

    @ledger.tool("email.send_receipt")
    def send_receipt(customer: str, charge_id: str) -> str:
        with open(bank, "a") as f:
            f.write(f"emailed {customer} about {charge_id}\n")
        return "sent"

    with ledger.workflow(workflow or WORKFLOW):
        receipt = charge_customer("cus_123", 100, "usd")
        print(f"  agent (pid {os.getpid()}): charge returned {receipt['charge_id']}", flush=True)
        if crash:
            print("  agent: crashing before sending the receipt!", flush=True)
            ledger.flush()
            os._exit(1)
        send_receipt("cus_123", str(receipt["charge_id"]))
        print("  agent: receipt sent, workflow done", flush=True)
    ledger.close()


def _prepare(db: str) -> str:
    """Create the demo's tables in ``db`` (a new or reused file) and return a workflow id not used there
    yet, so that a reused file runs the demo afresh; a path that cannot hold a database is refused."""
    where = Path(db)
    if where.is_dir():
        raise ConfigurationError(f"--db {db}: that is a directory; give a file name, e.g. {where / 'demo.db'}")
    if not where.parent.is_dir():
        raise ConfigurationError(f"--db {db}: the directory {where.parent} does not exist")
    ledger = Ledger(f"sqlite:///{db}")
    try:
        ledger.migrate()
        number = int(WORKFLOW.rsplit("-", 1)[1])
        while ledger.effects(workflow_id=f"order-{number}", limit=1):
            number += 1
    except StorageError as e:
        raise ConfigurationError(f"--db {db}: cannot use it as the demo's SQLite database ({e})") from e
    finally:
        ledger.close()
    return f"order-{number}"


def main(db: str | None = None) -> int:
    """Run the demo in a fresh directory; return 0 when the charge ran exactly once."""
    workflow = _prepare(db) if db else None  # refuse a bad --db before making anything
    workdir = Path(tempfile.mkdtemp(prefix="agent-ledger-demo-"))
    db_path = db or str(workdir / "agent_ledger.db")
    workflow = workflow or _prepare(db_path)
    bank = workdir / "bank.log"
    print(f"agent_ledger demo: embedded SQLite at {db_path}, workflow {workflow}\n")
    exits = []
    for run in range(1, RUNS + 1):
        crash = run < RUNS
        print(f"run {run}/{RUNS}{' (will crash)' if crash else ''}:", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "agent_ledger", "demo", "--agent", "--db", db_path, "--bank", str(bank)]
            + ["--workflow", workflow]
            + (["--crash"] if crash else []),
            check=False,
        )
        exits.append(proc.returncode)
        print(f"  -> process exited with code {proc.returncode}\n", flush=True)
    lines = bank.read_text().splitlines() if bank.exists() else []
    charges = sum(1 for line in lines if line.startswith("charged"))
    emails = sum(1 for line in lines if line.startswith("emailed"))
    print(f"charge_customer ran {charges} time(s) and send_receipt {emails} time(s) across {RUNS} agent runs.")
    ledger = Ledger(f"sqlite:///{db_path}")
    print("\naudit trail:")
    for rec in ledger.history(workflow):
        print(
            f"  {rec.tool:<20} {rec.status.value:<10} attempts={rec.attempts} replays={rec.replays} key={rec.key[:19]}…"
        )
        for ev in rec.events:
            print(f"      {ev.at.isoformat(timespec='milliseconds')}  {ev.kind:<10} attempt={ev.attempt}")
    ledger.close()
    if exits[-1] != 0:
        print(f"\nFAILED: the last agent run exited with code {exits[-1]} instead of finishing the workflow.")
        return 1
    ok = charges == 1 and emails == 1
    print("\nOK: the handler ran once." if ok else "\nFAILED: a side effect did not run exactly once.")
    return 0 if ok else 1
