"""Fixtures for the Python blocks of README.md and docs/**/*.md, which pytest-markdown-docs runs as tests.

Every block runs in a fresh temporary working directory with its own SQLite database in
``$AGENT_LEDGER_URL``, and without the caller's ``AGENT_LEDGER_*``, ``OPENAI_*``, ``ANTHROPIC_*``,
``SLACK_*`` and ``STRIPE_*`` variables, so a block can neither read nor write anything outside its
directory, nor reach a real service by accident. Blocks that talk to a service name a stand-in in their
info string (```` ```python fixture:stripe_api ````); the fixtures below serve those stand-ins on
127.0.0.1 and point the environment variables the block reads at them. Blocks marked ``continuation``
run after the blocks before them on the same page (pytest-markdown-docs runs the page's code so far,
in order, then the block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # repo root importable (python -m pytest, or this rootdir conftest put it on sys.path)
    from tests import docs_fakes
    from tests.stripe_standin import StripeStandIn, serve
except ImportError:  # pragma: no cover - tests/ itself on sys.path
    import docs_fakes  # type: ignore[no-redef]
    from stripe_standin import StripeStandIn, serve  # type: ignore[no-redef]

_ISOLATED = ("AGENT_LEDGER_", "OPENAI_", "ANTHROPIC_", "SLACK_", "STRIPE_")


@pytest.fixture(autouse=True)
def _docs_block_sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
    """For documentation blocks only: a fresh working directory and SQLite database per block.

    The stand-in fixtures depend on this one, so that it runs first: pytest-markdown-docs sets up the
    fixtures a block names before the autouse ones."""
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(_ISOLATED)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AGENT_LEDGER_URL", f"sqlite:///{tmp_path / 'agent_ledger.db'}")
    yield


@pytest.fixture
def stripe_api(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeStandIn]:
    """A local stand-in of the Stripe API (tests/stripe_standin.py), in ``$STRIPE_API_BASE``."""
    clock = docs_fakes.Clock()
    standin = StripeStandIn(clock=clock)
    with serve(standin) as base_url:
        monkeypatch.setenv("STRIPE_API_BASE", base_url)
        monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_standin")
        yield standin


@pytest.fixture
def fake_openai(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[docs_fakes.ScriptedModel]:
    """A scripted OpenAI-compatible server (chat completions and responses) in ``$OPENAI_BASE_URL``."""
    model = docs_fakes.ScriptedModel()
    with docs_fakes.serve_model(model) as base_url:
        monkeypatch.setenv("OPENAI_BASE_URL", base_url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-standin")
        yield model


@pytest.fixture
def fake_anthropic(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[docs_fakes.ScriptedModel]:
    """A scripted Anthropic Messages API server in ``$ANTHROPIC_BASE_URL``."""
    model = docs_fakes.ScriptedModel()
    with docs_fakes.serve_model(model) as base_url:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-standin")
        yield model


@pytest.fixture
def slack_env(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made-up Slack credentials for blocks that only build a SlackChannel (nothing is posted)."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-not-a-real-token")
    monkeypatch.setenv("SLACK_CHANNEL_ID", "C0123456789")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "not-a-real-signing-secret")


@pytest.fixture
def webhook_env(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh Standard Webhooks secret in ``$AGENT_LEDGER_WEBHOOK_SECRET``."""
    import base64
    import secrets

    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("AGENT_LEDGER_WEBHOOK_SECRET", secret)
    return secret


@pytest.fixture
def background_http_server(_docs_block_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """For a block that ends in ``ThreadingHTTPServer(...).serve_forever()``: the server binds a free
    port of 127.0.0.1 and serves from a thread until the test ends, so the block returns."""
    import http.server
    import threading

    servers: list[Any] = []

    class Server(http.server.ThreadingHTTPServer):
        def __init__(self, address: Any, handler: Any, bind_and_activate: bool = True) -> None:
            super().__init__(("127.0.0.1", 0), handler, bind_and_activate)
            servers.append(self)

        def serve_forever(self, poll_interval: float = 0.5) -> None:
            threading.Thread(target=super().serve_forever, args=(poll_interval,), daemon=True).start()

    monkeypatch.setattr(http.server, "ThreadingHTTPServer", Server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def pg_env(_docs_block_sandbox: None, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh Postgres database in ``$PG_URL``, on the server tests/conftest.py started for the session
    (skipped when that server is not there: run the docs together with tests/, as scripts/test.sh does)."""
    import uuid

    import psycopg
    from psycopg import sql

    option = request.config.option
    host, port = getattr(option, "postgresql_host", None), getattr(option, "postgresql_port", None)
    if not host or not port:
        pytest.skip("no test Postgres server: run the docs with the test suite (bash scripts/test.sh)")
    user = option.postgresql_user
    password = getattr(option, "postgresql_password", None) or ""
    name = f"docs_{uuid.uuid4().hex[:12]}"
    admin = dict(host=host, port=int(port), user=user, password=password, dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    auth = f"{user}:{password}" if password else user
    monkeypatch.setenv("PG_URL", f"postgresql+psycopg://{auth}@{host}:{port}/{name}")
    yield name
    with psycopg.connect(**admin) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pgbouncer_env(pg_env: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``pg_env``'s database through a throwaway PgBouncer in transaction pooling mode (tests/_pgbouncer.py),
    in ``$PGBOUNCER_URL`` with ``?pgbouncer=transaction``."""
    try:
        from tests._pgbouncer import PgBouncer
    except ImportError:  # pragma: no cover - tests/ itself on sys.path
        from _pgbouncer import PgBouncer  # type: ignore[no-redef]

    option = request.config.option
    password = getattr(option, "postgresql_password", None) or None
    with PgBouncer(option.postgresql_host, int(option.postgresql_port), option.postgresql_user, password) as bouncer:
        url = bouncer.url(pg_env)
        monkeypatch.setenv("PGBOUNCER_URL", url)
        yield url


@pytest.fixture
def chat_model(_docs_block_sandbox: None) -> Any:
    """A LangChain chat model stand-in: asks for ``charge(customer="cus_123", amount=100)``, then answers."""
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage

    class ScriptedChatModel(FakeMessagesListChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    return ScriptedChatModel(
        responses=[
            AIMessage("", tool_calls=[{"name": "charge", "args": dict(docs_fakes.TOOL_ARGS), "id": "call_1"}]),
            AIMessage("The customer was charged."),
        ]
    )
