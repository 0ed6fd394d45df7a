"""The console in a real browser (issue 15): Debian's headless Chromium, driven by Selenium through
the chromedriver of the same Debian build (``chromium-driver``: the pair always matches, and nothing is
downloaded), against the console served by uvicorn on 127.0.0.1, on SQLite and Postgres.

A person logs in through the form, sees a pending $10,000 refund with its exact arguments, approves
it; the agent's retried call runs once; the timeline shows request -> approval -> execution. Stored
XSS payloads render as text (no dialog, no injected element); a POST without the CSRF token, with the
session cookie, is refused. The screenshots of docs/console.md are taken here (docs/console/*.png).

scripts/test.sh installs ``chromium`` and ``chromium-driver`` when they are missing (as root, as CI
runs); elsewhere these tests are skipped when the browser is missing, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from agent_ledger import ApprovalPending, ApprovalStatus, ConsoleAuth, Ledger, ToolCall  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "console"
"""Where the screenshots go: docs/console/ when ``AGENT_LEDGER_SCREENSHOTS=1`` (to refresh the docs'
pictures), else a temporary directory, so an ordinary run leaves the checkout unchanged."""
USERS = {"alice": "alice-token-5f2b8c1e9d", "bob": "bob-token-77d1e0c3a4b2"}
REFUND = ToolCall(
    workflow_id="support-ticket-1042",
    tool="payments.refund",
    args={"amount_usd": 10000, "currency": "USD", "customer": "cus_8842", "reason": "double charge on order 77"},
)
XSS_SCRIPT = "<script>alert('xss-tool')</script>"
XSS_IMG = '"><img src=x onerror=alert("xss-img")>'
# Scripts added by the test (not by the page) record every dialog the page opens.
RECORD_DIALOGS = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) {
  const original = window[name];
  window[name] = function (message) { window.__dialogs.push(String(message)); return original.apply(this, arguments); };
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(make_ledger: Callable[..., Ledger]) -> Iterator[tuple[Ledger, str]]:
    """The console of a fresh ledger, served by uvicorn on a free port of 127.0.0.1."""
    import uvicorn

    ledger = make_ledger(redaction_key="r" * 32)
    app = ledger.console_app(auth=ConsoleAuth(USERS))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield ledger, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: scripts/test.sh installs them (as root)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("unhandledPromptBehavior", "ignore")  # a dialog stays open, to be seen
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_DIALOGS})
        yield driver
    finally:
        driver.quit()


def wait_for_url(driver: Any, url: str) -> None:
    """Wait until the browser has loaded ``url`` (a click returns before the next page is there)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(expected_conditions.url_to_be(url))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def log_in(driver: Any, base: str, user: str = "alice") -> None:
    driver.get(f"{base}/")
    assert driver.current_url == f"{base}/login"  # a browser without a session is sent to the form
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "token").send_keys(USERS[user])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for_url(driver, f"{base}/")
    assert f"signed in as {user}" in driver.find_element(By.CSS_SELECTOR, "header .who").text


def no_dialog_fired(driver: Any) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        alert = None
    assert alert is None, f"a dialog fired: {alert.text if alert else ''}"
    assert driver.execute_script("return window.__dialogs") == []


def screenshot(driver: Any, path: Path) -> None:
    """A full-page PNG (the window grown to the page's height), written under docs/console/ only when
    ``AGENT_LEDGER_SCREENSHOTS=1``."""
    if os.environ.get("AGENT_LEDGER_SCREENSHOTS") != "1":
        path = Path(tempfile.gettempdir()) / "agent-ledger-screenshots" / path.name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(700, min(int(height) + 40, 2400)))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)


def test_a_person_approves_a_refund_and_the_agent_runs_it_once(
    served: tuple[Ledger, str], browser: Any, db_url: str
) -> None:
    ledger, base = served
    runs = {"refund": 0}

    def refund(amount_usd: int, currency: str, customer: str, reason: str) -> dict[str, Any]:
        runs["refund"] += 1
        return {"refund_id": "re_3PqL9", "amount_usd": amount_usd, "status": "succeeded"}

    # What the agent did before: a lookup, then the refund, which needs alice's approval.
    lookup = ToolCall(workflow_id=REFUND.workflow_id, tool="orders.lookup", args={"order": 77})
    ledger.run(lookup, lambda order: {"order": order, "charged_twice": True, "card": "visa-4242"})
    opts: dict[str, Any] = {"requires_approval": True, "approvers": ["alice"]}
    with ledger.workflow(REFUND.workflow_id, on_behalf_of="support-agent-7"), pytest.raises(ApprovalPending) as info:
        ledger.run(REFUND, refund, **opts)
    approval_id = info.value.approval_id

    log_in(browser, base)
    card = browser.find_element(By.ID, f"approval-{approval_id}")
    assert card.find_element(By.CSS_SELECTOR, ".tool-name").text == "payments.refund"
    shown = card.find_element(By.CSS_SELECTOR, "pre.args").text  # keys sorted: JSONB does not keep their order
    assert shown == json.dumps(REFUND.args, indent=2, sort_keys=True) and json.loads(shown) == REFUND.args
    assert "support-agent-7" in card.text and "0 of 1 approval" in card.text
    assert "succeeded orders.lookup" in card.find_element(By.CSS_SELECTOR, ".earlier").text  # what it did before
    link = card.find_element(By.LINK_TEXT, REFUND.workflow_id)
    assert link.get_attribute("href") == f"{base}/workflows/{REFUND.workflow_id}"
    if "sqlite" in db_url:
        screenshot(browser, SHOTS / "inbox.png")

    card.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("duplicate charge confirmed in Stripe")
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_for_url(browser, f"{base}/?notice=approved")
    assert "Approved." in browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert browser.find_elements(By.CSS_SELECTOR, "section.approval") == []
    decided = ledger.approval(approval_id)
    assert decided is not None and decided.status is ApprovalStatus.APPROVED and decided.decided_by == "alice"
    assert runs["refund"] == 0

    # The agent retries: the refund runs once; a second retry replays it.
    assert ledger.run(REFUND, refund, **opts)["refund_id"] == "re_3PqL9"
    assert ledger.run(REFUND, refund, **opts)["refund_id"] == "re_3PqL9"
    assert runs["refund"] == 1

    browser.get(f"{base}/workflows/{quote(REFUND.workflow_id, safe='')}")
    kinds = [li.get_attribute("data-kind") for li in browser.find_elements(By.CSS_SELECTOR, "ol.tl li.entry")]
    # the lookup; then request -> approval -> its use by the call -> the execution -> the replay
    assert kinds == [
        "called",
        "succeeded",
        "approval_requested",
        "approved",
        "approval_consumed",
        "called",
        "succeeded",
        "replayed",
    ]
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "approved (1 of 1): duplicate charge confirmed in Stripe" in page and "by alice" in page
    if "sqlite" in db_url:
        for details in browser.find_elements(By.CSS_SELECTOR, "table details"):
            if details.find_element(By.TAG_NAME, "summary").text in ("arguments", "result"):
                browser.execute_script("arguments[0].open = true", details)
        screenshot(browser, SHOTS / "timeline.png")
    no_dialog_fired(browser)


def test_stored_xss_renders_as_text(served: tuple[Ledger, str], browser: Any) -> None:
    ledger, base = served
    runs = {"n": 0}

    def tool(note: str) -> dict[str, str]:
        runs["n"] += 1
        return {"echo": note}

    hostile = ToolCall(workflow_id=f"wf{XSS_IMG}", tool=XSS_SCRIPT, args={"note": XSS_IMG, XSS_SCRIPT: 1})
    ledger.run(hostile.model_copy(update={"args": {"note": XSS_IMG}}), tool)
    with pytest.raises(ApprovalPending):
        ledger.run(
            ToolCall(workflow_id=hostile.workflow_id, tool=XSS_IMG, args={"note": XSS_SCRIPT}),
            tool,
            requires_approval=True,
        )

    def crash(note: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ledger.run(ToolCall(workflow_id=hostile.workflow_id, tool=f"{XSS_SCRIPT}-mail", args={"note": XSS_IMG}), crash)
    log_in(browser, base)
    pages = ["/", "/workflows", f"/workflows/{quote(hostile.workflow_id, safe='')}", "/unknown"]
    for path in pages:
        browser.get(f"{base}{path}")
        assert browser.execute_script("return document.scripts.length") == 0, path
        assert browser.execute_script("return document.images.length") == 0, path
        assert browser.execute_script("return document.querySelectorAll('[onerror]').length") == 0, path
        text = browser.find_element(By.TAG_NAME, "main").text
        assert XSS_SCRIPT in text or XSS_IMG in text, path
        no_dialog_fired(browser)
    assert runs["n"] == 1


def test_a_post_without_the_csrf_token_is_refused(served: tuple[Ledger, str], browser: Any) -> None:
    ledger, base = served
    runs = {"n": 0}

    def refund(amount_usd: int, currency: str, customer: str, reason: str) -> str:
        runs["n"] += 1
        return "ok"

    with pytest.raises(ApprovalPending) as info:
        ledger.run(REFUND, refund, requires_approval=True)
    log_in(browser, base)
    # The approve form, with its CSRF token taken out: the browser still sends the session cookie.
    form = browser.find_element(By.CSS_SELECTOR, f"#approval-{info.value.approval_id} form")
    browser.execute_script("arguments[0].querySelector('input[name=csrf_token]').remove()", form)
    form.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_for_url(browser, f"{base}/approvals/{info.value.approval_id}/approve")
    assert "CSRF" in browser.find_element(By.CSS_SELECTOR, ".error").text
    status = browser.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")
    assert status == 403
    still = ledger.approval(info.value.approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and still.approved_by == []
    assert runs["n"] == 0
