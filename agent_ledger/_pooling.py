"""Connection poolers in front of Postgres: the ``?pgbouncer=`` URL option and automatic detection.

A transaction-pooling PgBouncer hands each transaction (each autocommit statement) to whichever server
connection is free, so nothing tied to one server session survives from one transaction to the next:
server-side prepared statements (psycopg prepares a statement after it ran five times on a connection;
the next transaction may reach a server that never saw it: "prepared statement "_pg3_0" does not
exist"), ``SET`` parameters, session advisory locks, temporary tables and ``LISTEN``.

The ledger relies on none of that state except psycopg's prepared statements, and may ``LISTEN`` (see
``Runtime.listen_ok``). ``Pooling`` says which of those stay on for one database URL:

- ``?pgbouncer=transaction``: prepared statements off on every connection, ``listen_ok`` False.
- ``?pgbouncer=session``: the pooler keeps a server session per client connection: everything stays on
  (and nothing is detected).
- no option: detected on the first connection the runtime opens. PgBouncer (like other poolers) answers
  the client's startup with a made-up backend process id (its cancel key), so a connection whose
  announced ``backend_pid`` differs from ``SELECT pg_backend_pid()`` reaches Postgres through a pooler.
  A pooler's mode cannot be read from a data connection (``SHOW POOLS`` is its admin console's, and a
  data connection's ``SHOW`` goes to Postgres), so a detected pooler is treated as transaction pooling,
  the safe assumption; ``?pgbouncer=session`` keeps prepared statements on behind a session pooler.

The option is removed from the URL before it reaches the driver. Statement pooling cannot run the
ledger's multi-statement transactions: ``?pgbouncer=statement`` is refused, like any other value.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL

from .errors import ConfigurationError

__all__ = ["MODES", "PARAM", "Pooling", "split_pooling"]

PARAM = "pgbouncer"
"""The URL query option naming the pooler's mode."""

MODES = ("transaction", "session")
"""The values ``?pgbouncer=`` accepts."""

_SHOWABLE = re.compile(r"[A-Za-z_-]{1,20}")


_BLANK = re.compile(rf"[?&]{PARAM}=?(?=[&#]|$)")


def split_pooling(u: URL, shown: str, raw: str = "") -> tuple[URL, str | None]:
    """``u`` without its ``pgbouncer`` query option, and the option's value (None when absent).

    ``shown`` is the URL as messages may show it (password masked), ``raw`` the URL as written (the parsed
    ``u`` has lost an empty ``?pgbouncer=``). A value other than ``transaction`` or ``session`` (an empty one
    included), the option given twice, or the option on a SQLite URL is a ``ConfigurationError``.
    """
    if PARAM not in u.query:
        if _BLANK.search(raw.split("#", 1)[0]):
            raise ConfigurationError(
                f"database URL {shown!r}: ?{PARAM}= needs a value: 'transaction' (PgBouncer's pool_mode=transaction)"
                f" or 'session' (pool_mode=session)"
            )
        return u, None
    value = u.query[PARAM]
    if u.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"database URL {shown!r}: ?{PARAM}= applies to Postgres URLs only")
    if not isinstance(value, str):
        raise ConfigurationError(f"database URL {shown!r}: ?{PARAM}= is given more than once")
    if value not in MODES:
        # The value is echoed only when it looks like a mode name (never a pasted secret).
        said = f" {value!r}" if _SHOWABLE.fullmatch(value) else ""
        why = (
            ": statement pooling cannot run the ledger's transactions (a claim and its audit row commit together)"
            if value == "statement"
            else ""
        )
        raise ConfigurationError(
            f"database URL {shown!r}: ?{PARAM}= must be 'transaction' (PgBouncer's pool_mode=transaction) or "
            f"'session' (pool_mode=session), not the unknown value{said}{why}"
        )
    return u.difference_update_query([PARAM]), value


class Pooling:
    """What the ledger's connections to one Postgres may rely on across transactions.

    ``pooled`` is True when a transaction pooler is (or is assumed to be) in between, False when server
    sessions are kept (a direct connection, or ``?pgbouncer=session``), None until the first connection
    has been checked.
    """

    def __init__(self, mode: str | None, dialect: str) -> None:
        self.mode = mode
        """The URL's ``?pgbouncer=`` value, or None (detect)."""
        self.pooled: bool | None = True if mode == "transaction" else None
        if mode == "session" or dialect != "postgresql":
            self.pooled = False
        self.dialect = dialect

    @property
    def listen_ok(self) -> bool:
        """Whether a ``LISTEN`` on a connection keeps receiving notifications: only on Postgres with server
        sessions kept, and only once that is known (False before the first connection was checked)."""
        return self.dialect == "postgresql" and self.pooled is False

    @property
    def prepare_threshold(self) -> int | None:
        """psycopg's ``prepare_threshold`` for the ledger's connections: None (never prepare) unless server
        sessions are known to be kept (then psycopg's default, 5)."""
        return 5 if self.pooled is False else None

    def _decide(self, announced: int, real: int) -> None:
        if self.pooled is None:
            self.pooled = announced != real

    def setup(self, conn: Any) -> None:
        """Prepare a new psycopg connection (sync, or SQLAlchemy's adapted async one) before its first
        statement: detect a pooler if not known yet, and turn prepared statements off behind one."""
        raw = getattr(conn, "driver_connection", conn)  # SQLAlchemy's async adapter wraps the driver's
        if self.pooled is None:
            cur = conn.cursor()
            try:
                cur.execute("SELECT pg_backend_pid()")
                row = cur.fetchone()
            finally:
                cur.close()
            if not raw.autocommit:
                conn.rollback()
            self._decide(raw.info.backend_pid, int(row[0]))
        if self.pooled:
            raw.prepare_threshold = None

    async def asetup(self, conn: Any) -> None:
        """``setup`` for a psycopg ``AsyncConnection`` (the async hot path's own connections)."""
        if self.pooled is None:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            if not conn.autocommit:
                await conn.rollback()
            self._decide(conn.info.backend_pid, int(row[0]))
        if self.pooled:
            conn.prepare_threshold = None

    def install(self, engine: Engine) -> None:
        """Run ``setup`` on every new connection of a SQLAlchemy engine (sync, or an async engine's
        ``sync_engine``) on Postgres."""
        if self.dialect != "postgresql":
            return

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            self.setup(dbapi_conn)
