"""The web console over HTTP (issue 15), on SQLite and Postgres: authentication on every route,
decisions as the signed-in user through the approvals service (allowlists, quorum, separation of
duties), CSRF on cookie-authenticated POSTs, the three ways to settle an unknown outcome, escaping of
hostile stored text, and no secret in any page. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("jinja2")
pytest.importorskip("itsdangerous")

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from agent_ledger import (
    ApprovalPending,
    ApprovalStatus,
    ConfigurationError,
    ConsoleAuth,
    Ledger,
    Status,
    ToolCall,
)

TOKENS = {
    "alice": "alice-token-5f2b8c1e9d",
    "bob": "bob-token-77d1e0c3a4b2",
    "mallory": "mallory-token-0e9a8b7c6d",
}
REFUND = ToolCall(workflow_id="order-77", tool="payments.refund", args={"amount": 10000, "customer": "cus_42"})
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(1)>'
HTML = {"accept": "text/html"}


def bearer(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[user]}"}


class Refunds:
    def __init__(self) -> None:
        self.n = 0

    def refund(self, amount: int, customer: str) -> dict[str, Any]:
        self.n += 1
        return {"refund_id": "re_1", "amount": amount}


def client(ledger: Ledger, **auth: Any) -> TestClient:
    auth.setdefault("users", TOKENS)
    users = auth.pop("users")
    app = ledger.console_app(auth=ConsoleAuth(users, **auth))
    return TestClient(app, follow_redirects=False)


def ask(ledger: Ledger, runs: Refunds, call: ToolCall = REFUND, **opts: Any) -> str:
    opts.setdefault("requires_approval", True)
    with pytest.raises(ApprovalPending) as info:
        ledger.run(call, runs.refund, **opts)
    return info.value.approval_id


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert found is not None, "the page carries no CSRF token"
    return found.group(1)


def test_every_route_needs_authentication_and_changes_nothing(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs)
    key = ledger.timeline("order-77").approvals[0].key
    c = client(ledger)
    routes = [
        ("GET", "/"),
        ("GET", "/workflows"),
        ("GET", "/workflows/order-77"),
        ("GET", "/unknown"),
        ("GET", "/no-such-page"),
        ("POST", f"/approvals/{approval_id}/approve"),
        ("POST", f"/approvals/{approval_id}/reject"),
        ("POST", f"/effects/{key}/resolve"),
    ]
    wrong = [
        {},
        {"authorization": "Bearer not-a-token-of-anyone"},
        {"authorization": f"Basic {TOKENS['alice']}"},
        {"authorization": "Bearer "},
        {"cookie": "agent_ledger_console=forged.value.sig"},
        {"x-forwarded-user": "alice"},  # no trusted header configured: ignored
    ]
    for method, path in routes:
        for headers in wrong:
            r = c.request(method, path, headers=headers, data={"reason": "x", "outcome": "retry", "value": ""})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert TOKENS["alice"] not in r.text
            browser = c.request(method, path, headers={**headers, **HTML}, data={"reason": "x"})
            assert browser.status_code == 303 and browser.headers["location"] == "/login"
    assert c.get("/healthz").json() == {"ok": True}
    assert c.get("/login").status_code == 200
    still = ledger.approval(approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and still.approved_by == []
    assert runs.n == 0


def test_bearer_decisions_are_made_as_the_authenticated_user(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs, approvers=["alice", "bob"])
    c = client(ledger)
    inbox = c.get("/", headers=bearer("alice")).json()
    assert [a["approval_id"] for a in inbox] == [approval_id] and inbox[0]["args"] == REFUND.args
    # A "by" field is not a field of the route: the decider is the token's user, whatever the form says.
    r = c.post(f"/approvals/{approval_id}/approve", data={"reason": "ok", "by": "bob"}, headers=bearer("alice"))
    assert r.status_code == 200, r.text
    decided = ledger.approval(approval_id)
    assert decided is not None and decided.status is ApprovalStatus.APPROVED
    assert decided.decided_by == "alice" and decided.approved_by == ["alice"] and decided.reason == "ok"
    # The agent's retried call runs once; later calls replay.
    assert ledger.run(REFUND, runs.refund, requires_approval=True, approvers=["alice", "bob"])["amount"] == 10000
    assert ledger.run(REFUND, runs.refund, requires_approval=True, approvers=["alice", "bob"])["amount"] == 10000
    assert runs.n == 1
    kinds = [e.kind for e in ledger.timeline("order-77").entries]
    assert kinds.index("approval_requested") < kinds.index("approved") < kinds.index("succeeded")
    # A decided request cannot be decided again.
    again = c.post(f"/approvals/{approval_id}/reject", data={"reason": "late"}, headers=bearer("bob"))
    assert again.status_code == 409 and "already" in again.json()["error"]


def test_the_console_keeps_the_approval_rules(make_ledger: Callable[..., Ledger]) -> None:
    """Allowlists, quorum, one vote per person and separation of duties, as in ledger.approve."""
    ledger = make_ledger()
    runs = Refunds()
    with ledger.workflow("order-77", on_behalf_of="bob"):
        approval_id = ask(ledger, runs, approvers=["alice", "bob", "mallory"], quorum=2)
    c = client(ledger)
    first = c.post(f"/approvals/{approval_id}/approve", data={}, headers=bearer("alice"))
    assert first.status_code == 200 and first.json()["progress"] == "1 of 2 approvals: alice"
    twice = c.post(f"/approvals/{approval_id}/approve", data={}, headers=bearer("alice"))
    assert twice.status_code == 409 and "already" in twice.json()["error"]
    own = c.post(f"/approvals/{approval_id}/approve", data={}, headers=bearer("bob"))
    assert own.status_code == 409 and "requested" in own.json()["error"]
    no_reason = c.post(f"/approvals/{approval_id}/reject", data={"reason": "  "}, headers=bearer("mallory"))
    assert no_reason.status_code == 400
    still = ledger.approval(approval_id)
    assert still is not None and still.status is ApprovalStatus.PENDING and still.approved_by == ["alice"]
    done = c.post(f"/approvals/{approval_id}/approve", data={}, headers=bearer("mallory"))
    assert done.status_code == 200 and done.json()["approval"]["status"] == "approved"
    assert runs.n == 0


def test_allowlist_refuses_a_user_who_is_not_an_approver(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs, approvers=["alice"])
    c = client(ledger)
    r = c.post(f"/approvals/{approval_id}/approve", data={}, headers=bearer("mallory"))
    assert r.status_code == 409 and "may not decide" in r.json()["error"]
    html = c.post(f"/approvals/{approval_id}/approve", data={}, headers={**bearer("mallory"), **HTML})
    assert html.status_code == 409 and "may not decide" in html.text and "<html" in html.text
    assert ledger.approval(approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    refused = [e for e in ledger.events(workflow_id="order-77") if e.kind == "approval_refused"]
    assert [e.owner for e in refused] == ["mallory", "mallory"]


def test_login_sets_a_signed_httponly_samesite_cookie_and_csrf_guards_its_posts(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs)
    c = client(ledger)
    bad = c.post("/login", data={"user": "alice", "token": TOKENS["bob"]})
    assert bad.status_code == 401 and "set-cookie" not in bad.headers and "Wrong user or token" in bad.text
    ok = c.post("/login", data={"user": "alice", "token": TOKENS["alice"]})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKENS["alice"] not in cookie
    page = c.get("/", headers=HTML)
    assert page.status_code == 200 and "signed in as <strong>alice</strong>" in page.text
    token = csrf_of(page.text)
    url = f"/approvals/{approval_id}/approve"
    for form in ({"reason": "x"}, {"reason": "x", "csrf_token": ""}, {"reason": "x", "csrf_token": "0" * 64}):
        refused = c.post(url, data=form, headers=HTML)
        assert refused.status_code == 403, form
    assert ledger.approval(approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    # Another session's token (same user, same key) does not work in this one.
    other = TestClient(c.app, follow_redirects=False)
    assert other.post("/login", data={"user": "alice", "token": TOKENS["alice"]}).status_code == 303
    assert csrf_of(other.get("/", headers=HTML).text) != token
    assert other.post(url, data={"reason": "x", "csrf_token": token}, headers=HTML).status_code == 403
    assert ledger.approval(approval_id).status is ApprovalStatus.PENDING  # type: ignore[union-attr]
    accepted = c.post(url, data={"reason": "x", "csrf_token": token}, headers=HTML)
    assert accepted.status_code == 303 and accepted.headers["location"] == "/?notice=approved"
    assert ledger.approval(approval_id).decided_by == "alice"  # type: ignore[union-attr]
    # A tampered cookie is no session at all.
    value = cookie.split(";")[0].split("=", 1)[1]
    c.cookies.clear()
    c.cookies.set("agent_ledger_console", value[:-2] + ("xx" if not value.endswith("xx") else "yy"))
    assert c.get("/", headers=HTML).status_code == 303


def test_sessions_are_bound_to_the_key_and_to_existing_users(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    key = "s" * 32
    c1 = client(ledger, secret_key=key)
    assert c1.post("/login", data={"user": "mallory", "token": TOKENS["mallory"]}).status_code == 303
    # The same key, mallory removed: her cookie no longer works.
    c2 = client(ledger, users={"alice": TOKENS["alice"]}, secret_key=key)
    c2.cookies = c1.cookies
    assert c2.get("/").status_code == 401
    # Another key: no session survives.
    c3 = client(ledger, secret_key="t" * 32)
    c3.cookies = c1.cookies
    assert c3.get("/").status_code == 401
    c4 = client(ledger, secret_key=key)
    c4.cookies = c1.cookies
    assert c4.get("/").status_code == 200


def test_trusted_header_from_an_sso_proxy(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs)
    c = client(ledger, users={}, trusted_header="X-Forwarded-User")
    assert c.get("/").status_code == 401
    who = {"x-forwarded-user": "carol@example.com", **HTML}
    page = c.get("/", headers=who)
    assert page.status_code == 200 and "carol@example.com" in page.text
    assert c.post(f"/approvals/{approval_id}/approve", data={}, headers=who).status_code == 403
    assert c.post("/login", data={"user": "carol", "token": "x" * 20}).status_code == 404
    r = c.post(f"/approvals/{approval_id}/approve", data={"csrf_token": csrf_of(page.text)}, headers=who)
    assert r.status_code == 303
    assert ledger.approval(approval_id).decided_by == "carol@example.com"  # type: ignore[union-attr]
    # carol's token is hers: it does not work for dave.
    dave = {"x-forwarded-user": "dave", **HTML}
    assert (
        c.post(f"/approvals/{approval_id}/reject", data={"csrf_token": csrf_of(page.text)}, headers=dave).status_code
        == 403
    )
    assert c.get("/", headers={"x-forwarded-user": "a\x7fb"}).status_code == 401


def test_unknown_outcomes_are_settled_three_ways(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = {"n": 0}

    def send(to: str) -> str:
        runs["n"] += 1
        if runs["n"] <= 3:
            raise KeyboardInterrupt  # the worker dies: outcome unknown
        return f"sent to {to}"

    calls = {to: ToolCall(workflow_id="mail", tool="email.send", args={"to": to}) for to in ("a", "b", "c")}
    for call in calls.values():
        with pytest.raises(KeyboardInterrupt):
            ledger.run(call, send)
    keys = {to: ledger.effects(workflow_id="mail", tool="email.send")[i].key for i, to in enumerate("abc")}
    c = client(ledger)
    page = c.get("/unknown", headers={**bearer("alice"), **HTML})
    assert page.status_code == 200 and page.text.count("It happened") == 3
    listed = c.get("/unknown", headers=bearer("alice")).json()
    assert sorted(r["key"] for r in listed) == sorted(keys.values())
    resolve = lambda to, **form: c.post(f"/effects/{keys[to]}/resolve", data=form, headers=bearer("alice"))  # noqa: E731
    assert resolve("a", outcome="result", value="{not json").status_code == 400
    assert resolve("a", outcome="maybe", value="").status_code == 400
    assert resolve("a", outcome="error", value=" ").status_code == 400
    assert (
        c.post("/effects/v1:nope/resolve", data={"outcome": "retry", "value": ""}, headers=bearer("alice")).status_code
        == 404
    )
    assert ledger.effect(keys["a"]).status is Status.UNKNOWN  # type: ignore[union-attr]
    assert resolve("a", outcome="result", value='{"id": "m_1"}').json() == {
        "ok": True,
        "key": keys["a"],
        "status": "succeeded",
    }
    assert resolve("b", outcome="error", value="bounced").json()["status"] == "failed"
    assert resolve("c", outcome="retry", value="").json()["status"] == "pending"
    assert resolve("a", outcome="retry", value="").status_code == 409  # settled: not unknown any more
    assert ledger.run(calls["a"], send) == {"id": "m_1"}  # replayed, not run
    assert runs["n"] == 3
    assert ledger.run(calls["c"], send) == "sent to c"  # it did not happen: runs now, once
    assert ledger.run(calls["c"], send) == "sent to c"
    assert runs["n"] == 4
    resolved = [e for e in ledger.events(workflow_id="mail") if e.kind == "resolved"]
    assert [e.owner for e in resolved] == ["alice", "alice", "alice"]


def test_pages_escape_hostile_text_and_show_no_secret(make_ledger: Callable[..., Ledger]) -> None:
    redaction_key = "r" * 32
    ledger = make_ledger(redaction_key=redaction_key)
    n = {"runs": 0}

    def tool(note: str, card: str) -> dict[str, str]:
        n["runs"] += 1
        return {"echo": note}

    hostile = ToolCall(workflow_id=f"wf{XSS_IMG}", tool=XSS_SCRIPT, args={"note": XSS_IMG, "card": "4111111111111111"})
    ledger.run(hostile, tool, redact=["card"])
    with pytest.raises(ApprovalPending):
        ledger.run(hostile.model_copy(update={"tool": f"{XSS_SCRIPT}2"}), tool, redact=["card"], requires_approval=True)
    c = client(ledger)
    headers = {**bearer("alice"), **HTML}
    from urllib.parse import quote

    pages = ["/", "/workflows", f"/workflows/{quote(hostile.workflow_id, safe='')}", "/unknown", "/login"]
    for path in pages:
        html = c.get(path, headers=headers).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        for secret in (*TOKENS.values(), redaction_key, "4111111111111111", "hmac-sha256"):
            assert secret not in html, (path, secret)
    timeline = c.get(f"/workflows/{quote(hostile.workflow_id, safe='')}", headers=headers).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in timeline and "&lt;img src=x onerror=alert(1)&gt;" in timeline
    assert "[redacted]" in timeline
    inbox = c.get("/", headers=headers).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;2" in inbox and "[redacted]" in inbox
    csp = c.get("/", headers=headers).headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert n["runs"] == 1


def test_workflow_pages_and_json(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    for i in range(3):
        ledger.run(ToolCall(workflow_id=f"wf-{i}", tool="t", args={"i": i}), lambda i: i)
    c = client(ledger)
    page = c.get("/workflows?limit=2", headers=bearer("bob")).json()
    assert [w["workflow_id"] for w in page["workflows"]] == ["wf-2", "wf-1"] and page["next_cursor"]
    rest = c.get(f"/workflows?limit=2&cursor={page['next_cursor']}", headers=bearer("bob")).json()
    assert [w["workflow_id"] for w in rest["workflows"]] == ["wf-0"] and rest["next_cursor"] is None
    html = c.get("/workflows?limit=2&status=succeeded&since=1h", headers={**bearer("bob"), **HTML}).text
    assert "Older workflows" in html and "wf-2" in html and "wf-0" not in html
    story = c.get("/workflows/wf-1", headers=bearer("bob")).json()
    assert story["workflow_id"] == "wf-1" and [e["kind"] for e in story["entries"]] == ["called", "succeeded"]
    assert c.get("/workflows/nobody", headers=bearer("bob")).status_code == 404
    for bad in ("limit=abc", "limit=0", "cursor=zzz", "since=forever", "status=exploded", "since=1e400s"):
        assert c.get(f"/workflows?{bad}", headers=bearer("bob")).status_code == 400, bad


def test_mounted_under_a_prefix(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    runs = Refunds()
    approval_id = ask(ledger, runs)
    app = Starlette(routes=[Mount("/ledger", ledger.console_app(auth=ConsoleAuth(TOKENS)))])
    c = TestClient(app, follow_redirects=False)
    assert c.get("/ledger/", headers=HTML).headers["location"] == "/ledger/login"
    login = c.post("/ledger/login", data={"user": "bob", "token": TOKENS["bob"]})
    assert login.headers["location"] == "/ledger/" and "Path=/ledger/" in login.headers["set-cookie"]
    html = c.get("/ledger/", headers=HTML).text
    assert f'action="/ledger/approvals/{approval_id}/approve"' in html and 'href="/ledger/workflows/order-77"' in html
    r = c.post(f"/ledger/approvals/{approval_id}/approve", data={"csrf_token": csrf_of(html)}, headers=HTML)
    assert r.headers["location"] == "/ledger/?notice=approved"


def test_the_console_never_runs_without_authentication(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger()
    for bad in (None, {"alice": TOKENS["alice"]}, "alice:token"):
        with pytest.raises(ConfigurationError, match="authentication"):
            ledger.console_app(auth=bad)
    with pytest.raises(ConfigurationError, match="authentication"):
        ConsoleAuth()
    with pytest.raises(ConfigurationError, match="at least 16"):
        ConsoleAuth({"alice": "short"})
    with pytest.raises(ConfigurationError):
        ConsoleAuth({"a:b": TOKENS["alice"]})
    with pytest.raises(ConfigurationError):
        ConsoleAuth(trusted_header="X Bad: header")
    with pytest.raises(ConfigurationError, match="32 bytes"):
        ConsoleAuth(TOKENS, secret_key="short")
    shown = repr(ConsoleAuth(TOKENS, trusted_header="X-Forwarded-User"))
    assert "alice" in shown and not any(t in shown for t in TOKENS.values())


def test_budgets_page_shows_each_limits_usage(make_ledger: Callable[..., Ledger]) -> None:
    from agent_ledger import Limit, LimitExceeded

    hostile_name = f"calls {XSS_SCRIPT}"
    ledger = make_ledger(limits=[Limit(max=3, name=hostile_name)])
    runs = {"n": 0}

    def work(i: int) -> int:
        runs["n"] += 1
        return i

    for i in range(3):
        ledger.run(ToolCall(workflow_id="loop-1", tool="search", args={"i": i}), work)
    with pytest.raises(LimitExceeded):
        ledger.run(ToolCall(workflow_id="loop-1", tool="search", args={"i": 3}), work)
    assert runs["n"] == 3
    c = client(ledger)
    assert c.get("/budgets").status_code == 401
    rows = c.get("/budgets", headers=bearer("alice")).json()
    assert [(r["name"], r["scope"], r["used"], r["max"], r["remaining"]) for r in rows] == [
        (hostile_name, "loop-1", 3.0, 3.0, 0.0)
    ]
    html = c.get("/budgets", headers={**bearer("alice"), **HTML}).text
    assert "3 of 3" in html and 'class="fill full"' in html and 'style="width: 100.0%"' in html
    assert "<script>alert" not in html and "calls &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'href="/budgets"' in html
    story = c.get("/workflows/loop-1", headers=bearer("alice")).json()
    refusal = [e for e in story["entries"] if e["kind"] == "limit_exceeded"]
    assert len(refusal) == 1 and refusal[0]["summary"].startswith("refused: over the limit calls <script>")
