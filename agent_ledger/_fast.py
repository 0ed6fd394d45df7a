"""The hot path: the statements every call runs, prebuilt once and executed on pooled driver connections.

It is the fast implementation of the typed hot operations of ``_store`` (``Lookup``, ``ClaimNew``,
``ClaimOrLoad``, ``Finish``, ``AppendEvents``); their reference implementation is ``Work.steps`` run
through SQLAlchemy Core, and tests/test_hot_contract.py checks that both give the same rows and answers.
SQLAlchemy compiles each statement of ``Store.hot`` once (so the SQL still comes from the Core tables);
this module runs the SQL strings directly on its own small pools of driver connections, applying the
dialect's bind and result processors (on SQLite, C-backed equivalents for datetimes and JSON, tested to
produce the same text), so values are stored exactly as the Core path stores them.
Each hot state change is one autocommit statement on Postgres (a data-modifying CTE writes the outcome
and its audit row together) and one ``BEGIN IMMEDIATE`` transaction on SQLite. A new call on Postgres
looks the key up and claims it on the same pooled connection, in one unit of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Dialect, Engine, event, exc

from ._keys import acyclic_encoder
from ._schema import UTCDateTime
from ._store import (
    EVENT_COLUMNS,
    EXCEEDED,
    LIMIT_MARK,
    LOOKUP_COLUMNS,
    WAKE_LOCK_CLASS,
    AppendEvents,
    ClaimNew,
    ClaimOrLoad,
    Finish,
    Lookup,
    Store,
    Work,
    charge_binds,
)
from .errors import InvalidArguments

__all__ = [
    "DEFAULT_POOL_LIMIT",
    "DEFAULT_POOL_TIMEOUT",
    "HOP",
    "WAKE_LOCK_CLASS",
    "AsyncPool",
    "Hot",
    "Listener",
    "SyncPool",
    "install_idle_ping",
]

log = logging.getLogger("agent_ledger")

IDLE_PING_AFTER = 2.0
"""Seconds a pooled connection may sit unused before its next checkout pings it first."""


def install_idle_ping(engine: Engine) -> None:
    """Ping a pooled connection on checkout only if it sat idle: a busy pool pays no round trip, and a
    connection that outlived a database restart is replaced before use instead of failing a call."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["agent_ledger_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("agent_ledger_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_AFTER:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception:
            alive = False
        if not alive:
            raise exc.DisconnectionError("idle pooled connection is gone (database restarted?)")


@dataclass(frozen=True)
class _Sql:
    sql: str
    plan: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]
    """Per placeholder, in order: its bound name, its default (a literal's value, or None) and the
    dialect's bind processor for it (None: the value goes as it is)."""


_UTC = timezone.utc


def _sqlite_datetime_bind(value: datetime) -> str:
    """``UTCDateTime`` bound for SQLite: the dialect's processor's exact text (naive UTC, microseconds
    always written), done by ``isoformat`` in C instead of two Python processors."""
    if value.tzinfo is not _UTC:
        if value.tzinfo is None:
            raise InvalidArguments("agent_ledger stores aware datetimes only")
        value = value.astimezone(_UTC)
    return value.isoformat(" ", "microseconds")[:-6]  # without its "+00:00" (cheaper than replace())


def _sqlite_datetime_result(value: Any) -> datetime | None:
    """A stored SQLite datetime as an aware UTC datetime, as ``UTCDateTime`` reads it."""
    # The offset parsed with the text is the UTC singleton: cheaper than replace(tzinfo=...) after it.
    return None if value is None else datetime.fromisoformat(value + "+00:00")


def _sqlite_json_result(loads: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A stored SQLite JSON value, as the dialect's JSON type reads it (numbers may come back as such)."""

    def process(value: Any) -> Any:
        return loads(value) if isinstance(value, str) else value

    return process


def _bind_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """The bind processor of a column type; on SQLite the hot types get C-backed equivalents (a test
    checks they produce exactly what the dialect's own processors produce)."""
    if dialect.name == "sqlite":
        if isinstance(type_, UTCDateTime):
            return _sqlite_datetime_bind
        if isinstance(type_, JSON):
            dumps: Callable[[Any], Any] = getattr(dialect, "_json_serializer", None) or json.dumps
            return dumps  # what the dialect's processor calls, without its two Python layers
    proc: Callable[[Any], Any] | None = type_._cached_bind_processor(dialect)
    return proc


def _result_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """The result processor of a column type (C-backed equivalents for the hot types on SQLite)."""
    if dialect.name == "sqlite":
        if isinstance(type_, UTCDateTime):
            return _sqlite_datetime_result
        if isinstance(type_, JSON):
            return _sqlite_json_result(getattr(dialect, "_json_deserializer", None) or json.loads)
    proc: Callable[[Any], Any] | None = type_._cached_result_processor(dialect, None)
    return proc


def _compile(stmt: Any, dialect: Dialect) -> _Sql:
    """``stmt`` compiled once, with positional placeholders: psycopg and sqlite3 then bind a list as it
    is, where a dict of named values costs a name lookup and a conversion per statement."""
    pg = dialect.name == "postgresql"
    target: Any = type(dialect)(paramstyle="format" if pg else "qmark")  # type: ignore[call-arg]
    compiled: Any = stmt.compile(dialect=target)
    procs = {name: _bind_processor(bind.type, dialect) for name, bind in compiled.binds.items()}
    defaults = compiled.params  # literal values of the statement (and None for ours, given per call)
    return _Sql(compiled.string, tuple((name, defaults.get(name), procs[name]) for name in compiled.positiontup))


_AT, _DETAIL = EVENT_COLUMNS.index("at"), EVENT_COLUMNS.index("detail")

HOP = object()
"""A lookup's answer when more is needed: the key is absent and must be claimed (and for
``Hot.read_inline``: the unit of work must run in the worker thread)."""


_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_PROTOCOL = 5, 6, 15  # SQLite's primary result codes (C API values)


def _is_busy(e: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock (as opposed to a broken file or a missing table)."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_PROTOCOL)
    return "locked" in str(e)


def _driver_errors(dialect: str) -> tuple[type[Exception], ...]:
    if dialect == "postgresql":
        import psycopg

        return (psycopg.Error,)
    return (sqlite3.Error,)


def _is_disconnect(dialect: str, e: BaseException) -> bool:
    if dialect == "postgresql":
        import psycopg

        return isinstance(e, psycopg.OperationalError)
    return False


DEFAULT_POOL_LIMIT = 15
"""Connections a hot-path pool may hold by default: SQLAlchemy's ``pool_size`` 5 + ``max_overflow`` 10."""

DEFAULT_POOL_TIMEOUT = 30.0
"""Seconds a call waits for a free connection by default (SQLAlchemy's ``pool_timeout``)."""


class _PoolTimeout(exc.TimeoutError):
    """No connection of a bounded hot-path pool came free within its timeout."""

    code = None  # no link to SQLAlchemy's error pages: the message says it all


def _pool_timeout(limit: int | None, timeout: float) -> _PoolTimeout:
    return _PoolTimeout(
        f"no free connection within pool_timeout={timeout:g} s: all {limit} connections of the ledger's pool are "
        f"in use (raise engine_options pool_size / max_overflow / pool_timeout, or make fewer calls at once)"
    )


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back a failed SQLite transaction, if SQLite has not already done so: on a full disk, an I/O
    error or a lost lock it ends the transaction itself, and a second ``ROLLBACK`` would fail with
    "cannot rollback - no transaction is active", hiding the real error."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:  # the original error is the one to report; the pool drops this connection
        log.debug("rolling back a failed SQLite transaction failed", exc_info=True)


def _in_transaction(conn: Any) -> bool:
    """Whether a SQLite connection was left inside a transaction (then it is not reused)."""
    return isinstance(conn, sqlite3.Connection) and conn.in_transaction


class SyncPool:
    """Driver connections for the sync hot path: a plain stack under a lock (acquire/release cost about a
    microsecond, where a full pool checkout costs several), pinging a connection only after it sat idle.

    At most ``limit`` connections are open at once (in use or idle; ``None``: no limit); a caller that
    finds them all in use waits up to ``timeout`` seconds for one, then gets ``_PoolTimeout``.
    """

    def __init__(
        self,
        dialect: str,
        target: str,
        limit: int | None = DEFAULT_POOL_LIMIT,
        timeout: float = DEFAULT_POOL_TIMEOUT,
        busy_timeout: float = 30.0,
        context: Any = None,
        uri: bool = False,
        readonly: bool = False,
        setup: Callable[[Any], None] | None = None,
    ) -> None:
        self.dialect = dialect
        self.target = target
        self.limit = limit
        self.timeout = timeout
        self.max_idle = limit if limit is not None else 10
        self.busy_timeout = busy_timeout
        """Seconds a SQLite statement waits for a lock before failing (0 for the event loop's reads)."""
        self.context = context
        """Postgres: the SQLAlchemy dialect's psycopg adapters (so JSON is loaded and dumped exactly as
        the engine's connections do it, custom ``json_serializer``/``json_deserializer`` included)."""
        self.uri = uri
        """SQLite: ``target`` is a ``file:`` URI carrying the URL's options (``mode=ro``, ...)."""
        self.readonly = readonly
        self.setup = setup
        """Postgres: run on each new connection before its first statement (``_pooling.Pooling.setup``)."""
        self._idle: list[tuple[Any, float]] = []
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0
        self.in_use = 0
        """Connections handed out (or being opened) and not yet released."""
        self.errors = _driver_errors(dialect)

    def is_disconnect(self, e: BaseException) -> bool:
        """Whether the error means the connection is unusable."""
        return _is_disconnect(self.dialect, e)

    def _connect(self) -> Any:
        if self.dialect == "postgresql":
            import psycopg

            pg = psycopg.connect(self.target, autocommit=True, context=self.context)
            if self.setup is not None:
                try:
                    self.setup(pg)
                except BaseException:
                    self._close(pg)
                    raise
            return pg
        conn = sqlite3.connect(
            self.target, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False, uri=self.uri
        )
        # A read-only connection keeps the file's journal mode (changing it would be a write).
        for pragma in (
            ("PRAGMA synchronous=FULL",) if self.readonly else ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")
        ):
            conn.execute(pragma)
        return conn

    def acquire(self) -> Any:
        """An idle connection (pinged if it sat idle long), or a new one; waits while the pool is full."""
        deadline = None
        while True:
            with self._lock:
                if self.limit is None or self.in_use < self.limit:
                    self.in_use += 1
                    taken = self._idle.pop() if self._idle else None
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _pool_timeout(self.limit, self.timeout)
                self._waiting += 1
                try:
                    self._freed.wait(remaining)
                finally:
                    self._waiting -= 1
        try:
            while taken is not None:
                conn, since = taken
                if time.monotonic() - since < IDLE_PING_AFTER:
                    return conn
                try:
                    conn.execute("SELECT 1").fetchone()
                    return conn
                except Exception:
                    self._close(conn)
                with self._lock:
                    taken = self._idle.pop() if self._idle else None
            return self._connect()
        except BaseException:
            self._give_back()
            raise

    def _give_back(self) -> None:
        with self._lock:
            self.in_use -= 1
            if self._waiting:
                self._freed.notify()

    def release(self, conn: Any, healthy: bool) -> None:
        """Return a connection (or drop it if it failed or the pool is full)."""
        with self._lock:
            self.in_use -= 1
            if healthy and len(self._idle) < self.max_idle:
                self._idle.append((conn, time.monotonic()))
                conn = None
            if self._waiting:
                self._freed.notify()
        if conn is not None:
            self._close(conn)

    @staticmethod
    def _close(conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # closing a broken connection must not hide the original error
            log.debug("closing a broken connection failed", exc_info=True)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._close(conn)


class AsyncPool:
    """Postgres driver connections for the async hot path, one pool per event loop (they cannot cross
    loops). (Async SQLite runs the sync hot path in a worker thread: SQLite has no async I/O.)

    SQLAlchemy's async pool costs a greenlet hop per checkout; the hot path only needs a connection in
    autocommit mode, so it keeps its own few, pinging one only after it sat idle. At most ``limit``
    connections are open at once (``None``: no limit); a call that finds them all in use waits up to
    ``timeout`` seconds for one (in arrival order), then gets ``_PoolTimeout``.
    """

    def __init__(
        self,
        target: str,
        limit: int | None = DEFAULT_POOL_LIMIT,
        timeout: float = DEFAULT_POOL_TIMEOUT,
        context: Any = None,
        setup: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        import psycopg

        self.target = target
        self.setup = setup
        """Run on each new connection before its first statement (``_pooling.Pooling.asetup``)."""
        self.limit = limit
        self.timeout = timeout
        self.max_idle = limit if limit is not None else 10
        self.context = context
        """The SQLAlchemy dialect's psycopg adapters, as for ``SyncPool``."""
        self._idle: list[tuple[Any, float]] = []
        # One permit per connection handed out (or being opened): a connection is opened only when none
        # is idle, so in use + idle never exceeds the limit.
        self._permits = asyncio.Semaphore(limit) if limit is not None else None
        self.errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def is_disconnect(self, e: BaseException) -> bool:
        """Whether the error means the connection is unusable."""
        return _is_disconnect("postgresql", e)

    async def _connect(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self.target, autocommit=True, context=self.context)
        if self.setup is not None:
            try:
                await self.setup(conn)
            except BaseException:
                await self._close(conn)
                raise
        return conn

    async def acquire(self) -> Any:
        """An idle connection (pinged if it sat idle long), or a new one; waits while the pool is full."""
        permits = self._permits
        if permits is not None:
            if permits.locked():
                try:
                    await asyncio.wait_for(permits.acquire(), self.timeout)
                except asyncio.TimeoutError:
                    raise _pool_timeout(self.limit, self.timeout) from None
            else:
                await permits.acquire()  # a free permit: taken without suspending
        try:
            while self._idle:
                conn, since = self._idle.pop()
                if time.monotonic() - since < IDLE_PING_AFTER:
                    return conn
                try:
                    await conn.execute("SELECT 1")
                    return conn
                except Exception:
                    await self._close(conn)
            return await self._connect()
        except BaseException:
            if permits is not None:
                permits.release()
            raise

    async def release(self, conn: Any, healthy: bool) -> None:
        """Return a connection (or drop it if it failed or the pool is full)."""
        if healthy and len(self._idle) < self.max_idle:
            self._idle.append((conn, time.monotonic()))
            if self._permits is not None:
                self._permits.release()
            return
        if self._permits is not None:
            self._permits.release()
        await self._close(conn)

    @staticmethod
    async def _close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception:  # closing a broken connection must not hide the original error
            log.debug("closing a broken connection failed", exc_info=True)

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            await self._close(self._idle.pop()[0])


class Listener:
    """Postgres only: wakes this process's waiters as soon as the key they wait for is completed.

    Notifying every completion cost about 10% of the throughput with several processes (a transaction
    that notifies holds the notify queue's lock through its commit, so notifying commits serialise their
    WAL flushes). So only a waited-on key is announced: a waiting process marks the key with a shared
    advisory lock (``WAKE_LOCK_CLASS``, ``hashtext(key)``), and the completion statement sends
    ``pg_notify`` only when its ``pg_try_advisory_xact_lock`` on the same pair fails.

    One thread per process owns one connection: it listens (``LISTEN`` on ``notify_channel``), takes and
    releases the marks for the waiters of this process (they only queue the request: waiting never
    blocks on it), and wakes the waiters of an announced key. Polling stays the bound: a waiter sleeps at
    most its poll pause (longer, up to ``MARKED_POLL``, only once its key is marked), and a notification
    ends the pause early. A key marked after its completion, a completion outside the hot path (a
    takeover, ``resolve``), a lost connection: the next poll sees the result. Marks are released when the
    key is announced or after ``IDLE_MARK`` seconds without a waiter; the thread and its connection end
    after ``IDLE_EXIT`` seconds without marks or waiters.
    """

    IDLE_MARK = 1.0
    IDLE_EXIT = 10.0
    TICK = 0.01
    """Seconds the thread listens before it looks at queued mark requests (a notification wakes its
    waiters as it arrives)."""
    MARKED_POLL = 0.05
    """Seconds between a marked waiter's polls (when its flow allows that long): the notification wakes it
    at once, so polling is only the safety net, and 8 waiters polling every 5 ms cost the database and
    the machine more than they bought."""

    def __init__(self, target: str, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._marked: dict[str, float] = {}  # key -> when a waiter last slept on it
        self._requests: list[str] = []  # keys to mark, taken by the thread
        self._released: list[str] = []  # announced keys whose marks the thread is to release
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, key: str, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (from the listener thread) when ``key`` is announced, and have the key marked
        (by the thread, soon; the thread is started if needed)."""
        with self._lock:
            self._waiters.setdefault(key, []).append(wake)
            if key in self._marked:
                self._marked[key] = time.monotonic()
            elif key not in self._requests:
                self._requests.append(key)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="agent-ledger-listen", daemon=True)
                self._thread.start()

    def unwatch(self, key: str, wake: Callable[[], None]) -> None:
        """Forget a wake-up registered with ``watch``."""
        with self._lock:
            found = self._waiters.get(key)
            if found is not None:
                with contextlib.suppress(ValueError):
                    found.remove(wake)
                if not found:
                    del self._waiters[key]

    def pause(self, op: Any) -> float:
        """How long a waiter sleeps for ``Sleep`` ``op``: its pause, or longer (up to ``MARKED_POLL`` and the
        flow's ``longest``) once its key is marked."""
        if op.longest is None or op.key not in self._marked:
            return float(op.seconds)
        return float(max(op.seconds, min(op.longest, self.MARKED_POLL)))

    def close(self) -> None:
        """Stop listening: the thread ends (its connection, and the marks with it) within ``TICK``."""
        self._closed = True

    def _wake(self, key: str) -> None:
        with self._lock:
            wakes = list(self._waiters.get(key, ()))
            # Unmarked at once, not when the thread next releases the lock: a waiter that was between
            # two sleeps when the announcement came must not then sleep the long marked pause.
            if self._marked.pop(key, None) is not None:
                self._released.append(key)
        for wake in wakes:
            try:
                wake()
            except Exception:  # e.g. the waiter's event loop is closed: it is not waiting any more
                log.debug("waking a waiter failed", exc_info=True)

    def _loop(self) -> None:
        import psycopg
        from psycopg import sql

        idle_since = time.monotonic()
        while not self._closed:
            try:
                with psycopg.connect(self.target, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    while not self._closed:
                        announced = False
                        for note in conn.notifies(timeout=self.TICK):
                            self._wake(note.payload)  # at once: not after the rest of the tick
                            announced = True
                        now = time.monotonic()
                        with self._lock:
                            mark, self._requests = self._requests, []
                            idle = [
                                k
                                for k, t in self._marked.items()
                                if k not in self._waiters and now - t > self.IDLE_MARK
                            ]
                            for key in idle:
                                del self._marked[key]
                            unmark, self._released = self._released + idle, []
                            busy = bool(self._waiters or self._marked or mark or announced)
                        for key in unmark:
                            conn.execute("SELECT pg_advisory_unlock_shared(%s, hashtext(%s))", (WAKE_LOCK_CLASS, key))
                        for key in mark:
                            with self._lock:  # asked again while its mark was being taken: one lock only
                                if key in self._marked:
                                    continue
                            got = conn.execute(
                                "SELECT pg_try_advisory_lock_shared(%s, hashtext(%s))", (WAKE_LOCK_CLASS, key)
                            ).fetchone()
                            # False: the key's completion is committing right now; the next poll sees it.
                            if got is not None and got[0]:
                                with self._lock:
                                    self._marked[key] = time.monotonic()
                        if busy:
                            idle_since = now
                        elif now - idle_since > self.IDLE_EXIT:
                            with self._lock:
                                if not self._waiters and not self._requests:
                                    self._thread = None  # the next waiter starts a new one
                                    return
            except Exception:
                with self._lock:
                    self._marked.clear()  # the session, and its marks, are gone
                    self._released.clear()
                if self._closed:
                    return
                log.debug("the LISTEN connection failed; waiters poll until it is back", exc_info=True)
                time.sleep(1.0)


class Hot:
    """Prebuilt hot statements for one store on one (sync or async) engine's dialect."""

    def __init__(self, store: Store, dialect: Dialect) -> None:
        self.store = store
        self.dialect = dialect
        self._new_rate = 0.0  # start by expecting replays: a retry from a fresh process is mostly replays
        self.pg = dialect.name == "postgresql"
        statements = store.hot
        self.load = _compile(statements.lookup, dialect)
        self.claim = _compile(statements.claim, dialect)
        self.complete = _compile(statements.complete, dialect)
        self.event = _compile(statements.event, dialect)
        # Postgres: a completion that also announces its key to waiters, with its audit row or without.
        audited, waking = statements.complete_audited, statements.complete_waking
        self.finish = _compile(audited, dialect) if audited is not None else None
        self.succeed = _compile(waking, dialect) if waking is not None else None
        # Postgres: batched audit rows go through COPY (about 55% of an executemany's client work per row;
        # one statement, so all or nothing). COPY's text format hands every value to the column's input
        # function, so a row is bound without the SQLAlchemy processors: text, an int, an aware datetime
        # (psycopg writes its offset) and the detail already serialised as the engine serialises JSON.
        quote = dialect.identifier_preparer
        columns = ", ".join(quote.quote(name) for name in EVENT_COLUMNS)
        self.copy_events = f"COPY {quote.format_table(store.tables.events)} ({columns}) FROM STDIN"
        self._event_values = operator.itemgetter(*EVENT_COLUMNS)
        # Audit details are the ledger's own small, fresh dicts: a JSON encoder built once writes them
        # (json.dumps builds one per call), unless the engine has a serializer of its own.
        self._dumps: Callable[[Any], str] = getattr(dialect, "_json_serializer", None) or acyclic_encoder(
            canonical=False
        )
        plan = tuple(
            (name.removeprefix("p_"), default, self._dumps if name == "p_detail" else proc)
            for name, default, proc in self.event.plan
        )
        # SQLite: the same rows through ``event``'s INSERT, read by column name as COPY reads them.
        self.event_rows = _Sql(self.event.sql, plan)
        self.charge = _compile(statements.charge, dialect)
        self._limited: dict[int, _Sql] = {}
        self.columns = LOOKUP_COLUMNS
        self._processors = tuple(
            (i, proc)
            for i, c in enumerate(statements.lookup.selected_columns)
            if (proc := _result_processor(c.type, dialect)) is not None
        )
        """(position in the row, result processor) of each lookup column that has one."""

    def limited(self, op: ClaimNew) -> tuple[str, list[Any], bool]:
        """Postgres: the step of a claim with charges (one statement; compiled once per charge count)."""
        n = len(op.charges)
        spec = self._limited.get(n)
        if spec is None:
            spec = self._limited[n] = _compile(self.store.hot.limited_claim(n), self.dialect)
        return spec.sql, self.params(spec, op.limited_binds()), True

    def _over_budget(self, sql: str, e: Exception) -> bool:
        """Postgres: whether an error is the deliberate refusal of a limited claim over budget (its own
        statement's cast error, not another statement's error that happens to quote the same text)."""
        import psycopg

        return (
            isinstance(e, psycopg.errors.InvalidTextRepresentation)
            and LIMIT_MARK in str(e)
            and any(sql is spec.sql for spec in self._limited.values())
        )

    def _charged(self, conn: Any, op: ClaimNew) -> bool:
        """SQLite, inside the claim's transaction: consume each charge; False when one does not fit."""
        for charge in op.charges:
            paid = conn.execute(self.charge.sql, self.params(self.charge, charge_binds(charge, op.now))).fetchone()
            if paid is None:
                return False
        return True

    def expect_new(self) -> bool:
        """Whether the next call is more likely a new key than a replay (recent history of this ledger)."""
        return self._new_rate > 0.5

    def saw(self, *, new: bool) -> None:
        """Update the moving share of new keys among recent calls (races between threads are harmless:
        it only picks which of two correct statement orders runs first)."""
        self._new_rate = 0.9 * self._new_rate + (0.1 if new else 0.0)

    def reads_first(self, work: Work) -> bool:
        """Whether a unit starts with a lock-free lookup: ``Lookup``, or ``ClaimOrLoad`` while this
        ledger mostly sees replays (then a replay is one index read)."""
        kind = type(work.fast)  # (exact types: neither has subclasses)
        return kind is Lookup or (kind is ClaimOrLoad and not self.expect_new())

    def looked_up(self, work: Work, found: Any) -> Any:
        """The answer of that lookup, given the fetched row (or None): for ``Lookup`` the row mapping or
        None; for ``ClaimOrLoad`` the stored row as not claimed, or ``HOP`` when the key is absent
        and must be claimed next."""
        if type(work.fast) is Lookup:
            return self.row(found) if found is not None else None
        if found is None:
            return HOP
        self.saw(new=False)
        return self.stored(found)

    @staticmethod
    def params(spec: _Sql, values: Mapping[str, Any]) -> list[Any]:
        """The positional values of ``spec`` from named ``values`` (over the statement's literal
        defaults), through the dialect's bind processors."""
        get = values.get
        return [
            v if (v := get(name, default)) is None or proc is None else proc(v) for name, default, proc in spec.plan
        ]

    def copy_values(self, row: Mapping[str, Any]) -> list[Any]:
        """Postgres: one audit row (``EVENT_COLUMNS``) as ``copy_events`` takes it."""
        values = list(self._event_values(row))
        at, detail = values[_AT], values[_DETAIL]
        if at is not None and at.tzinfo is None:  # as UTCDateTime refuses it: a naive time has no instant
            raise InvalidArguments("agent_ledger stores aware datetimes only")
        if detail is not None:
            values[_DETAIL] = self._dumps(detail)
        return values

    def row(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """A lookup's result row (``LOOKUP_COLUMNS``) as the mapping the decision core reads (NULL stays
        None: every result processor maps None to None, so it is not called for one)."""
        vals = list(values)
        for i, proc in self._processors:
            if vals[i] is not None:
                vals[i] = proc(vals[i])
        return dict(zip(self.columns, vals, strict=True))

    def stored(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """``ClaimOrLoad``'s answer when the key exists: its row, marked as not claimed by us."""
        out = self.row(values)
        out["claimed"] = False
        return out

    # -- sync -------------------------------------------------------------------------------

    def run(self, pool: SyncPool, work: Work) -> Any:
        """Run a hot unit of work on a pooled driver connection."""
        try:
            conn = pool.acquire()
        except pool.errors as e:  # a failed (re)connect: mapped like any other driver error
            raise exc.DBAPIError.instance(None, None, e, pool.errors[0]) from e
        healthy = False
        try:
            out = self._pg(conn, work) if self.pg else self._sqlite(conn, work)
            healthy = True
            return out
        except pool.errors as e:
            healthy = not pool.is_disconnect(e) and not _in_transaction(conn)
            raise exc.DBAPIError.instance(None, None, e, pool.errors[0]) from e
        finally:
            pool.release(conn, healthy)

    def _pg_steps(self, work: Work) -> Generator[tuple[str, list[Any], bool], Any, Any]:
        """The statements of a hot unit on Postgres, written once for both drivers: each step is
        (sql, params, fetch one row?) and receives the row (or the rowcount)."""
        op = work.fast
        if isinstance(op, Finish):  # first: every new call ends with one
            if not op.audited or self.finish is None:  # a success: the update alone is the record
                if self.succeed is not None:  # (and the announcement, if someone waits)
                    counted = yield self.succeed.sql, self.params(self.succeed, op.binds()), True
                    return counted[0]
                return (yield self.complete.sql, self.params(self.complete, op.binds()), False)
            return (yield self.finish.sql, self.params(self.finish, op.audited_binds()), False)
        if self.reads_first(work):
            # A lookup (for ClaimOrLoad: the ledger mostly sees replays, e.g. an agent resuming, so a
            # replay is one index read; an absent key is then claimed on the same connection. A
            # racing claim that wins in between leaves us None, and the flow looks again).
            assert isinstance(op, (Lookup, ClaimOrLoad))
            found = yield self.load.sql, self.params(self.load, op.lookup_binds()), True
            answer = self.looked_up(work, found)
            if answer is not HOP:
                return answer
            assert isinstance(op, ClaimOrLoad)
            won = yield from self._claim_step(op)
            if won is EXCEEDED:
                return EXCEEDED
            self.saw(new=True)
            return {"claimed": True} if won is not None else None
        if isinstance(op, ClaimOrLoad):
            # Most recent calls were new keys: claim first (one round trip for a new call), and read
            # the stored row only if the key turned out to exist.
            won = yield from self._claim_step(op)
            if won is EXCEEDED:
                return EXCEEDED
            if won is not None:
                self.saw(new=True)
                return {"claimed": True}  # the flow needs nothing else of a row it just created
            found = yield self.load.sql, self.params(self.load, op.lookup_binds()), True
            self.saw(new=False)
            return self.stored(found) if found is not None else None
        if isinstance(op, ClaimNew):
            found = yield from self._claim_step(op)
            if found is EXCEEDED:
                return EXCEEDED
            return {"attempt": found[0]} if found is not None else None
        raise AssertionError(op)  # pragma: no cover

    def _claim_step(self, op: ClaimNew) -> Generator[tuple[str, list[Any], bool], Any, Any]:
        """Postgres: the claim of ``op`` as one step, its charges in the same statement when it has any.
        Answer: the winner's row, None (the key exists), or ``EXCEEDED`` (over budget: nothing written)."""
        if op.charges:
            return (yield self.limited(op))
        return (yield self.claim.sql, self.params(self.claim, op.binds()), True)

    def _pg(self, conn: Any, work: Work) -> Any:
        op = work.fast
        if isinstance(op, AppendEvents):  # batched replay records (written by the sync flusher)
            with conn.cursor() as cur, cur.copy(self.copy_events) as copy:
                for row in op.rows:
                    copy.write_row(self.copy_values(row))
            return None
        steps = self._pg_steps(work)
        got: Any = None
        try:
            while True:
                sql, params, fetch = steps.send(got)
                try:
                    cur = conn.execute(sql, params)
                except Exception as e:
                    if not self._over_budget(sql, e):
                        raise
                    got = EXCEEDED  # a limited claim over budget: the statement rolled back as a whole
                    continue
                got = cur.fetchone() if fetch else cur.rowcount
        except StopIteration as done:
            return done.value

    def _sqlite(self, conn: Any, work: Work) -> Any:
        op = work.fast
        if self.reads_first(work):  # a lock-free read first
            assert isinstance(op, (Lookup, ClaimOrLoad))
            found = conn.execute(self.load.sql, self.params(self.load, op.lookup_binds())).fetchone()
            answer = self.looked_up(work, found)
            if answer is not HOP:
                return answer
        if isinstance(op, ClaimOrLoad):
            # Claim under the write lock; if the key exists, read it in the same transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                won = conn.execute(self.claim.sql, self.params(self.claim, op.binds())).fetchone()
                if won is not None and op.charges and not self._charged(conn, op):
                    conn.execute("ROLLBACK")  # the claim and every charge, or nothing
                    return EXCEEDED
                found = (
                    None
                    if won is not None
                    else conn.execute(self.load.sql, self.params(self.load, op.lookup_binds())).fetchone()
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self.saw(new=won is not None)
            if won is not None:
                return {"claimed": True}
            return self.stored(found) if found is not None else None
        conn.execute("BEGIN IMMEDIATE")
        try:
            if isinstance(op, AppendEvents):
                rows = self.event_rows
                conn.executemany(rows.sql, [self.params(rows, r) for r in op.rows])
                conn.execute("COMMIT")
                return None
            if isinstance(op, ClaimNew):
                found = conn.execute(self.claim.sql, self.params(self.claim, op.binds())).fetchone()
                if found is not None and op.charges and not self._charged(conn, op):
                    conn.execute("ROLLBACK")
                    return EXCEEDED
                out: Any = {"attempt": found[0]} if found is not None else None
            elif isinstance(op, Finish):
                out = conn.execute(self.complete.sql, self.params(self.complete, op.binds())).rowcount
                if out and op.audited:
                    conn.execute(self.event.sql, self.params(self.event, op.audit_binds()))
            else:  # pragma: no cover
                raise AssertionError(op)
            conn.execute("COMMIT")
            return out
        except BaseException:
            _rollback(conn)
            raise

    def read_inline(self, pool: SyncPool, work: Work) -> Any:
        """Async SQLite: the lock-free lookup of a unit, run on the event loop itself, or ``HOP``.

        An indexed read in WAL mode never waits for writers and costs a few microseconds, where a hop
        to a worker thread costs ten times that. So a lookup (``load``, or the read-first half of
        ``claim_or_load``) runs here, on a connection that does not wait for locks; anything that
        writes or waits (a claim, a read that meets a lock) returns ``HOP`` and runs in the worker
        thread as a whole unit.
        """
        if not self.reads_first(work):
            return HOP
        conn = None
        healthy = False
        try:
            assert isinstance(work.fast, (Lookup, ClaimOrLoad))  # reads_first
            conn = pool.acquire()
            found = conn.execute(self.load.sql, self.params(self.load, work.fast.lookup_binds())).fetchone()
            healthy = True
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise exc.DBAPIError.instance(None, None, e, sqlite3.Error) from e
            healthy = True
            return HOP  # locked (a rare WAL recovery or an exclusive-mode connection): wait in the thread
        except sqlite3.Error as e:
            raise exc.DBAPIError.instance(None, None, e, sqlite3.Error) from e
        finally:
            if conn is not None:
                pool.release(conn, healthy)
        return self.looked_up(work, found)  # HOP for an absent key: it is claimed in the worker thread

    # -- async ------------------------------------------------------------------------------

    async def arun(self, pool: AsyncPool, work: Work) -> Any:
        """Run a hot unit of work on a pooled async driver connection (one pool per event loop)."""
        try:
            conn = await pool.acquire()
        except pool.errors as e:  # a failed (re)connect: mapped like any other driver error
            raise exc.DBAPIError.instance(None, None, e, pool.errors[0]) from e
        healthy = False
        try:
            out = await self._apg(conn, work)
            healthy = True
            return out
        except pool.errors as e:
            healthy = not pool.is_disconnect(e)
            raise exc.DBAPIError.instance(None, None, e, pool.errors[0]) from e
        finally:
            await pool.release(conn, healthy)

    async def _apg(self, conn: Any, work: Work) -> Any:
        op = work.fast
        if isinstance(op, AppendEvents):  # as in _pg (the flusher is sync; this keeps ado complete)
            async with conn.cursor() as cur, cur.copy(self.copy_events) as copy:
                for row in op.rows:
                    await copy.write_row(self.copy_values(row))
            return None
        steps = self._pg_steps(work)
        got: Any = None
        try:
            while True:
                sql, params, fetch = steps.send(got)
                try:
                    cur = await conn.execute(sql, params)
                except Exception as e:
                    if not self._over_budget(sql, e):
                        raise
                    got = EXCEEDED  # as in _pg
                    continue
                got = await cur.fetchone() if fetch else cur.rowcount
        except StopIteration as done:
            return done.value
