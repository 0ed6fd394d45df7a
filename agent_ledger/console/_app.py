"""The web console: a Starlette app of server-rendered Jinja2 pages (``Ledger.console_app``).

Routes: ``GET /`` (approvals inbox), ``GET /workflows``, ``GET /workflows/{workflow_id}``,
``GET /unknown``, ``GET /budgets`` (``ledger.usage()``), ``POST /approvals/{id}/approve`` and
``/reject`` (form field ``reason``), ``POST /effects/{key}/resolve`` (``outcome`` = result | error |
retry, ``value``), ``GET``/``POST /login`` (``user``, ``token``) and ``GET /healthz`` (no auth).

Every other request is authenticated first (``_Guard``): ``Authorization: Bearer TOKEN``, a trusted
header set by an SSO proxy, or the signed session cookie the login form sets. A request that is not
gets 401 (browsers: a redirect to the login form) and changes nothing. POSTs authenticated by a cookie
or a proxy header (what a browser sends by itself) also need the page's CSRF token (form field
``csrf_token``), else 403; bearer requests need none. Who decides or resolves is always the
authenticated user. All stored text is escaped (Jinja2 autoescape), pages carry a strict
Content-Security-Policy, and bodies over the limit get 413 before they are read.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .._models import Status
from .._store import Work
from .._text import MAX_APPROVAL_ID, MAX_NAME, MAX_REASON, check_text, printable, text_problem
from .._timeline import NEEDS_HUMAN, displayable, effects_of_query
from ..errors import (
    ApprovalRefused,
    ConfigurationError,
    IllegalTransition,
    InvalidArguments,
    LedgerError,
    StorageError,
)
from . import ConsoleAuth

if TYPE_CHECKING:
    from .._ledger import Ledger

__all__ = ["build_app"]

COOKIE = "agent_ledger_console"
EARLIER = 5
"""How many of a workflow's latest effects the inbox shows with each request."""
PUBLIC = frozenset({"/healthz", "/login"})
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
NOTICES = {
    "approved": "Approved.",
    "voted": "Your approval is recorded; the request needs more approvals.",
    "rejected": "Rejected.",
    "resolved": "Resolved.",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Refused(Exception):
    """An answer other than the page: a status and a message for people (never a secret)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _route_path(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _wants_html(headers: Mapping[str, str]) -> bool:
    return "text/html" in headers.get("accept", "")


class _Sessions:
    """Signed session cookies: ``{"u": user, "s": session id}``, valid ``session_seconds``."""

    def __init__(self, auth: ConsoleAuth) -> None:
        self.auth = auth
        self.signer = URLSafeTimedSerializer(auth.secret_key, salt="agent-ledger-console-session")

    def make(self, user: str) -> str:
        return self.signer.dumps({"u": user, "s": secrets.token_urlsafe(18)})

    def read(self, cookie: str) -> tuple[str, str] | None:
        if len(cookie) > 4096:
            return None
        try:
            data = self.signer.loads(cookie, max_age=self.auth.session_seconds)
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("s"), str):
            return None
        if not self.auth.has_user(data["u"]):
            return None  # the user was removed since the login
        return data["u"], data["s"]


def _cookie(headers: Mapping[str, str], name: str) -> str | None:
    from http.cookies import CookieError, SimpleCookie

    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


class _Guard:
    """ASGI middleware: authentication (or 401 / a redirect to the login form), security headers."""

    def __init__(self, app: ASGIApp, auth: ConsoleAuth, sessions: _Sessions) -> None:
        self.app = app
        self.auth = auth
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        path = _route_path(scope)
        if path in PUBLIC:
            await self.app(scope, receive, secured)
            return
        headers = _headers(scope)
        who = self.identify(headers)
        if who is None:
            root = str(scope.get("root_path", ""))
            if _wants_html(headers):
                response: Response = RedirectResponse(f"{root}/login", status_code=303)
            else:
                response = JSONResponse(
                    {"ok": False, "error": "authentication required"},
                    status_code=401,
                    headers={"www-authenticate": 'Bearer realm="agent-ledger console"'},
                )
            await response(scope, receive, secured)
            return
        scope.setdefault("state", {})
        scope["state"]["console_user"], scope["state"]["console_csrf"] = who
        await self.app(scope, receive, secured)

    def identify(self, headers: Mapping[str, str]) -> tuple[str, str | None] | None:
        """(user, the CSRF token their POSTs need, or None for bearer requests), or None."""
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            user = self.auth.user_for_token(token.strip())
            return (user, None) if user is not None else None
        if self.auth.trusted_header is not None:
            name = headers.get(self.auth.trusted_header, "").strip()
            if name:
                if text_problem(name, MAX_NAME) is not None or not name.isprintable():
                    return None
                return name, self.auth.csrf_token(f"header|{name}")
        cookie = _cookie(headers, COOKIE)
        if cookie:
            found = self.sessions.read(cookie)
            if found is not None:
                user, sid = found
                return user, self.auth.csrf_token(f"session|{sid}")
        return None


class _Console:
    """The pages and actions, on one ledger."""

    def __init__(self, ledger: Ledger, auth: ConsoleAuth, sessions: _Sessions, max_body_bytes: int) -> None:
        self.ledger = ledger
        self.auth = auth
        self.sessions = sessions
        self.max_body_bytes = max_body_bytes
        self.env = Environment(
            loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
            autoescape=True,
            undefined=StrictUndefined,
        )
        self.env.filters["pretty"] = _pretty
        self.env.filters["when"] = _when
        self.env.filters["ms"] = _ms
        self.env.filters["number"] = _number
        self.env.filters["q"] = lambda v: urllib.parse.quote(str(v), safe="")

    # -- plumbing ----------------------------------------------------------------------------

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        state = request.scope.get("state", {})
        html = self.env.get_template(template).render(
            section={"timeline.html": "workflows"}.get(template, template.split(".")[0]),
            root=request.scope.get("root_path", ""),
            user=state.get("console_user"),
            csrf=state.get("console_csrf") or "",
            notice=NOTICES.get(request.query_params.get("notice", "")),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def refused(self, request: Request, status: int, message: str) -> Response:
        message = printable(message, 500)
        if _wants_html(_headers(request.scope)):
            return self.page(request, "message.html", status, title=f"{status}", message=message)
        return JSONResponse({"ok": False, "error": message}, status_code=status)

    async def form(self, request: Request) -> dict[str, str]:
        """The urlencoded body (at most ``max_body_bytes``, UTF-8), one value per field."""
        headers = _headers(request.scope)
        declared = headers.get("content-length")
        if declared is not None:
            digits = declared.strip()
            if not (digits.isascii() and digits.isdigit()):
                raise _Refused(400, "Content-Length is not a number")
            if len(digits) > 18 or int(digits) > self.max_body_bytes:
                raise _Refused(413, f"request body over the limit of {self.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise _Refused(413, f"request body over the limit of {self.max_body_bytes} bytes")
        if not body:
            return {}  # no field at all (an approval without a reason)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise _Refused(415, "send the form as application/x-www-form-urlencoded")
        try:
            text = bytes(body).decode("utf-8")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=20, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "the form is not valid UTF-8 urlencoded data") from None
        fields: dict[str, str] = {}
        for name, value in pairs:
            if name in fields:
                raise _Refused(400, f"the form field {printable(name, 40)!r} appears twice")
            fields[name] = value
        return fields

    def check_csrf(self, request: Request, fields: Mapping[str, str]) -> None:
        expected = request.scope.get("state", {}).get("console_csrf")
        if expected is None:
            return  # a bearer request: a browser never adds the header by itself
        given = fields.get("csrf_token", "")
        if not secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
            raise _Refused(403, "missing or wrong CSRF token: reload the page and try again")

    async def run(self, request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run a page or action; map refusals and the ledger's errors to 4xx answers (never a trace)."""
        try:
            return await handler()
        except _Refused as e:
            return self.refused(request, e.status, e.message)
        except ApprovalRefused as e:
            return self.refused(request, 409, str(e))
        except (InvalidArguments, ConfigurationError) as e:
            return self.refused(request, 400, str(e))
        except IllegalTransition as e:
            return self.refused(request, 409, str(e))
        except StorageError:
            return self.refused(request, 503, "the ledger database is unavailable; try again")
        except LedgerError as e:
            return self.refused(request, 409, str(e))

    def user(self, request: Request) -> str:
        return str(request.scope["state"]["console_user"])

    def done(self, request: Request, to: str, notice: str, data: Mapping[str, Any]) -> Response:
        if _wants_html(_headers(request.scope)):
            root = request.scope.get("root_path", "")
            return RedirectResponse(f"{root}{to}?notice={notice}", status_code=303)
        return JSONResponse({"ok": True, **data})

    # -- pages ---------------------------------------------------------------------------------

    async def inbox(self, request: Request) -> Response:
        async def go() -> Response:
            pending = await run_in_threadpool(self.ledger.pending_approvals)
            if not _wants_html(_headers(request.scope)):
                return JSONResponse([a.model_dump(mode="json") for a in pending])
            before = await run_in_threadpool(self.earlier, sorted({a.workflow_id for a in pending}))
            items = []
            for a in pending:
                earlier = before.get(a.workflow_id, [])
                items.append({"a": a, "args": displayable(a.args), "progress": a.progress, "earlier": earlier})
            return self.page(request, "inbox.html", items=items)

        return await self.run(request, go)

    def earlier(self, workflow_ids: list[str]) -> dict[str, list[Mapping[str, Any]]]:
        """What the agent did before, for the inbox: the latest effects of each workflow (one query)."""
        found: dict[str, list[Mapping[str, Any]]] = {}
        for i in range(0, len(workflow_ids), 200):
            stmt = effects_of_query(self.ledger.tables, workflow_ids[i : i + 200], EARLIER)
            for row in self.ledger._rt.do(Work(((stmt, {}),), "rows", False, "inbox")):
                found.setdefault(row["workflow_id"], []).append(row)
        return found

    async def workflows(self, request: Request) -> Response:
        async def go() -> Response:
            q = request.query_params
            status = q.get("status") or None
            since_text = q.get("since") or None
            since = _duration(since_text) if since_text else None
            try:
                limit = int(q.get("limit", "50"))
            except ValueError:
                raise _Refused(400, "limit must be a number") from None
            cursor = q.get("cursor") or None
            page = await run_in_threadpool(
                lambda: self.ledger.workflows(status=status, since=since, limit=limit, cursor=cursor)
            )
            if not _wants_html(_headers(request.scope)):
                return JSONResponse(page.model_dump(mode="json"))
            following = None
            if page.next_cursor:
                keep = {k: v for k, v in (("status", status), ("since", since_text), ("limit", str(limit))) if v}
                following = urllib.parse.urlencode({**keep, "cursor": page.next_cursor})
            return self.page(
                request,
                "workflows.html",
                page=page,
                chosen=status or "",
                since=since_text or "",
                statuses=[s.value for s in Status] + [NEEDS_HUMAN],
                following=following,
            )

        return await self.run(request, go)

    async def workflow(self, request: Request) -> Response:
        async def go() -> Response:
            workflow_id = request.path_params["workflow_id"]
            if text_problem(workflow_id, MAX_NAME) is not None:
                raise _Refused(404, "no such workflow")
            timeline = await run_in_threadpool(self.ledger.timeline, workflow_id)
            if timeline.empty:
                raise _Refused(404, f"nothing recorded for workflow {printable(workflow_id, 80)!r}")
            if not _wants_html(_headers(request.scope)):
                return JSONResponse(timeline.model_dump(mode="json"))
            return self.page(request, "timeline.html", t=timeline)

        return await self.run(request, go)

    async def unknown(self, request: Request) -> Response:
        async def go() -> Response:
            records = await run_in_threadpool(lambda: self.ledger.effects(status=Status.UNKNOWN))
            if not _wants_html(_headers(request.scope)):
                return JSONResponse([r.model_dump(mode="json", exclude={"events"}) for r in records])
            items = [{"r": r, "args": displayable(r.args)} for r in records]
            return self.page(request, "unknown.html", items=items)

        return await self.run(request, go)

    async def budgets(self, request: Request) -> Response:
        async def go() -> Response:
            usage = await run_in_threadpool(self.ledger.usage)
            rows = [dataclasses.asdict(u) for u in usage]
            if not _wants_html(_headers(request.scope)):
                return JSONResponse([{k: _jsonable(v) for k, v in row.items()} for row in rows])
            for row in rows:
                row["pct"] = round(min(100.0, 100.0 * row["used"] / row["max"]), 1) if row["max"] > 0 else 100.0
            return self.page(request, "budgets.html", rows=rows)

        return await self.run(request, go)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    # -- login -----------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self.page(request, "login.html", failed=False, tokens=bool(self.auth.users))

    async def login(self, request: Request) -> Response:
        async def go() -> Response:
            if not self.auth.users:
                raise _Refused(404, "this console is signed in to through the reverse proxy")
            fields = await self.form(request)
            user, token = fields.get("user", ""), fields.get("token", "")
            if not user or not token or len(user) > MAX_NAME or not self.auth.check(user, token):
                return self.page(request, "login.html", 401, failed=True, tokens=True)
            root = request.scope.get("root_path", "")
            response = RedirectResponse(f"{root}/", status_code=303)
            response.set_cookie(
                COOKIE,
                self.sessions.make(user),
                max_age=self.auth.session_seconds,
                path=f"{root}/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response

        return await self.run(request, go)

    # -- actions ---------------------------------------------------------------------------------

    async def approve(self, request: Request) -> Response:
        return await self.decide(request, "approve")

    async def reject(self, request: Request) -> Response:
        return await self.decide(request, "reject")

    async def decide(self, request: Request, action: str) -> Response:
        async def go() -> Response:
            approval_id = request.path_params["approval_id"]
            fields = await self.form(request)
            self.check_csrf(request, fields)
            if text_problem(approval_id, MAX_APPROVAL_ID) is not None:
                raise _Refused(404, "no such approval request")
            reason = fields.get("reason", "").strip() or None
            by = self.user(request)
            if action == "approve":
                decided = await run_in_threadpool(lambda: self.ledger.approve(approval_id, by=by, reason=reason))
                notice = "approved" if decided.status.value == "approved" else "voted"
            else:
                if reason is None:
                    raise _Refused(400, "a rejection needs a reason")
                decided = await run_in_threadpool(lambda: self.ledger.reject(approval_id, by=by, reason=reason))
                notice = "rejected"
            data = decided.model_dump(mode="json")
            data["args"] = displayable(data["args"])
            return self.done(request, "/", notice, {"approval": data, "progress": decided.progress})

        return await self.run(request, go)

    async def resolve(self, request: Request) -> Response:
        async def go() -> Response:
            key = request.path_params["key"]
            fields = await self.form(request)
            self.check_csrf(request, fields)
            outcome, value = fields.get("outcome", ""), fields.get("value", "")
            kwargs: dict[str, Any]
            if outcome == "result":
                try:
                    kwargs = {"result": json.loads(value)}
                except (ValueError, RecursionError):
                    raise _Refused(400, "value must be the result as JSON") from None
            elif outcome == "error":
                if not value.strip():
                    raise _Refused(400, "value must be the error message")
                kwargs = {"error": check_text(value, "the error message", MAX_REASON)}
            elif outcome == "retry":
                kwargs = {"retry": True}
            else:
                raise _Refused(400, "outcome must be result, error or retry")
            if text_problem(key, MAX_NAME) is not None:
                raise _Refused(404, "no such effect")
            found = await run_in_threadpool(self.ledger.effect, key)
            if found is None:
                raise _Refused(404, "no such effect")
            by = self.user(request)
            record = await run_in_threadpool(lambda: self.ledger.resolve(key, by=by, **kwargs))
            return self.done(request, "/unknown", "resolved", {"key": record.key, "status": record.status.value})

        return await self.run(request, go)


def _pretty(value: Any) -> str:
    return json.dumps(displayable(value), indent=2, ensure_ascii=False, default=str, sort_keys=True)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S") + f".{value.microsecond // 1000:03d} UTC"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value:.3f} ms"
    if value < 1000:
        return f"{value:.1f} ms"
    return f"{value / 1000:.2f} s"


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        number, unit = float(text[:-1]), text[-1]
        if not 0 <= number <= 100 * 365 * 86400:
            raise ValueError(text)
        return timedelta(seconds=number * units[unit])
    except (ValueError, KeyError, IndexError, OverflowError):
        raise _Refused(400, "since must be a duration like 30d, 12h, 15m or 90s") from None


def build_app(ledger: Ledger, auth: ConsoleAuth, *, max_body_bytes: int = 64 * 1024) -> ASGIApp:
    """The console's ASGI app on ``ledger`` (``Ledger.console_app``)."""
    if not isinstance(auth, ConsoleAuth):
        raise ConfigurationError(
            "console_app needs auth=ConsoleAuth(users={...}) and/or ConsoleAuth(trusted_header=...): "
            "the console never runs without authentication"
        )
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes <= 0:
        raise ConfigurationError(f"max_body_bytes must be a positive int, not {max_body_bytes!r}")
    sessions = _Sessions(auth)
    c = _Console(ledger, auth, sessions, max_body_bytes)
    routes = [
        Route("/", c.inbox, methods=["GET"]),
        Route("/workflows", c.workflows, methods=["GET"]),
        Route("/workflows/{workflow_id:path}", c.workflow, methods=["GET"]),
        Route("/unknown", c.unknown, methods=["GET"]),
        Route("/approvals/{approval_id}/approve", c.approve, methods=["POST"]),
        Route("/approvals/{approval_id}/reject", c.reject, methods=["POST"]),
        Route("/effects/{key}/resolve", c.resolve, methods=["POST"]),
        Route("/login", c.login_form, methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/budgets", c.budgets, methods=["GET"]),
        Route("/healthz", c.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return _Guard(app, auth, sessions)
