"""The agent-ledger command: inspect and settle an agent_ledger database.

Exit codes: 0 success, 1 the command ran and found a problem (e.g. the demo saw a double execution, a
key does not exist, a decision was refused), 2 usage or configuration error, 3 database error, 141 the
reader of the output went away (``agent-ledger export | head``; 128 + SIGPIPE, as a shell reports it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sqlite3
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from ._hide import hide, hide_url
from ._ledger import Ledger
from ._models import Status
from ._text import printable
from ._timeline import NEEDS_HUMAN, displayable
from .errors import ConfigurationError, LedgerError, SchemaMissing, StorageError

__all__ = ["main"]


def _shown(url: str | None) -> str:
    """A URL for --help, with any password (and credential-like query value) masked."""
    if not url:
        return "unset"
    return hide_url(url)


def _url_option(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("AGENT_LEDGER_URL")
    p.add_argument(
        "--url",
        default=default,
        help=f"database URL (default: $AGENT_LEDGER_URL, now {_shown(default)}; else sqlite:///agent_ledger.db)",
    )
    p.add_argument("--table-prefix", default="agent_ledger_", help="table name prefix (default: agent_ledger_)")
    p.add_argument("--schema", default=None, help="Postgres schema holding the tables (default: search path)")


def _ledger(ns: argparse.Namespace, *, create: bool = False) -> Ledger:
    """The ledger named by --url. Only ``migrate`` (``create``) may create tables: every other command
    first checks, without writing, that the database holds the ledger's tables, and refuses a SQLite
    file that does not exist or lacks them (a typo in --url or --table-prefix would otherwise turn any
    file into an empty ledger and report nothing)."""
    ledger = Ledger(ns.url, table_prefix=ns.table_prefix, schema=ns.schema, auto_migrate=False)
    if not create and ledger._rt.dialect == "sqlite":
        from ._runtime import sqlite_file

        path = sqlite_file(ledger._rt.sync_url)
        if path and not os.path.exists(path):
            raise ConfigurationError(f"no ledger database at {path} (check --url / $AGENT_LEDGER_URL)")
        if path and ns.schema is None:
            _check_sqlite_tables(path, ledger)
    return ledger


def _check_sqlite_tables(path: str, ledger: Ledger) -> None:
    """Refuse a SQLite file without the ledger's tables, looking through a read-only connection (the
    ledger's own connections switch the file to WAL mode, which rewrites its header)."""
    from urllib.parse import quote

    t = ledger.tables
    wanted = [t.effects.name, t.events.name, t.approvals.name, t.inbound.name]
    try:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise ConfigurationError(f"{path} is not a SQLite database the ledger can read ({e})") from e
    missing = [name for name in wanted if name not in names]
    if missing:
        prefix = t.effects.name[: -len("effects")]
        what = "no ledger tables" if len(missing) == len(wanted) else f"not all ledger tables (missing {missing})"
        raise SchemaMissing(
            f"{path} has {what} with the prefix {prefix!r}: check --url and --table-prefix "
            f"(`agent-ledger migrate` creates the tables). Nothing was written."
        )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-ledger", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="an agent charges a customer, crashes and retries; the charge runs once")
    demo.add_argument("--db", help="SQLite file to use (default: a fresh temporary directory)")
    demo.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--crash", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--bank", help=argparse.SUPPRESS)
    demo.add_argument("--workflow", help=argparse.SUPPRESS)

    mig = sub.add_parser("migrate", help="create or upgrade the ledger's tables (alembic upgrade head)")
    mig.add_argument(
        "--partitions",
        type=_partitions,
        metavar="N",
        help="Postgres: create the tables hash-partitioned by workflow_id into N partitions (docs/scaling.md)",
    )
    _url_option(mig)

    hist = sub.add_parser("history", help="the effects of a workflow with their audit events")
    hist.add_argument("workflow_id")
    hist.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _url_option(hist)

    show = sub.add_parser("show", help="one effect by key, with its audit events")
    show.add_argument("key")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    _url_option(show)

    appr = sub.add_parser("approvals", help="list, approve and reject approval requests")
    asub = appr.add_subparsers(dest="action", required=True)
    alist = asub.add_parser("list", help="pending approval requests")
    alist.add_argument("--workflow", help="only this workflow")
    alist.add_argument("--tool", help="only this tool")
    alist.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _url_option(alist)
    for action in ("approve", "reject"):
        ap = asub.add_parser(action, help=f"{action} a pending request (the first decision wins)")
        ap.add_argument("approval_id")
        ap.add_argument("--by", required=True, help="who decides (audited; checked against the tool's approvers)")
        ap.add_argument("--reason", required=action == "reject", help="why (audited; shown to the agent)")
        _url_option(ap)

    lim = sub.add_parser(
        "limits",
        help="budgets used by declared limits (current windows), and resetting one",
        description="List how much of each budget (a Limit's name and scope) its current window used; "
        "`limits reset NAME SCOPE --by WHO` starts a budget again (audited).",
    )
    lim.add_argument("--workflow", help="only the budgets that constrain this workflow")
    lim.add_argument("--tool", help="only the budgets of limits covering this tool")
    lim.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _url_option(lim)
    lsub = lim.add_subparsers(dest="action", required=False)
    reset = lsub.add_parser("reset", help="start a budget again: forget what it used (every window; audited)")
    reset.add_argument("name", help="the limit's name (as `agent-ledger limits` shows it)")
    reset.add_argument("scope", help="the budget's scope: a workflow id, a tool, 'ledger' or a custom scope")
    reset.add_argument("--by", required=True, help="who resets it (audited)")
    _url_option(reset)

    prune = sub.add_parser("prune", help="delete settled records past their retention or older than a cutoff")
    prune.add_argument("--older-than", type=_duration, help="e.g. 30d, 12h, 15m, 90s (else: per-tool retention only)")
    prune.add_argument("--json", action="store_true", help="print the count as JSON")
    _url_option(prune)

    export = sub.add_parser("export", help="effects with their audit events as JSON lines")
    export.add_argument("--workflow", help="only this workflow")
    export.add_argument("--tool", help="only this tool")
    export.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    export.add_argument("--since", type=_when, help="created at or after (ISO 8601, e.g. 2026-11-01T00:00Z)")
    export.add_argument("--until", type=_when, help="created before (ISO 8601)")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")
    _url_option(export)

    rec = sub.add_parser("recover", help="settle effects whose worker died (expired leases) as unknown")
    rec.add_argument("--batch-size", type=int, default=100, help="rows locked per transaction (default: 100)")
    rec.add_argument("--json", action="store_true", help="print the report as JSON")
    _url_option(rec)

    proxy = sub.add_parser(
        "mcp-proxy",
        help="an MCP server (stdio) in front of another one: each tool call runs once (needs agent-ledger[mcp])",
        description="Start the upstream MCP server COMMAND (stdio) and serve its tools on stdin/stdout; each "
        "tools/call goes through the ledger. The workflow id is the request's _meta['agent-ledger/workflow-id'], "
        "else --workflow; with neither the call is refused.",
    )
    proxy.add_argument("--workflow", help="workflow id for calls whose _meta names none")
    proxy.add_argument(
        "--require-approval", nargs="+", default=[], metavar="TOOL", help="tools that need a human approval first"
    )
    proxy.add_argument(
        "--approve-destructive", action="store_true", help="also require approval for tools annotated destructiveHint"
    )
    proxy.add_argument("--approvers", nargs="+", default=None, metavar="NAME", help="who may decide (default: anyone)")
    proxy.add_argument(
        "--max-calls",
        type=_max_calls,
        default=None,
        metavar="N",
        help="each workflow may run at most N tool calls through the gateway (a loop guard; replays are free)",
    )
    proxy.add_argument("upstream", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the upstream server")
    _url_option(proxy)

    wf = sub.add_parser("workflow", help="one workflow's whole story in time order (the timeline)")
    wf.add_argument("workflow_id")
    wf.add_argument("--json", action="store_true", help="print the Timeline as JSON")
    _url_option(wf)

    wfs = sub.add_parser("workflows", help="workflows, newest activity first, with counts and who needs a person")
    wfs.add_argument(
        "--status",
        choices=[*(s.value for s in Status), NEEDS_HUMAN],
        help="only workflows with an effect in this status (needs_human: a pending approval or unknown outcome)",
    )
    wfs.add_argument("--since", type=_duration, help="only those active in the last DURATION (e.g. 24h, 7d)")
    wfs.add_argument("--limit", type=int, default=50, help="at most this many (1-500, default: 50)")
    wfs.add_argument("--cursor", help="the next page (printed at the end of the previous one)")
    wfs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _url_option(wfs)

    con = sub.add_parser(
        "console",
        help="serve the web console: approvals inbox, workflows, unknown outcomes (needs agent-ledger[console])",
        description="Serve the web console. It never starts without authentication: give users with tokens "
        "(--user NAME:TOKEN, repeatable, or --users-file with name:token lines) and/or --trusted-header, the "
        "header an SSO reverse proxy sets to the signed-in user's name.",
    )
    con.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    con.add_argument("--port", type=int, default=8700, help="port to listen on (default: 8700)")
    con.add_argument(
        "--user", action="append", default=[], metavar="NAME:TOKEN", help="a user and their token (repeatable)"
    )
    con.add_argument("--users-file", metavar="FILE", help="a file of name:token lines (keeps tokens out of ps)")
    con.add_argument("--trusted-header", metavar="HEADER", help="e.g. X-Forwarded-User, set by an SSO proxy")
    _url_option(con)

    res = sub.add_parser("resolve", help="settle an effect whose outcome is unknown")
    res.add_argument("key")
    how = res.add_mutually_exclusive_group(required=True)
    how.add_argument("--result", help="it happened: the JSON result later calls replay")
    how.add_argument("--error", help="it failed: this message is recorded as the error")
    how.add_argument("--retry", action="store_true", help="it did not happen: the next call runs the handler")
    res.add_argument("--by", required=True, help="who decided (audited)")
    res.add_argument("--reason", help="why (audited)")
    res.add_argument("--force", action="store_true", help="also settle a running effect with a live lease")
    _url_option(res)
    return parser


def _max_calls(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of calls (an integer >= 0)")
    return n


def _partitions(text: str) -> int | None:
    from ._migrate import check_partitions
    from .errors import InvalidArguments

    try:
        return check_partitions(text)
    except InvalidArguments as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        number, unit = float(text[:-1]), text[-1]
        return timedelta(seconds=number * units[unit])
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 15m or 90s") from None


def _when(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _export(ns: argparse.Namespace) -> int:
    filters = {"workflow_id": ns.workflow, "tool": ns.tool, "status": ns.status, "since": ns.since, "until": ns.until}
    with _ledger(ns) as ledger:
        if ns.output:
            try:
                out = open(ns.output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
            except OSError as e:
                raise ConfigurationError(f"cannot write {ns.output}: {e.strerror}") from e
            with out:
                n = ledger.export(out, **filters)
            print(f"exported {n} effect(s) to {ns.output}", file=sys.stderr)
        else:
            ledger.export(sys.stdout, **filters)
    return 0


def _history(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        records = ledger.history(ns.workflow_id)
    if ns.json:
        _print_json([r.model_dump(mode="json") for r in records])
        return 0
    if not records:
        print(f"no effects recorded for workflow {ns.workflow_id!r}")
        return 0
    print(f"{'tool':<28} {'status':<10} {'attempts':>8} {'replays':>7} {'duration':>10}  key")
    for r in records:
        took = f"{r.duration * 1000:.1f}ms" if r.duration is not None else "-"
        print(f"{r.tool:<28} {r.status.value:<10} {r.attempts:>8} {r.replays:>7} {took:>10}  {r.key}")
    return 0


def _show(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        record = ledger.effect(ns.key)
    if record is None:
        print(f"no effect with key {ns.key}", file=sys.stderr)
        return 1
    if ns.json:
        _print_json(record.model_dump(mode="json"))
        return 0
    data = record.model_dump(mode="json", exclude={"events"})
    for k, v in data.items():
        print(f"{k:>18}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    print("            events:")
    for e in record.events:
        parts = [f"    {e.at.isoformat(timespec='milliseconds')} {e.kind:<18}"]
        if e.attempt is not None:
            parts.append(f"attempt {e.attempt}")
        if e.owner is not None:
            parts.append(f"by {printable(e.owner, 255)}")
        print(" ".join(parts))
        for name, value in (e.detail or {}).items():
            if value is None:
                continue
            shown = json.dumps(displayable(value), ensure_ascii=False) if not isinstance(value, str) else value
            print(f"        {name}: {printable(shown, 500)}")
    return 0


def _took(ms: float) -> str:
    return f"{ms:.3f}ms" if ms < 1 else f"{ms:.1f}ms"


def _clock(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _workflow(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        timeline = ledger.timeline(ns.workflow_id)
    if ns.json:
        _print_json(timeline.model_dump(mode="json"))
        return 0 if not timeline.empty else 1
    if timeline.empty:
        print(f"nothing recorded for workflow {printable(ns.workflow_id, 100)!r}", file=sys.stderr)
        return 1
    wrap = functools.partial(textwrap.fill, width=80, initial_indent="    ", subsequent_indent="    ")
    counts = ", ".join(f"{n} {status}" for status, n in timeline.counts.items()) or "no effect yet"
    print(f"workflow {printable(timeline.workflow_id, 255)}")
    print(f"  effects: {counts}")
    needs = []
    if timeline.pending_approvals:
        needs.append(f"{timeline.pending_approvals} pending approval(s)")
    if timeline.unknown:
        needs.append(f"{timeline.unknown} unknown outcome(s)")
    print(f"  needs a person: {', '.join(needs) if needs else 'no'}")
    if timeline.first_at is not None and timeline.last_at is not None:
        print(f"  first {_clock(timeline.first_at)}, last {_clock(timeline.last_at)}")
    day = None
    for x in timeline.entries:
        if x.at.date() != day:
            day = x.at.date()
            print(f"\n{day.isoformat()}")
        head = f"{x.at.strftime('%H:%M:%S.%f')[:12]}  {x.kind.replace('_', ' '):<20} {printable(x.tool, 255)}"
        print(head if len(head) <= 80 else head[:77] + "...")
        tail = [printable(x.summary, 1000)]
        if x.by:
            tail.append(f"by {printable(x.by, 255)}")
        if x.duration_ms is not None:
            tail.append(_took(x.duration_ms))
        print(wrap(" · ".join(tail)))
    if timeline.effects:
        print("\neffects")
        for e in timeline.effects:
            took = _took(e.duration_ms) if e.duration_ms is not None else "-"
            line = f"  {printable(e.tool, 40):<30} {e.status.value:<10} attempts {e.attempts}, replays {e.replays}"
            print(f"{line}, {took}")
            print(wrap(f"key {e.key}; args {printable(json.dumps(e.args, ensure_ascii=False), 600)}"))
    return 0


def _workflows(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        page = ledger.workflows(status=ns.status, since=ns.since, limit=ns.limit, cursor=ns.cursor)
    if ns.json:
        _print_json(page.model_dump(mode="json"))
        return 0
    if not page.workflows:
        print("no workflows match")
        return 0
    print(f"{'workflow':<24} {'last activity':<20} {'person':<6} effects")
    for w in page.workflows:
        parts = [f"{n} {s}" for s, n in w.counts.items()]
        if w.pending_approvals:
            parts.append(f"{w.pending_approvals} pending approval(s)")
        counts = ", ".join(parts) or "-"
        name = printable(w.workflow_id, 255)
        name = name if len(name) <= 24 else name[:21] + "..."
        print(f"{name:<24} {_clock(w.last_at):<20} {'yes' if w.needs_human else 'no':<6} {counts}")
    if page.next_cursor:
        print(f"more: agent-ledger workflows --cursor {page.next_cursor}")
    return 0


def _console(ns: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .console import ConsoleAuth, _app, read_users

        del _app  # imported to fail here, with the hint, when the extra is missing
    except ImportError as e:
        raise ConfigurationError(f"console needs the console extra: pip install 'agent-ledger[console]' ({e})") from e
    users: dict[str, str] = read_users(ns.users_file) if ns.users_file else {}
    for spec in ns.user:
        name, sep, token = spec.partition(":")
        if not sep or not name or not token:
            raise ConfigurationError("--user takes NAME:TOKEN")  # never echo the token
        if name in users:
            raise ConfigurationError(f"console user {name!r} is given twice")
        users[name] = token
    if not users and not ns.trusted_header:
        raise ConfigurationError(
            "the console needs authentication: --user NAME:TOKEN (repeatable), --users-file FILE "
            "and/or --trusted-header X-Forwarded-User"
        )
    auth = ConsoleAuth(users, trusted_header=ns.trusted_header)
    with _ledger(ns) as ledger:
        app = ledger.console_app(auth=auth)
        print(f"agent-ledger console on http://{ns.host}:{ns.port}/ ({ledger!r})", file=sys.stderr)
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning", server_header=False)
    return 0


def _resolve(ns: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {"by": ns.by, "reason": ns.reason, "force": ns.force}
    if ns.result is not None:
        try:
            kwargs["result"] = json.loads(ns.result)
        except json.JSONDecodeError as e:
            raise ConfigurationError(f"--result must be JSON: {e}") from e
    elif ns.error is not None:
        kwargs["error"] = ns.error
    else:
        kwargs["retry"] = True
    with _ledger(ns) as ledger:
        record = ledger.resolve(ns.key, **kwargs)
    print(f"{record.key}: {record.status.value}")
    return 0


def _approvals(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        if ns.action == "list":
            pending = ledger.approvals.pending(workflow_id=ns.workflow, tool=ns.tool)
            if ns.json:
                _print_json([a.model_dump(mode="json") for a in pending])
                return 0
            if not pending:
                print("no pending approval requests")
                return 0
            print(
                f"{'approval id':<37} {'tool':<24} {'workflow':<20} {'expires':<25} "
                f"{'approvals':<24} {'requested by':<16} args"
            )
            for a in pending:
                print(
                    f"{a.approval_id:<37} {a.tool:<24} {a.workflow_id:<20} "
                    f"{a.expires_at.isoformat(timespec='seconds'):<25} {a.progress:<24} "
                    f"{a.requested_by or '-':<16} {json.dumps(a.args)}"
                )
            return 0
        if ns.action == "approve":
            decided = ledger.approvals.approve(ns.approval_id, by=ns.by, reason=ns.reason)
        else:
            decided = ledger.approvals.reject(ns.approval_id, by=ns.by, reason=ns.reason)
    if decided.status.value == "pending":
        print(f"{decided.approval_id}: approval by {ns.by} recorded, {decided.progress}; still pending")
    else:
        settled = f"{decided.approval_id}: {decided.status.value} by {decided.decided_by}"
        print(settled + (f" ({decided.progress})" if decided.quorum > 1 else ""))
    return 0


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _limits(ns: argparse.Namespace) -> int:
    with _ledger(ns) as ledger:
        if ns.action == "reset":
            n = ledger.reset_usage(ns.name, ns.scope, by=ns.by)
            if not n:
                print(f"nothing to reset: budget {ns.name}/{ns.scope} has no usage recorded", file=sys.stderr)
                return 1
            print(f"reset budget {ns.name}/{ns.scope} ({n} window(s) of usage removed) by {ns.by}")
            return 0
        usage = ledger.usage(workflow_id=ns.workflow, tool=ns.tool)
    if ns.json:
        _print_json([dataclasses.asdict(u) for u in usage])
        return 0
    if not usage:
        print("no budget used in its current window")
        return 0
    print(f"{'limit':<28} {'scope':<24} {'used':>10} {'max':>10} {'remaining':>10}  window")
    for u in usage:
        window = "whole life" if u.window_end is None else f"until {u.window_end.isoformat(timespec='seconds')}"
        used, cap, left = _number(u.used), _number(u.max), _number(u.remaining)
        print(f"{u.name:<28} {u.scope:<24} {used:>10} {cap:>10} {left:>10}  {window}")
    return 0


def _mcp_proxy(ns: argparse.Namespace) -> int:
    command = list(ns.upstream)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigurationError("mcp-proxy needs the upstream server's command after --, e.g. -- python server.py")
    try:
        import anyio
        from mcp import StdioServerParameters

        from .adapters.mcp import serve_stdio
    except ImportError as e:
        raise ConfigurationError(f"mcp-proxy needs the mcp extra: pip install 'agent-ledger[mcp]' ({e})") from e
    # The upstream inherits this environment (it is the user's server), minus the ledger's database URL.
    env = {k: v for k, v in os.environ.items() if k != "AGENT_LEDGER_URL"}
    params = StdioServerParameters(command=command[0], args=command[1:], env=env)
    options: dict[str, Any] = {}
    if ns.max_calls is not None:
        from ._limits import Limit

        options["limits"] = [Limit(max=ns.max_calls, name="mcp-proxy calls")]
    with _ledger(ns) as ledger:
        try:
            anyio.run(
                functools.partial(
                    serve_stdio,
                    ledger,
                    params,
                    workflow_id=ns.workflow,
                    require_approval=ns.require_approval,
                    approve_destructive=ns.approve_destructive,
                    approvers=ns.approvers,
                    options=options,
                )
            )
        except Exception as raised:
            leaf: BaseException = raised
            inner = getattr(leaf, "exceptions", None)
            while isinstance(inner, tuple) and len(inner) == 1:  # anyio's task groups wrap the start's error
                leaf = inner[0]
                inner = getattr(leaf, "exceptions", None)
            if isinstance(leaf, LedgerError) or not isinstance(leaf, (OSError, RuntimeError, _mcp_error())):
                raise
            why = getattr(leaf, "message", None) or str(leaf) or type(leaf).__name__
            print(f"agent-ledger: the upstream MCP server {command[0]!r} failed: {why}", file=sys.stderr)
            return 1
    return 0


def _mcp_error() -> type[Exception]:
    from mcp.shared.exceptions import MCPError

    return MCPError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agent-ledger`` command; returns the exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, like any well-behaved filter. Python would
        # flush stdout again at exit and print the error, so stdout now points at /dev/null.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


def _main(argv: Sequence[str] | None) -> int:
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "demo":
            from . import _demo

            if ns.agent:
                _demo.agent(ns.db, ns.bank, ns.crash, ns.workflow)
                return 0
            return _demo.main(ns.db)
        if ns.command == "migrate":
            with _ledger(ns, create=True) as ledger:
                ledger.migrate(partitions=ns.partitions)
            print(f"migrated {ledger!r} to the latest schema")
            return 0
        if ns.command == "history":
            return _history(ns)
        if ns.command == "show":
            return _show(ns)
        if ns.command == "resolve":
            return _resolve(ns)
        if ns.command == "workflow":
            return _workflow(ns)
        if ns.command == "workflows":
            return _workflows(ns)
        if ns.command == "console":
            return _console(ns)
        if ns.command == "prune":
            with _ledger(ns) as ledger:
                n = ledger.prune(older_than=ns.older_than)
            print(json.dumps({"deleted": n}) if ns.json else f"deleted {n} settled effect(s)")
            return 0
        if ns.command == "export":
            return _export(ns)
        if ns.command == "approvals":
            return _approvals(ns)
        if ns.command == "limits":
            return _limits(ns)
        if ns.command == "mcp-proxy":
            return _mcp_proxy(ns)
        if ns.command == "recover":
            with _ledger(ns) as ledger:
                report = ledger.recover(batch_size=ns.batch_size)
            if ns.json:
                _print_json(report.model_dump(mode="json"))
            else:
                print(f"examined {report.examined} stale effect(s); marked unknown: {len(report.marked_unknown)}")
                for key in report.marked_unknown:
                    print(f"  unknown  {key}")
            return 0
    except ConfigurationError as e:
        print(f"agent-ledger: {hide(str(e))}", file=sys.stderr)
        return 2
    except StorageError as e:
        hint = ""
        prefix = getattr(ns, "table_prefix", None)
        if isinstance(e, SchemaMissing) and prefix and "--table-prefix" not in str(e):
            hint = f" (looked for tables named {prefix}*: check --url and --table-prefix)"
        print(f"agent-ledger: {hide(str(e))}{hint}", file=sys.stderr)
        return 3
    except LedgerError as e:
        print(f"agent-ledger: {hide(str(e))}", file=sys.stderr)
        return 1
    raise AssertionError(ns.command)  # pragma: no cover
