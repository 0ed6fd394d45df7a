"""Passwords and URL credentials never appear in an error message, a log line, an audit row or CLI output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from agent_ledger import ApprovalPending, ConfigurationError, Ledger, StorageError, ToolCall
from agent_ledger._hide import hide, hide_url
from agent_ledger._runtime import normalise_url
from agent_ledger.approvals import WebhookChannel
from agent_ledger.cli import main

PASSWORD = "hunter2-Pa55"
BAD_URLS = [
    f"postgresql+psycopg2://user:{PASSWORD}@db.example.test:5432/app",  # a driver the ledger does not use
    f"mysql://user:{PASSWORD}@db.example.test/app",  # an unsupported dialect
    f"postgresql+psycopg://user:{PASSWORD}@db.example.test:notaport/app",  # does not parse
    f"user:{PASSWORD}@db.example.test/app",  # no scheme at all
    f"sqlite+pysqlcipher://user:{PASSWORD}@/ledger.db",  # a SQLite driver the ledger does not use
    f"sqlite://user:{PASSWORD}@/:memory:",  # in-memory
]
UNREACHABLE = f"postgresql+psycopg://user:{PASSWORD}@127.0.0.1:1/app"


def _everything(e: BaseException) -> str:
    """What printing the exception shows about it and the exceptions chained to it (not the source lines)."""
    shown = []
    seen: BaseException | None = e
    while seen is not None:
        shown += [str(seen), repr(seen), *traceback.format_exception_only(type(seen), seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(shown)


@pytest.mark.parametrize("url", BAD_URLS)
def test_refused_database_urls_do_not_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Ledger(url)
    assert PASSWORD not in _everything(info.value)
    assert "***" in str(info.value)  # the URL is still shown, masked, so the user sees which one
    with pytest.raises(ConfigurationError) as info:
        normalise_url(url)
    assert PASSWORD not in _everything(info.value)


def test_percent_encoded_password_is_hidden_in_both_forms() -> None:
    with pytest.raises(ConfigurationError) as info:
        Ledger("mysql://user:p%40ss%20word-9@db.example.test/app")
    text = _everything(info.value)
    assert "p%40ss%20word-9" not in text and "p@ss word-9" not in text


def test_storage_errors_never_quote_the_password() -> None:
    ledger = Ledger(UNREACHABLE)
    assert PASSWORD not in repr(ledger)
    with pytest.raises(StorageError) as info:
        ledger.run(ToolCall(workflow_id="w", tool="t", args={}), handler=lambda: 1)
    assert PASSWORD not in str(info.value)
    ledger.close()
    # A driver that quotes the connection string (some do, in their connection errors) is masked too:
    # the password of every database URL this process has seen is removed from StorageError texts.
    quoted = StorageError(f'could not connect with "host=h password={PASSWORD}" to {UNREACHABLE}')
    assert PASSWORD not in str(quoted) and "127.0.0.1:1" in str(quoted)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "agent_ledger", *args], capture_output=True, text=True, timeout=120, env=full
    )


@pytest.mark.parametrize("command", [["history", "w"], ["migrate"], ["recover"]])
@pytest.mark.parametrize("url", [BAD_URLS[0], BAD_URLS[1], BAD_URLS[2], UNREACHABLE])
def test_cli_output_never_shows_the_password(command: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*command, "--url", url])
    out = capsys.readouterr()
    assert code in (2, 3), out
    assert PASSWORD not in out.out + out.err
    assert code == 3 or "***" in out.err  # a refused URL is shown, masked


def test_cli_subprocess_and_help_never_show_the_password() -> None:
    done = _cli("history", "w", "--url", BAD_URLS[1])
    assert done.returncode == 2 and "mysql" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    done = _cli("migrate", env={"AGENT_LEDGER_URL": UNREACHABLE})
    assert done.returncode == 3 and PASSWORD not in done.stdout + done.stderr
    shown = _cli("history", "--help", env={"AGENT_LEDGER_URL": UNREACHABLE + f"?sslpassword={PASSWORD}"})
    assert shown.returncode == 0 and "127.0.0.1:1" in shown.stdout
    assert PASSWORD not in shown.stdout + shown.stderr


def test_hide_url_masks_user_info_and_credential_query_values() -> None:
    assert hide_url("https://bob:pw@hooks.example.test/x?token=abc&name=n") == (
        "https://bob:***@hooks.example.test/x?token=***&name=n"
    )
    assert hide_url("https://ghp_tok@github.example.test/r") == "https://***@github.example.test/r"
    assert hide_url("https://h.example.test/x?api_key=1&sig=2&code=3#access_token=4") == (
        "https://h.example.test/x?api_key=***&sig=***&code=***#access_token=***"
    )
    assert hide("POST https://a:b@c.test/d failed; see https://c.test/e") == (
        "POST https://a:***@c.test/d failed; see https://c.test/e"
    )


class _LeakyChannel:
    """A user-written channel whose name and errors quote its URL, credentials included."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"hook {url}"

    def request(self, approval: Any) -> None:
        raise RuntimeError(f"POST {self.url} answered 503")

    def decided(self, approval: Any, state: Any) -> None:
        raise RuntimeError(f"POST {self.url} answered 503")


def test_channel_credentials_stay_out_of_audit_rows_and_logs(
    make_ledger: Callable[..., Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    secrets = [PASSWORD, "tok-9f8e7d6c", "key-1a2b3c4d"]
    url = f"https://ops:{PASSWORD}@hooks.example.test/approvals?token=tok-9f8e7d6c&key=key-1a2b3c4d"
    refused = WebhookChannel(
        url,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        attempts=2,
        backoff=0.001,
        client=httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(503))),
    )

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}", request=request)

    down = WebhookChannel(
        url,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        attempts=1,
        name="down",
        client=httpx.Client(transport=httpx.MockTransport(unreachable)),
    )
    ledger = make_ledger(channels=[refused, down, _LeakyChannel(url)])
    runs: list[int] = []

    @ledger.tool("refund", requires_approval=True)
    def refund(amount: int) -> int:
        runs.append(amount)
        return amount

    with caplog.at_level(logging.DEBUG, logger="agent_ledger"), ledger.workflow("w"):
        with pytest.raises(ApprovalPending) as pending:
            refund(5)
        ledger.approve(pending.value.approval_id, by="alice")
        assert refund(5) == 5
    assert runs == [5]

    failed = [e for e in ledger.events(workflow_id="w") if e.kind == "notification_failed"]
    assert len(failed) == 6  # three channels, each failing the request and the decision
    t = ledger.tables
    with ledger._rt.engine.connect() as conn:
        rows = [repr(dict(r)) for table in (t.events, t.approvals) for r in conn.execute(select(table)).mappings()]
    logged = [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    blob = "\n".join(rows + logged)
    assert "hooks.example.test" in blob and "503" in blob  # the failures are there, and say where
    for secret in secrets:
        assert secret not in blob, secret


def test_channel_repr_in_a_configuration_error_is_masked(make_ledger: Callable[..., Ledger]) -> None:
    class NoRequest:
        def __repr__(self) -> str:
            return f"NoRequest(url='https://u:{PASSWORD}@hooks.example.test/')"

    with pytest.raises(ConfigurationError) as info:
        make_ledger(channels=[NoRequest()])
    assert PASSWORD not in str(info.value) and "hooks.example.test" in str(info.value)
