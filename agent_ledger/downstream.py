"""Carry the running call's idempotency key to downstream HTTP APIs without copying it by hand.

``IdempotencyKeyAuth`` is an ``httpx.Auth``: attach it to an ``httpx.Client`` or ``httpx.AsyncClient``
and every request made inside a ledger handler carries the call's ``Effect.idem_key`` in the
``Idempotency-Key`` header (Stripe's name, also honoured by many payment and messaging APIs). The key
is the same on every attempt of the same call, so an API that deduplicates on it executes the call once
even when the ledger had to retry after a crash. Requests made outside a handler are left untouched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from ._context import current_effect

__all__ = ["IdempotencyKeyAuth"]


class IdempotencyKeyAuth(httpx.Auth):
    """An ``httpx.Auth`` that sets ``header`` to the running handler's ``Effect.idem_key``.

    ``inner`` is another ``httpx.Auth`` (for example ``httpx.BasicAuth`` with a Stripe secret key) that
    runs after the header is set, so both compose. A header the request already carries is kept (the
    caller said what it wanted). Outside a ledger handler the request passes through ``inner`` (or
    unchanged) with no header added.
    """

    def __init__(self, header: str = "Idempotency-Key", inner: httpx.Auth | None = None) -> None:
        if not isinstance(header, str) or not header.strip() or any(c in header for c in "\r\n:"):
            raise ValueError(f"header must be a non-empty HTTP header name, not {header!r}")
        if inner is not None and not isinstance(inner, httpx.Auth):
            raise TypeError(f"inner must be an httpx.Auth, not {type(inner).__name__}")
        self.header = header
        self.inner = inner
        if inner is not None:
            self.requires_request_body = inner.requires_request_body
            self.requires_response_body = inner.requires_response_body

    def _stamp(self, request: httpx.Request) -> None:
        effect = current_effect()
        if effect is not None and self.header not in request.headers:
            request.headers[self.header] = effect.idem_key

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Set the header, then hand over to ``inner``'s sync flow (or send the request)."""
        self._stamp(request)
        if self.inner is None:
            yield request
            return
        yield from self.inner.sync_auth_flow(request)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Set the header, then hand over to ``inner``'s async flow (or send the request)."""
        self._stamp(request)
        if self.inner is None:
            yield request
            return
        flow = self.inner.async_auth_flow(request)
        response: httpx.Response | None = None
        try:
            while True:
                response = yield await flow.asend(response)  # type: ignore[arg-type]  # asend(None) starts it
        except StopAsyncIteration:
            return
