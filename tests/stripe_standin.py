"""A local stand-in for the few parts of the Stripe API that docs/payments.md relies on.

It is not Stripe; it implements, on purpose, the behaviour the payments page warns about:

* ``POST /v1/charges`` and ``POST /v1/payment_intents`` (form-encoded, ``metadata[k]=v``): each
  creation is one *execution*, counted in ``executions`` (the number of charges the tests assert on).
  The card token ``tok_chargeDeclined`` is declined with a 402 ``card_error``; a missing ``amount``
  is a 400 validation error.
* The ``Idempotency-Key`` header: the status and body of the first request that reached the endpoint
  are saved under the key (a 402 decline included) and replayed, with ``Idempotent-Replayed: true``,
  to any later request with that key and the same parameters; other parameters under the same key get
  a 400 ``idempotency_error``. Validation errors are not saved. A key is forgotten once it is 24 hours
  old, after which the same key executes again. The clock is injectable (``clock=``), so the tests
  move time forward instead of waiting.
* ``GET /v1/charges/search?query=metadata['k']:'v'`` (clauses joined with `` AND ``): the charges
  whose metadata match, newest first. ``GET /v1/charges/{id}``. Nothing can be looked up by
  idempotency key, as on Stripe.
* Every request needs HTTP basic auth with a secret key (``sk_...``) as the user name, else 401.

Use it in process through ``httpx.MockTransport(standin.handler)`` or, when another process must
reach it (the crash tests), as a real HTTP server on 127.0.0.1 with :func:`serve`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

__all__ = ["DAY", "StripeStandIn", "serve"]

DAY = 24 * 3600.0
DECLINED_TOKEN = "tok_chargeDeclined"
_CLAUSE = re.compile(r"metadata\['([^'\\]+)'\]:'([^'\\]*)'")


class StripeStandIn:
    """The stand-in's state: created objects, saved idempotent responses, a clock."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.objects: dict[str, dict[str, Any]] = {}  # id -> charge or payment intent, in creation order
        self.saved: dict[tuple[str, str], tuple[float, str, dict[str, str], int, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, idempotency key)
        # Over HTTP (serve()) only: called after a POST was handled and before its answer is sent
        # (the crash tests kill the client there); drop_answers > 0 closes the connection instead of
        # answering that many POSTs (the client sees a network error after the charge was made).
        self.before_answer: Callable[[], None] | None = None
        self.drop_answers = 0
        self._lock = threading.Lock()
        self._ids = 0

    @property
    def executions(self) -> int:
        """How many objects were created (each one a real charge on Stripe)."""
        return len(self.objects)

    @property
    def charges(self) -> list[dict[str, Any]]:
        return [o for o in self.objects.values() if o["object"] == "charge"]

    # ---- the API -------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one request: (status, JSON body, extra headers)."""
        headers = {k.lower(): v for k, v in headers.items()}
        url = urlsplit(target)
        path = url.path
        account = _secret_key(headers.get("authorization", ""))
        with self._lock:
            self.requests.append((method, path, headers.get("idempotency-key")))
            if account is None:
                return 401, _error("invalid_request_error", "Invalid API Key provided."), {}
            if method == "POST" and path in ("/v1/charges", "/v1/payment_intents"):
                form = dict(parse_qsl(body.decode(), keep_blank_values=True))
                return self._create(account, path, form, headers.get("idempotency-key"))
            if method == "GET" and path == "/v1/charges/search":
                query = dict(parse_qsl(url.query)).get("query", "")
                return self._search(query)
            if method == "GET" and path.startswith("/v1/charges/"):
                found = self.objects.get(path.rsplit("/", 1)[1])
                if found is None or found["object"] != "charge":
                    return 404, _error("invalid_request_error", "No such charge", code="resource_missing"), {}
                return 200, found, {}
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})"), {}

    def _create(
        self, account: str, path: str, form: dict[str, str], idem_key: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        now = self.clock()
        fingerprint = json.dumps([path, sorted(form.items())])
        if idem_key is not None:
            for k, (saved_at, *_) in list(self.saved.items()):  # keys are pruned once 24 hours old
                if now - saved_at >= DAY:
                    del self.saved[k]
            saved = self.saved.get((account, idem_key))
            if saved is not None:
                _, saved_fingerprint, saved_headers, status, saved_body = saved
                if saved_fingerprint != fingerprint:
                    return (
                        400,
                        _error(
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters they were first "
                            f"used with. Try using a key other than '{idem_key}' if you meant to execute a different "
                            "request.",
                        ),
                        {},
                    )
                return status, saved_body, {**saved_headers, "idempotent-replayed": "true"}
        try:
            amount = int(form["amount"])
            currency = form["currency"]
        except (KeyError, ValueError):  # validation: no endpoint ran, nothing is saved under the key
            return 400, _error("invalid_request_error", "Missing required param: amount.", param="amount"), {}
        metadata = {m.group(1): v for k, v in form.items() if (m := re.fullmatch(r"metadata\[(.+)\]", k))}
        if form.get("source") == DECLINED_TOKEN:
            status, body = 402, _error("card_error", "Your card was declined.", code="card_declined")
        else:
            self._ids += 1
            kind = "charge" if path == "/v1/charges" else "payment_intent"
            prefix = "ch" if kind == "charge" else "pi"
            body = {
                "id": f"{prefix}_standin{self._ids:06d}",
                "object": kind,
                "amount": amount,
                "currency": currency,
                "customer": form.get("customer"),
                "metadata": metadata,
                "created": int(now),
                "status": "succeeded",
                "paid": True,
            }
            self.objects[body["id"]] = body
            status = 200
        if idem_key is not None:
            self.saved[(account, idem_key)] = (now, fingerprint, {"idempotency-key": idem_key}, status, body)
        return status, body, {"idempotency-key": idem_key} if idem_key else {}

    def _search(self, query: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        clauses = [c.strip() for c in query.split(" AND ")] if query else []
        wanted: dict[str, str] = {}
        for clause in clauses:
            m = _CLAUSE.fullmatch(clause)
            if m is None:
                return 400, _error("invalid_request_error", f"The stand-in only searches metadata: {clause!r}"), {}
            wanted[m.group(1)] = m.group(2)
        if not wanted:
            return 400, _error("invalid_request_error", "Missing required param: query.", param="query"), {}
        hits = [c for c in reversed(self.charges) if all(c["metadata"].get(k) == v for k, v in wanted.items())]
        return 200, {"object": "search_result", "data": hits, "has_more": False, "url": "/v1/charges/search"}, {}

    # ---- transports ------------------------------------------------------------------------------

    def handler(self, request: httpx.Request) -> httpx.Response:
        """For ``httpx.MockTransport``: the stand-in inside this process."""
        target = request.url.raw_path.decode()
        status, body, extra = self.handle(request.method, target, dict(request.headers), request.read())
        return httpx.Response(status, json=body, headers=extra)


def _secret_key(authorization: str) -> str | None:
    if authorization.lower().startswith("basic "):
        with contextlib.suppress(ValueError):
            user = base64.b64decode(authorization[6:]).decode().partition(":")[0]
            return user if user.startswith("sk_") else None
    if authorization.lower().startswith("bearer sk_"):
        return authorization[7:]
    return None


def _error(kind: str, message: str, **more: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, **more}}


@contextlib.contextmanager
def serve(standin: StripeStandIn) -> Iterator[str]:
    """Serve ``standin`` over HTTP on a free port of 127.0.0.1; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            status, data, extra = standin.handle(self.command, self.path, dict(self.headers.items()), body)
            if self.command == "POST":
                if standin.before_answer is not None:
                    standin.before_answer()
                if standin.drop_answers > 0:
                    standin.drop_answers -= 1
                    self.close_connection = True
                    return
            raw = json.dumps(data).encode()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client killed meanwhile
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
