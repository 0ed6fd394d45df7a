"""docs/payments.md against a local stand-in of the Stripe API (tests/stripe_standin.py), not Stripe.

The page's charge tool (its first Python block, taken from the page itself so that page and tests
cannot drift) is run in this process and in real worker processes. Every test counts the stand-in's
executions (charges created): one charge despite retries, declines, a day passing, and a worker
killed with SIGKILL between Stripe's charge and the ledger's record. The stand-in's own behaviour
(24-hour key expiry, saved 4xx, search by metadata) is checked first, since the page's reasoning
rests on it.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_ledger import Ledger, RecordedError, Status
from tests.docs_fakes import Clock
from tests.stripe_standin import DAY, StripeStandIn, serve

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "payments.md"
KEY = "sk_test_standin"


def page_tool_source() -> str:
    """The page's first Python block: the charge tool."""
    m = re.search(r"```python[^\n]*\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert m is not None, "docs/payments.md has no Python block"
    return m.group(1)


@pytest.fixture
def stripe() -> Iterator[tuple[StripeStandIn, Clock, str]]:
    clock = Clock()
    standin = StripeStandIn(clock=clock)
    with serve(standin) as base_url:
        yield standin, clock, base_url


@pytest.fixture
def page(
    stripe: tuple[StripeStandIn, Clock, str], db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The page's tool module, loaded in this process against the stand-in and ``db_url``."""
    _, _, base_url = stripe
    Ledger(db_url).migrate()
    module = tmp_path / "payments_page.py"
    module.write_text(page_tool_source(), encoding="utf-8")
    monkeypatch.setenv("AGENT_LEDGER_URL", db_url)
    monkeypatch.setenv("STRIPE_API_BASE", base_url)
    monkeypatch.setenv("STRIPE_SECRET_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(module))
    yield names
    names["stripe"].close()
    names["ledger"].close()


def posts(standin: StripeStandIn) -> int:
    return sum(1 for method, _, _ in standin.requests if method == "POST")


# ---- the stand-in behaves as the page says Stripe does --------------------------------------------


def test_standin_saves_responses_for_24_hours_declines_included() -> None:
    clock = Clock()
    standin = StripeStandIn(clock=clock)
    client = httpx.Client(
        transport=httpx.MockTransport(standin.handler), base_url="https://stripe.test", auth=(KEY, "")
    )
    ok = {"amount": 100, "currency": "usd", "source": "tok_visa", "metadata[idem_key]": "k1"}
    first = client.post("/v1/charges", data=ok, headers={"Idempotency-Key": "k1"})
    again = client.post("/v1/charges", data=ok, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true" and standin.executions == 1
    other = client.post("/v1/charges", data={**ok, "amount": 200}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 400 and other.json()["error"]["type"] == "idempotency_error"

    declined = {"amount": 100, "currency": "usd", "source": "tok_chargeDeclined"}
    assert client.post("/v1/charges", data=declined, headers={"Idempotency-Key": "k2"}).status_code == 402
    replayed = client.post("/v1/charges", data=declined, headers={"Idempotency-Key": "k2"})
    assert replayed.status_code == 402 and replayed.headers["idempotent-replayed"] == "true"

    invalid = client.post("/v1/charges", data={"currency": "usd"}, headers={"Idempotency-Key": "k3"})
    assert invalid.status_code == 400  # a validation error is not saved: the key is still free
    assert (
        client.post(
            "/v1/charges", data=ok | {"metadata[idem_key]": "k3"}, headers={"Idempotency-Key": "k3"}
        ).status_code
        == 200
    )
    assert standin.executions == 2

    clock.advance(DAY)  # keys 24 hours old are gone: the same key executes again
    late = client.post("/v1/charges", data=ok, headers={"Idempotency-Key": "k1"})
    assert late.status_code == 200 and "idempotent-replayed" not in late.headers
    assert late.json()["id"] != first.json()["id"] and standin.executions == 3

    found = client.get("/v1/charges/search", params={"query": "metadata['idem_key']:'k1'"}).json()["data"]
    assert [c["id"] for c in found] == [late.json()["id"], first.json()["id"]]  # newest first
    assert client.get("/v1/charges/search", params={"query": "idempotency_key:'k1'"}).status_code == 400
    anonymous = httpx.Client(transport=httpx.MockTransport(standin.handler), base_url="https://stripe.test")
    assert anonymous.post("/v1/charges", data=ok).status_code == 401


# ---- the page's tool ----------------------------------------------------------------------------


def test_a_recorded_charge_replays_from_the_ledger_a_day_later(
    page: dict[str, Any], stripe: tuple[StripeStandIn, Clock, str]
) -> None:
    standin, clock, _ = stripe
    ledger, charge = page["ledger"], page["charge"]
    with ledger.workflow("order-1"):
        first = charge(2500, "usd", "tok_visa")
    clock.advance(DAY + 3600)  # Stripe has forgotten the idempotency key
    for _ in range(3):
        with ledger.workflow("order-1"):
            assert charge(2500, "usd", "tok_visa") == first
    assert standin.executions == 1 and posts(standin) == 1  # replays never reach Stripe


def test_a_decline_is_recorded_and_not_sent_again(
    page: dict[str, Any], stripe: tuple[StripeStandIn, Clock, str]
) -> None:
    standin, clock, _ = stripe
    ledger, charge = page["ledger"], page["charge"]
    with ledger.workflow("order-2"), pytest.raises(page["CardDeclined"]):
        charge(2500, "usd", "tok_chargeDeclined")
    for advance in (0, DAY + 1):  # also once Stripe's saved decline is gone
        clock.advance(advance)
        with ledger.workflow("order-2"), pytest.raises(RecordedError) as e:
            charge(2500, "usd", "tok_chargeDeclined")
        assert "declined" in e.value.message
    assert posts(standin) == 1 and standin.executions == 0
    with ledger.workflow("order-2/payment-2"):  # the deliberate new attempt: a new key
        assert charge(2500, "usd", "tok_visa")["status"] == "succeeded"
    assert posts(standin) == 2 and standin.executions == 1


def test_a_lost_answer_retried_after_a_day_is_found_by_search(
    page: dict[str, Any], stripe: tuple[StripeStandIn, Clock, str]
) -> None:
    standin, clock, _ = stripe
    ledger, charge = page["ledger"], page["charge"]
    standin.drop_answers = 1  # Stripe charges, the answer never arrives
    with ledger.workflow("order-3"), pytest.raises(httpx.TransportError):
        charge(2500, "usd", "tok_visa")
    assert standin.executions == 1
    clock.advance(DAY + 1)  # the same Idempotency-Key would now charge again
    with ledger.workflow("order-3"):
        found = charge(2500, "usd", "tok_visa")
    assert found["id"] == standin.charges[0]["id"]
    assert standin.executions == 1 and posts(standin) == 1  # attempt 2 searched and sent nothing


WORKER = textwrap.dedent(
    """
    import runpy, sys
    page = runpy.run_path(sys.argv[1])
    with page["ledger"].workflow("order-crash"):
        page["charge"](2500, "usd", "tok_visa")
    print("recorded")  # never reached: killed before the answer arrives
    """
)


def _crash_after_charge(standin: StripeStandIn, module: Path, env: dict[str, str], cwd: Path) -> None:
    """A real worker process charges through the stand-in and is SIGKILLed after the charge was made
    and before the ledger recorded the answer (the stand-in holds the answer until the kill)."""
    charged = threading.Event()
    release = threading.Event()

    def hold() -> None:
        charged.set()
        release.wait(60)

    standin.before_answer = hold
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(module)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert charged.wait(60), worker.stderr.read().decode() if worker.poll() is not None else "no charge"
        assert standin.executions == 1
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        release.set()
        standin.before_answer = None
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert b"recorded" not in worker.stdout.read()


def _worker_env(db_url: str, base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_LEDGER_", "STRIPE_"))}
    env.update(
        AGENT_LEDGER_URL=db_url,
        STRIPE_API_BASE=base_url,
        STRIPE_SECRET_KEY=KEY,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.mark.adversarial
def test_sigkill_between_charge_and_record_then_recover_finds_the_charge(
    stripe: tuple[StripeStandIn, Clock, str], db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin, clock, base_url = stripe
    Ledger(db_url).migrate()
    module = tmp_path / "payments_page.py"
    module.write_text(page_tool_source(), encoding="utf-8")
    _crash_after_charge(standin, module, _worker_env(db_url, base_url), tmp_path)
    (charged,) = standin.charges

    clock.advance(DAY + 1)  # Stripe no longer knows the key: only the search can find the charge
    monkeypatch.setenv("AGENT_LEDGER_URL", db_url)
    monkeypatch.setenv("STRIPE_API_BASE", base_url)
    monkeypatch.setenv("STRIPE_SECRET_KEY", KEY)
    page = runpy.run_path(str(module))
    ledger, charge = page["ledger"], page["charge"]
    try:
        (effect,) = ledger.history("order-crash")
        assert effect.status is Status.RUNNING  # the dead worker's claim
        report = ledger.recover()
        assert report.reconciled == [effect.key], report
        settled = ledger.effect(effect.key)
        assert settled is not None and settled.status is Status.SUCCEEDED
        assert settled.result["id"] == charged["id"]
        assert "reconcile" in [e.kind for e in settled.events]
        with ledger.workflow("order-crash"):
            assert charge(2500, "usd", "tok_visa")["id"] == charged["id"]  # replayed
    finally:
        page["stripe"].close()
        ledger.close()
    assert standin.executions == 1 and posts(standin) == 1


@pytest.mark.adversarial
def test_without_the_search_a_takeover_after_a_day_charges_twice(
    stripe: tuple[StripeStandIn, Clock, str], sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The danger the page describes, shown with the same crash: a tool that relies on the idempotency
    key alone (on_crash="retry", no reconcile=, no search) charges a second time once the key is gone."""
    standin, clock, base_url = stripe
    source = (
        page_tool_source()
        .replace(
            '@ledger.tool("stripe.charge", reconcile=find_charge, retry_on=(httpx.TransportError,))',
            '@ledger.tool("stripe.charge", on_crash="retry")',
        )
        .replace("if effect.attempt > 1:", "if False:")
    )
    assert 'on_crash="retry"' in source and "if False:" in source
    module = tmp_path / "payments_key_only.py"
    module.write_text(source, encoding="utf-8")
    _crash_after_charge(standin, module, _worker_env(sqlite_url, base_url), tmp_path)
    clock.advance(DAY + 1)
    monkeypatch.setenv("AGENT_LEDGER_URL", sqlite_url)
    monkeypatch.setenv("STRIPE_API_BASE", base_url)
    monkeypatch.setenv("STRIPE_SECRET_KEY", KEY)
    page = runpy.run_path(str(module))
    try:
        with page["ledger"].workflow("order-crash"):
            page["charge"](2500, "usd", "tok_visa")
    finally:
        page["stripe"].close()
        page["ledger"].close()
    assert standin.executions == 2  # the same idempotency key, two charges
