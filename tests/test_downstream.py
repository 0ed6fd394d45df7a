"""current_effect() and IdempotencyKeyAuth: the call's key reaches downstream HTTP APIs by itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx
import pytest

from agent_ledger import Effect, Ledger, current_effect
from agent_ledger.downstream import IdempotencyKeyAuth


class _Recorder:
    """A fake downstream API (an httpx MockTransport) that records the headers it received."""

    def __init__(self, challenge: bool = False) -> None:
        self.seen: list[httpx.Headers] = []
        self.challenge = challenge

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(httpx.Headers(request.headers))  # a copy: auth flows mutate the request
        if self.challenge and "x-token" not in request.headers:
            return httpx.Response(401)
        return httpx.Response(200, json={"ok": True})


class _ChallengeAuth(httpx.Auth):
    """A two-step auth (like Digest): send bare, and on a 401 resend with a token."""

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        if response.status_code == 401:
            request.headers["X-Token"] = "t0k"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        response = yield request
        if response.status_code == 401:
            request.headers["X-Token"] = "t0k"
            yield request


def test_current_effect_is_set_only_inside_a_sync_handler(ledger: Ledger) -> None:
    seen: list[Effect | None] = []

    @ledger.tool("t")
    def t(x: int, effect: Effect) -> int:
        seen.append(current_effect())
        assert current_effect() is effect
        return x

    assert current_effect() is None
    with ledger.workflow("wf-ce"):
        assert t(1) == 1
        assert current_effect() is None
        assert t(1) == 1  # a replay runs no handler
    assert len(seen) == 1 and seen[0] is not None and seen[0].tool == "t"
    assert current_effect() is None


def test_current_effect_inside_a_step(ledger: Ledger) -> None:
    seen: list[str] = []

    def turn(prompt: str) -> str:
        effect = current_effect()
        assert effect is not None
        seen.append(effect.tool)
        return prompt.upper()

    with ledger.workflow("wf-step"):
        assert ledger.step("model", turn, "hi") == "HI"
    assert seen == ["agent_ledger.step"] and current_effect() is None  # steps share one tool name


def test_current_effect_is_reset_after_a_failing_handler(ledger: Ledger) -> None:
    @ledger.tool("boom")
    def boom() -> None:
        assert current_effect() is not None
        raise RuntimeError("no")

    with ledger.workflow("wf-fail"), pytest.raises(RuntimeError):
        boom()
    assert current_effect() is None


async def test_current_effect_in_async_handlers_is_per_task(ledger: Ledger) -> None:
    keys: dict[int, str] = {}

    @ledger.tool("a")
    async def a(n: int, effect: Effect) -> int:
        await asyncio.sleep(0.01)  # interleave the tasks
        got = current_effect()
        assert got is not None
        keys[n] = got.idem_key
        assert got.idem_key == effect.idem_key
        return n

    async with ledger.workflow("wf-async"):
        assert await asyncio.gather(a(1), a(2), a(3)) == [1, 2, 3]
    assert len(set(keys.values())) == 3
    assert current_effect() is None


def test_auth_sets_the_key_inside_a_handler_only_sync(ledger: Ledger) -> None:
    api = _Recorder()
    client = httpx.Client(transport=httpx.MockTransport(api), auth=IdempotencyKeyAuth())
    runs: list[str] = []

    @ledger.tool("charge")
    def charge(amount: int, effect: Effect) -> int:
        runs.append(effect.idem_key)
        return client.post("https://api.example/charges", json={"amount": amount}).status_code

    client.get("https://api.example/outside")
    with ledger.workflow("wf-http"):
        assert charge(5) == 200
        assert charge(5) == 200  # replayed: no second request
    client.get("https://api.example/outside")
    assert len(runs) == 1
    assert [h.get("idempotency-key") for h in api.seen] == [None, runs[0], None]


async def test_auth_sets_the_key_inside_a_handler_only_async(ledger: Ledger) -> None:
    api = _Recorder()
    runs: list[str] = []
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(api), auth=IdempotencyKeyAuth(header="X-Idem")
    ) as client:

        @ledger.tool("send")
        async def send(to: str, effect: Effect) -> int:
            runs.append(effect.idem_key)
            return (await client.post("https://api.example/send", json={"to": to})).status_code

        await client.get("https://api.example/outside")
        async with ledger.workflow("wf-ahttp"):
            assert await send("a") == 200
            assert await send("a") == 200
            assert await send("b") == 200
    assert len(runs) == 2
    assert [h.get("x-idem") for h in api.seen] == [None, runs[0], runs[1]]
    assert all("idempotency-key" not in h for h in api.seen)


def test_auth_composes_with_inner_sync(ledger: Ledger) -> None:
    api = _Recorder(challenge=True)
    auth = IdempotencyKeyAuth(inner=_ChallengeAuth())
    client = httpx.Client(transport=httpx.MockTransport(api), auth=auth)
    keys: list[str] = []

    def call(effect: Effect) -> int:
        keys.append(effect.idem_key)
        return client.get("https://api.example/x").status_code

    with ledger.workflow("wf-inner"):
        from agent_ledger import ToolCall

        assert ledger.run(ToolCall(workflow_id="wf-inner", tool="x", args={}), call) == 200
    assert len(api.seen) == 2  # the inner auth's challenge round trip, both stamped
    assert [h.get("idempotency-key") for h in api.seen] == [keys[0], keys[0]]
    assert [h.get("x-token") for h in api.seen] == [None, "t0k"]

    basic = httpx.Client(
        transport=httpx.MockTransport(api := _Recorder()), auth=IdempotencyKeyAuth(inner=httpx.BasicAuth("u", "p"))
    )
    basic.get("https://api.example/outside")
    assert api.seen[0]["authorization"].startswith("Basic ") and "idempotency-key" not in api.seen[0]


async def test_auth_composes_with_inner_async(ledger: Ledger) -> None:
    api = _Recorder(challenge=True)
    keys: list[str] = []
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(api), auth=IdempotencyKeyAuth(inner=_ChallengeAuth())
    ) as client:

        async def call(effect: Effect) -> int:
            keys.append(effect.idem_key)
            return (await client.get("https://api.example/x")).status_code

        from agent_ledger import ToolCall

        assert await ledger.arun(ToolCall(workflow_id="wf-ainner", tool="x", args={}), call) == 200
        await client.get("https://api.example/outside")
    assert [h.get("idempotency-key") for h in api.seen] == [keys[0], keys[0], None, None]
    assert [h.get("x-token") for h in api.seen] == [None, "t0k", None, "t0k"]


def test_an_explicit_header_is_kept_and_the_key_is_stable_across_attempts(ledger: Ledger) -> None:
    api = _Recorder()
    client = httpx.Client(transport=httpx.MockTransport(api), auth=IdempotencyKeyAuth())
    state = {"fail": True}

    @ledger.tool("flaky")
    def flaky(n: int) -> int:
        client.post("https://api.example/a")
        client.post("https://api.example/b", headers={"Idempotency-Key": "mine"})
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("transient")
        return n

    with ledger.workflow("wf-retry"):
        with pytest.raises(RuntimeError):
            flaky(1)
        assert flaky(1) == 1  # on_error="retry": a second attempt, same idem_key
    got = [h.get("idempotency-key") for h in api.seen]
    assert got[1] == got[3] == "mine"
    assert got[0] == got[2] and got[0] not in (None, "mine")


@pytest.mark.parametrize("bad", ["", "a:b", "x\r\ny", 5])
def test_bad_header_names_are_refused(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        IdempotencyKeyAuth(header=bad)
    with pytest.raises(TypeError):
        IdempotencyKeyAuth(inner="secret")  # type: ignore[arg-type]
