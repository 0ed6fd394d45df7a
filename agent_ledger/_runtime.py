"""The I/O side: engines, the sync and async drivers of ``_flow``, heartbeats and batched replay records.

Both drivers perform the same operations, including the flow's clock readings, liveness checks and ids.
The sync driver never awaits a user function: one that returns an awaitable in a sync call is refused
(``ConfigurationError``). They do bridge, in named places: from sync code, an async approval-channel
hook runs in ``asyncio.run`` (``approvals/_service.py``), and so does ``Ledger.recover()`` when async
``reconcile=`` callbacks are registered (the whole sweep on the async driver, outside a running loop);
the async driver hands SQLite writes and blocking channel hooks to a worker thread (SQLite has no
asynchronous I/O).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Generator, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from sqlalchemy import Connection, Engine, create_engine, event, exc, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ._context import _current as _current_effect
from ._fast import HOP, AsyncPool, Hot, Listener, SyncPool, install_idle_ping
from ._flow import (
    Beat,
    Db,
    Invoke,
    NewId,
    Notify,
    Now,
    Op,
    OwnerGone,
    Replayed,
    Sleep,
    StopBeat,
    Supersede,
    Unit,
    _AwaitableInSyncCall,
    make_owner,
    owner_gone,
    utcnow,
)
from ._hide import hide, hide_url, password_of, remember
from ._pooling import Pooling, split_pooling
from ._schema import Tables
from ._store import EXCEEDED, Store, Work, notify_channel
from ._telemetry import CallObserver
from .errors import ConfigurationError, SchemaMissing, StorageError

if TYPE_CHECKING:
    from .approvals._service import ApprovalService

__all__ = ["Runtime", "normalise_url", "pooling_mode", "sqlite_file"]

log = logging.getLogger("agent_ledger")

_ABSENT = re.compile(r'FATAL:\s+(database|role) "([^"]*)" does not exist')
_MISSING_SCHEMA_HINTS = ("no such table", "no such column", "does not exist", "undefinedtable", "undefinedcolumn")


def normalise_url(url: str) -> tuple[str, str, str]:
    """(dialect, sync URL, async URL) for a user's database URL; refuses what the ledger cannot use.

    Messages show the URL with its password masked, and the password is remembered so that driver
    errors quoting it are masked too (``_hide``). The ``?pgbouncer=`` option is checked and removed
    (``pooling_mode`` reads it).
    """
    remember(password_of(url))
    shown = hide_url(url)
    try:
        u = make_url(url)
    except Exception as e:
        # Not chained: the parser's own message may quote the whole URL, password included.
        raise ConfigurationError(f"cannot parse database URL {shown!r}: {hide(str(e)).replace(url, shown)}") from None
    remember(u.password if isinstance(u.password, str) else None)
    u, _ = split_pooling(u, shown, url)
    backend = u.get_backend_name()
    driver = u.get_driver_name() if "+" in u.drivername else None
    if backend in ("postgresql", "postgres"):
        if driver not in (None, "psycopg", "psycopg_async"):
            raise ConfigurationError(
                f"database URL {shown!r} uses the driver {driver!r}: agent_ledger talks to Postgres through "
                f"psycopg 3; write postgresql+psycopg://..."
            )
        pg = u.set(drivername="postgresql+psycopg")
        s = pg.render_as_string(hide_password=False)
        return "postgresql", s, s
    if backend == "sqlite":
        if driver not in (None, "pysqlite", "aiosqlite"):
            raise ConfigurationError(f"database URL {shown!r}: SQLite is used through sqlite3/aiosqlite")
        if not u.database or u.database == ":memory:" or u.query.get("mode") == "memory":
            raise ConfigurationError(
                f"database URL {shown!r} is an in-memory SQLite database: sync and async calls and other "
                f"processes would each see a different, empty database. Use a file, e.g. "
                f"sqlite:///agent_ledger.db (or a tmp_path in tests)."
            )
        u = _sqlite_url(u)
        return (
            "sqlite",
            u.set(drivername="sqlite+pysqlite").render_as_string(hide_password=False),
            u.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False),
        )
    raise ConfigurationError(
        f"database URL {shown!r}: agent_ledger supports postgresql+psycopg:// and sqlite:/// URLs, not {u.drivername!r}"
    )


def pooling_mode(url: str) -> str | None:
    """The ``?pgbouncer=`` option of a URL that ``normalise_url`` accepted (``transaction``, ``session``
    or None)."""
    return split_pooling(make_url(url), hide_url(url), url)[1]


_SQLITE_URI_OPTIONS = frozenset({"mode", "cache", "immutable", "nolock", "vfs", "psow"})
"""Options of a ``sqlite:///file?...`` URL that SQLite itself reads (its URI filename parameters)."""


def _sqlite_url(u: URL) -> URL:
    """A SQLite URL whose query options every connection of the ledger honours, or ConfigurationError.

    ``timeout`` (seconds a write waits for the lock) and SQLite's URI parameters (``mode=ro``,
    ``immutable=1``, ``cache``, ...) are honoured by the SQLAlchemy engines and the hot path alike: the
    URL becomes SQLAlchemy's ``file:...?...&uri=true`` form. Other options are refused: the ledger sets
    the driver's own (isolation level, threads, type detection) itself.
    """
    query = dict(u.query)
    unknown = sorted(set(query) - _SQLITE_URI_OPTIONS - {"timeout", "uri"})
    if unknown:
        raise ConfigurationError(
            f"SQLite URL option(s) {', '.join(unknown)} are not supported: a sqlite:/// URL may carry timeout "
            f"(seconds to wait for the write lock) and SQLite's URI options ({', '.join(sorted(_SQLITE_URI_OPTIONS))})"
        )
    if "timeout" in query:
        try:
            if float(str(query["timeout"])) < 0:
                raise ValueError
        except ValueError:
            raise ConfigurationError(
                "SQLite URL option timeout must be a number of seconds (e.g. timeout=30)"
            ) from None
    database = str(u.database)
    if database.startswith("file:") and database[5:].partition("?")[0] in ("", ":memory:"):
        raise ConfigurationError("an in-memory SQLite database cannot be shared: use a file (sqlite:///ledger.db)")
    if not (set(query) & _SQLITE_URI_OPTIONS) and not database.startswith("file:"):
        return u.difference_update_query(["uri"])  # a plain file name
    if not database.startswith("file:"):
        database = "file:" + quote(database, safe="/:")  # '?', '#' and '%' are special in a SQLite URI
    return u.set(database=database).update_query_dict({"uri": "true"})


def sqlite_file(sync_url: str) -> str:
    """The file name of a normalised SQLite URL (without the ``file:`` URI form and its options)."""
    database = str(make_url(sync_url).database)
    if not database.startswith("file:"):
        return database
    return unquote(database[5:].partition("?")[0])


def _sqlite_target(sync_url: str) -> tuple[str, bool, bool, float | None]:
    """What the ledger's own sqlite3 connections open for a normalised URL: (file name or ``file:``
    URI, whether it is a URI, whether it is read-only, the URL's ``timeout``)."""
    u = make_url(sync_url)
    timeout = float(str(u.query["timeout"])) if "timeout" in u.query else None
    options = {k: str(v) for k, v in u.query.items() if k in _SQLITE_URI_OPTIONS}
    readonly = options.get("mode") == "ro" or options.get("immutable", "0").lower() in ("1", "true", "yes", "on")
    if u.query.get("uri") != "true":
        return str(u.database), False, readonly, timeout
    target = str(u.database)
    if options:
        target += ("&" if "?" in target else "?") + "&".join(
            f"{k}={quote(v, safe='')}" for k, v in sorted(options.items())
        )
    return target, True, readonly, timeout


def _pool_bounds(options: Mapping[str, Any]) -> tuple[int | None, float]:
    """The hot-path pools' bound and wait, from SQLAlchemy's ``engine_options`` (the same meaning as for
    its ``QueuePool``): at most ``pool_size + max_overflow`` connections (defaults 5 + 10; 0 for
    ``pool_size`` or -1 for ``max_overflow`` mean no limit), waiting ``pool_timeout`` seconds (default 30)
    for a free one."""
    size, overflow, timeout = (
        options.get("pool_size", 5),
        options.get("max_overflow", 10),
        options.get("pool_timeout", 30.0),
    )
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigurationError(f"engine_options pool_size must be a whole number >= 0 (0: no limit), not {size!r}")
    if isinstance(overflow, bool) or not isinstance(overflow, int) or overflow < -1:
        raise ConfigurationError(
            f"engine_options max_overflow must be a whole number >= -1 (-1: no limit), not {overflow!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(f"engine_options pool_timeout must be a number of seconds > 0, not {timeout!r}")
    limit = None if size == 0 or overflow == -1 else size + overflow
    return limit, float(timeout)


def _sqlite_events(sync_engine: Engine, busy_timeout: float = 30.0, readonly: bool = False) -> None:
    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (IMMEDIATE for writes): sqlite3's implicit BEGIN DEFERRED lets two
        # writers both read, then fail with SQLITE_BUSY on upgrade despite busy_timeout.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not readonly:  # a read-only connection keeps the file's journal mode (changing it is a write)
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        if conn.get_execution_options().get("agent_ledger_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _storage_error(e: exc.SQLAlchemyError, label: str) -> StorageError:
    text = str(getattr(e, "orig", None) or e)
    absent = _ABSENT.search(text)
    if absent:  # refused at connect: not a missing table, and `agent-ledger migrate` cannot fix it
        what, name = absent.groups()
        if what == "database":
            return StorageError(
                f'the Postgres database "{name}" does not exist on that server: create it first (e.g. '
                f'`createdb {name}`, or CREATE DATABASE "{name}" as a role allowed to create databases), '
                f"then run `agent-ledger migrate --url ...` to create the ledger's tables in it"
            )
        return StorageError(f'the Postgres role "{name}" does not exist on that server: check the user in the URL')
    low = text.lower() + type(getattr(e, "orig", e)).__name__.lower()
    if "prepared statement" in low and ("does not exist" in low or "already exists" in low):
        # psycopg prepares a statement on one server session; a transaction pooler ran the next one elsewhere.
        return StorageError(
            f"database error during {label or 'a ledger operation'}: {text.strip()}. A transaction-pooling "
            f"PgBouncer (or another pooler) is between the ledger and Postgres while the URL says server sessions "
            f"are kept: add ?pgbouncer=transaction to the URL (see docs/storage.md)"
        )
    if any(h in low for h in _MISSING_SCHEMA_HINTS):
        return SchemaMissing(
            f"the ledger's tables are missing or out of date ({text.strip()}): run "
            f"`agent-ledger migrate --url ...` or Ledger(url).migrate()"
        )
    return StorageError(f"database error during {label or 'a ledger operation'}: {text.strip()}")


def _settle(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _unreachable(e: OSError, label: str) -> StorageError:
    return StorageError(f"database unreachable during {label or 'a ledger operation'}: {e}")


@contextlib.contextmanager
def _mapped(label: str) -> Iterator[None]:
    try:
        yield
    except exc.SQLAlchemyError as e:
        raise _storage_error(e, label) from e
    except OSError as e:
        raise _unreachable(e, label) from e


def _outcome(res: Any, returns: str) -> Any:
    if returns == "row":
        return res.mappings().first()
    if returns == "rows":
        return res.mappings().all()
    if returns == "rowcount":
        return res.rowcount
    return None


class _NoMatch(Exception):
    """A later step of an all-or-nothing unit matched nothing: roll the whole unit back."""


class _OverBudget(Exception):
    """A charge of a winning claim did not fit its budget: roll the whole unit back (``EXCEEDED``)."""


def _nothing(work: Work) -> Any:
    return None if work.returns == "row" else 0


def _not_claimed(found: Any) -> dict[str, Any] | None:
    """``ClaimOrLoad``'s answer when the claim returned no row: the stored row, or None (look again)."""
    return None if found is None else {"claimed": False, **found}


def _matched(value: Any, returns: str) -> bool:
    if returns == "row":
        return value is not None
    if returns == "rowcount":
        return bool(value)
    return True


class Runtime:
    """Engines plus the two drivers for one ledger."""

    def __init__(
        self,
        url: str,
        tables: Tables,
        *,
        auto_migrate: bool | None,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.dialect, self.sync_url, self.async_url = normalise_url(url)
        self.pooling = Pooling(pooling_mode(url), self.dialect)
        """Whether a transaction pooler (PgBouncer) is in between: the ``?pgbouncer=`` option, or detected
        on the first connection (``_pooling``). Behind one, no connection prepares statements."""
        self.approvals: ApprovalService | None = None
        """Carries out ``Notify`` (set by the ``Ledger`` that owns this runtime)."""
        self.owner = make_owner()
        """The owner id of this process's claims and audit rows (``host:pid:random``; renewed after a fork)."""
        self.tables = tables
        self.store = Store(tables, self.dialect)
        self.auto_migrate = (self.dialect == "sqlite") if auto_migrate is None else auto_migrate
        self._engine_options = dict(engine_options or {})
        self._pool_limit, self._pool_timeout = _pool_bounds(self._engine_options)
        self._busy_timeout, self._readonly = 30.0, False
        if self.dialect == "sqlite":
            _, _, self._readonly, timeout = _sqlite_target(self.sync_url)
            self._busy_timeout = 30.0 if timeout is None else timeout
        self._engine: Engine | None = None
        self._hot: Hot | None = None
        self._spool: SyncPool | None = None
        self._rpool: SyncPool | None = None
        self._listen: Listener | None = None
        self.wake_waiters = self.dialect == "postgresql"
        """Postgres: waiters of a running key listen for its completion (``_fast.Listener``) besides
        polling. Off where ``LISTEN`` and session locks cannot work (PgBouncer in transaction mode):
        waiters then only poll."""
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._apools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPool] = weakref.WeakKeyDictionary()
        self._aengines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ok = False
        self._heartbeats: _Heartbeats | None = None
        self._replays = _ReplayBuffer(self)
        self._closed = False
        self.use_hot_path = True
        """False: hot units run their ``Work.steps`` through SQLAlchemy Core, the reference implementation
        of the typed hot operations (tests/test_hot_contract.py compares the two)."""
        _live.add(self)

    @property
    def listen_ok(self) -> bool:
        """Whether a ``LISTEN`` keeps receiving notifications: True only on Postgres once the first connection
        showed no transaction pooler in between (or with ``?pgbouncer=session``). False on SQLite, with
        ``?pgbouncer=transaction``, behind a detected pooler, and before the first connection was checked.
        Code that would ``LISTEN`` (e.g. to wake waiters) must poll instead when this is False."""
        return self.pooling.listen_ok

    @property
    def prepare_threshold(self) -> int | None:
        """psycopg's ``prepare_threshold`` for a connection this runtime opens: None (never prepare) behind
        a transaction pooler or before that is known, else psycopg's default."""
        return self.pooling.prepare_threshold

    # -- engines ---------------------------------------------------------------------------

    def _options(self, *, is_async: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.dialect == "sqlite":
            opts["connect_args"] = {"timeout": self._busy_timeout}
            if not is_async:
                opts["connect_args"]["check_same_thread"] = False
        opts.update(self._engine_options)
        return opts

    @property
    def engine(self) -> Engine:
        """The sync engine (created on first use)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    eng = create_engine(self.sync_url, **self._options(is_async=False))
                    if self.dialect == "sqlite":
                        _sqlite_events(eng, self._busy_timeout, self._readonly)
                    else:
                        self.pooling.install(eng)
                        install_idle_ping(eng)
                    self._hot = Hot(self.store, eng.dialect)
                    self._engine = eng
        return self._engine

    @property
    def hot(self) -> Hot:
        """The prebuilt hot statements (compiled for the sync dialect; the async drivers take the same SQL)."""
        if self._hot is None:
            self.engine  # noqa: B018 - creating the engine builds them
        assert self._hot is not None
        return self._hot

    def _driver_target(self) -> str:
        url = make_url(self.sync_url)
        if self.dialect == "postgresql":
            return url.set(drivername="postgresql").render_as_string(hide_password=False)
        return _sqlite_target(self.sync_url)[0]

    def _sync_pool(self, busy_timeout: float, limit: int | None) -> SyncPool:
        uri = self.dialect == "sqlite" and _sqlite_target(self.sync_url)[1]
        return SyncPool(
            self.dialect,
            self._driver_target(),
            limit=limit,
            timeout=self._pool_timeout,
            busy_timeout=busy_timeout,
            context=self._adapters() if self.dialect == "postgresql" else None,
            uri=uri,
            readonly=self._readonly,
            setup=self.pooling.setup if self.dialect == "postgresql" else None,
        )

    def _sqlite_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="agent-ledger-sqlite")
        return self._executor

    def _pool(self) -> SyncPool:
        if self._spool is None:
            with self._lock:
                if self._spool is None:
                    self._spool = self._sync_pool(self._busy_timeout, self._pool_limit)
        return self._spool

    def _adapters(self) -> Any:
        """Postgres: the engine dialect's psycopg adapters map (None on SQLite)."""
        return getattr(self.engine.dialect, "_psycopg_adapters_map", None)

    def _listener(self, key: str | None) -> Listener | None:
        """The process's listener for waiters of ``key`` (None: just sleep)."""
        # ``listen_ok``: False behind a transaction pooler, where LISTEN and the marks' session locks cannot
        # work; read when a waiter sleeps, after its lookup checked the connection.
        if key is None or not self.wake_waiters or self._closed or not self.listen_ok:
            return None
        if self._listen is None:
            with self._lock:
                if self._listen is None:
                    self._listen = Listener(self._driver_target(), notify_channel(self.store.tables))
        return self._listen

    def _reader(self) -> SyncPool:
        """SQLite connections for lookups on the event loop: they never wait for a lock."""
        if self._rpool is None:
            with self._lock:
                if self._rpool is None:
                    # Unbounded: used only on event loop threads, one connection at a time per thread,
                    # and a lookup on the loop must never wait for a connection.
                    self._rpool = self._sync_pool(0.0, None)
        return self._rpool

    def _apool(self) -> AsyncPool:
        loop = asyncio.get_running_loop()
        pool = self._apools.get(loop)
        if pool is None:
            pool = self._apools[loop] = AsyncPool(
                self._driver_target(),
                limit=self._pool_limit,
                timeout=self._pool_timeout,
                context=self._adapters(),
                setup=self.pooling.asetup,
            )
        return pool

    @property
    def aengine(self) -> AsyncEngine:
        """The async engine of the running event loop (async connections cannot cross loops)."""
        loop = asyncio.get_running_loop()
        eng = self._aengines.get(loop)
        if eng is None:
            eng = create_async_engine(self.async_url, **self._options(is_async=True))
            if self.dialect == "sqlite":
                _sqlite_events(eng.sync_engine, self._busy_timeout, self._readonly)
            else:
                self.pooling.install(eng.sync_engine)
                install_idle_ping(eng.sync_engine)
            self._aengines[loop] = eng
        return eng

    # -- schema ----------------------------------------------------------------------------

    def _probe(self) -> Any:
        t = self.tables
        return [
            select(t.effects).where(t.effects.c.key.is_(None)).limit(1),
            select(t.events).limit(0),
            select(t.approvals).limit(0),
            select(t.inbound).limit(0),
            select(t.usage).limit(0),
        ]

    def ensure_schema(self) -> None:
        """Check (once) that the tables exist with every column; migrate or explain when they do not."""
        if self._schema_ok:
            return
        with self._schema_lock:  # one check (and at most one migration) per process at a time
            if self._schema_ok:
                return
            try:
                self._check_schema()
            except SchemaMissing:
                if not self.auto_migrate:
                    raise
                self.migrate()
            self._schema_ok = True

    def _check_schema(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execution_options(agent_ledger_read=True)
                for q in self._probe():
                    conn.execute(q)
        except exc.SQLAlchemyError as e:
            raise _storage_error(e, "schema check") from e

    async def aensure_schema(self) -> None:
        """The async twin of ``ensure_schema`` (migrations themselves always run on the sync engine)."""
        if self._schema_ok:
            return
        try:
            async with self.aengine.connect() as conn:
                await conn.execution_options(agent_ledger_read=True)
                for q in self._probe():
                    await conn.execute(q)
        except exc.SQLAlchemyError as e:
            err = _storage_error(e, "schema check")
            if not isinstance(err, SchemaMissing) or not self.auto_migrate:
                raise err from e
            self.ensure_schema()  # migrations run on the sync engine, under the process-wide lock
        self._schema_ok = True

    def migrate(self, revision: str = "head", partitions: int | None = None) -> None:
        """Upgrade the database to ``revision`` with the shipped alembic migrations (``partitions``:
        Postgres tables hash-partitioned by workflow_id, see ``_migrate``)."""
        from ._migrate import upgrade

        try:
            with _mapped("migration"):
                upgrade(self.engine, self.tables, revision, partitions)
        except StorageError:
            # Another process may have migrated the same database at the same moment: if the tables are
            # complete now, that is success; otherwise the original error stands.
            try:
                self._check_schema()
            except StorageError:
                pass
            else:
                self._schema_ok = True
                return
            raise
        self._schema_ok = True

    # -- executing work --------------------------------------------------------------------

    def do(self, work: Work) -> Any:
        """Run one unit of work on the sync engine, in one transaction."""
        if not self._schema_ok:  # (checked here: a call per unit of work costs more than the test)
            self.ensure_schema()
        if work.fast is not None and self.use_hot_path:  # maps errors as _mapped does, without a context manager
            try:
                return (self._hot or self.hot).run(self._spool or self._pool(), work)
            except exc.SQLAlchemyError as e:
                raise _storage_error(e, work.label) from e
            except OSError as e:
                raise _unreachable(e, work.label) from e
        with _mapped(work.label), self.engine.connect() as conn:
            if not work.write:
                conn.execution_options(agent_ledger_read=True)
            try:
                with conn.begin():
                    return self._steps(conn, work)
            except _NoMatch:
                return _nothing(work)
            except _OverBudget:
                return EXCEEDED

    @contextlib.contextmanager
    def transaction(self, label: str) -> Iterator[Connection]:
        """One write transaction on the sync engine (for multi-step maintenance like ``recover``)."""
        self.ensure_schema()
        with _mapped(label), self.engine.connect() as conn, conn.begin():
            yield conn

    def steps(self, conn: Connection, work: Work) -> Any:
        """Run ``work`` inside an open transaction."""
        with _mapped(work.label):
            return self._steps(conn, work)

    @staticmethod
    def _steps(conn: Connection, work: Work) -> Any:
        (stmt, params), *rest = work.statements()
        if work.returns == "claim_or_row":  # the claim, or (when the key exists) the lookup after it
            if conn.execute(stmt, params).first() is not None:
                for stmt, params in work.charges:  # the winner pays, or nothing is written
                    if conn.execute(stmt, params).first() is None:
                        raise _OverBudget
                return {"claimed": True}
            (stmt, params), *rest = rest
            return _not_claimed(conn.execute(stmt, params).mappings().first())
        out = _outcome(conn.execute(stmt, params), work.returns)
        if work.then is not None:
            later, out = work.then(out)
            rest = list(later)
        if work.charges and _matched(out, work.returns):
            for stmt, params in work.charges:
                if conn.execute(stmt, params).first() is None:
                    raise _OverBudget
        if rest and (work.then is not None or _matched(out, work.returns)):
            for stmt, params in rest:
                if not conn.execute(stmt, params).rowcount and work.all_or_nothing:
                    raise _NoMatch
        return out

    async def ado(self, work: Work) -> Any:
        """Run one unit of work on the async engine, in one transaction."""
        if not self._schema_ok:
            await self.aensure_schema()
        if work.fast is not None and self.use_hot_path:  # errors mapped as _mapped does, without its frames
            try:
                if self.dialect == "sqlite":
                    # SQLite has no asynchronous I/O (aiosqlite is a thread too). A lookup runs on the
                    # loop (it never waits for a lock); anything else runs as one unit in one hop to a
                    # worker thread, instead of one hop per statement.
                    found = self.hot.read_inline(self._reader(), work)
                    if found is not HOP:
                        await asyncio.sleep(0)  # still a real await: other tasks run, cancellation lands
                        return found
                    loop = asyncio.get_running_loop()
                    return await loop.run_in_executor(self._sqlite_executor(), self.hot.run, self._pool(), work)
                return await (self._hot or self.hot).arun(self._apool(), work)
            except exc.SQLAlchemyError as e:
                raise _storage_error(e, work.label) from e
            except OSError as e:
                raise _unreachable(e, work.label) from e
        with _mapped(work.label):
            async with self.aengine.connect() as conn:
                if not work.write:
                    await conn.execution_options(agent_ledger_read=True)
                try:
                    async with conn.begin():
                        return await self._asteps(conn, work)
                except _NoMatch:
                    return _nothing(work)
                except _OverBudget:
                    return EXCEEDED

    @staticmethod
    async def _asteps(conn: AsyncConnection, work: Work) -> Any:
        (stmt, params), *rest = work.statements()
        if work.returns == "claim_or_row":  # as in _steps
            if (await conn.execute(stmt, params)).first() is not None:
                for stmt, params in work.charges:
                    if (await conn.execute(stmt, params)).first() is None:
                        raise _OverBudget
                return {"claimed": True}
            (stmt, params), *rest = rest
            return _not_claimed((await conn.execute(stmt, params)).mappings().first())
        out = _outcome(await conn.execute(stmt, params), work.returns)
        if work.then is not None:
            later, out = work.then(out)
            rest = list(later)
        if work.charges and _matched(out, work.returns):
            for stmt, params in work.charges:
                if (await conn.execute(stmt, params)).first() is None:
                    raise _OverBudget
        if rest and (work.then is not None or _matched(out, work.returns)):
            for stmt, params in rest:
                if not (await conn.execute(stmt, params)).rowcount and work.all_or_nothing:
                    raise _NoMatch
        return out

    # -- the drivers -----------------------------------------------------------------------

    def run_sync(self, flow: Generator[Op, Any, Any], seen: CallObserver | None = None) -> Any:
        """Drive a flow with blocking I/O."""
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value
            send, error = None, None
            if seen is not None:
                seen.saw(op)
            try:
                send = self._perform(op)
            except BaseException as e:
                error = e

    def _perform(self, op: Op) -> Any:
        if isinstance(op, Db):
            return self.do(op.work)
        if isinstance(op, Invoke):
            token = _current_effect.set(op.effect)  # current_effect() for the handler's own code
            try:
                started = time.monotonic()
                try:
                    value = op.fn(op.effect)
                except BaseException as e:
                    return None, e, utcnow(), time.monotonic() - started
                if type(value) not in _PLAIN and hasattr(type(value), "__await__"):
                    return None, _refused_awaitable(op, value), utcnow(), time.monotonic() - started
                return value, None, utcnow(), time.monotonic() - started
            finally:
                _current_effect.reset(token)
        if isinstance(op, Replayed):
            self._replays.add(op.event)
            return None
        if isinstance(op, Sleep):
            listener = self._listener(op.key)
            if listener is None:
                time.sleep(op.seconds)
                return utcnow(), time.monotonic()
            assert op.key is not None
            woken = threading.Event()
            listener.watch(op.key, woken.set)
            try:
                woken.wait(listener.pause(op))
            finally:
                listener.unwatch(op.key, woken.set)
            return utcnow(), time.monotonic()
        if isinstance(op, Now):
            return utcnow(), time.monotonic()
        if isinstance(op, OwnerGone):
            return owner_gone(op.owner)
        if isinstance(op, NewId):
            return op.prefix + uuid.uuid4().hex
        if isinstance(op, Beat):
            return self.heartbeats.start(op)
        if isinstance(op, StopBeat):
            self.heartbeats.stop(op.handle)
            return None
        if isinstance(op, Notify):
            if self.approvals is not None:
                self.approvals.notify_request(op.approval)
            return None
        if isinstance(op, Unit):
            return self._unit(op)
        if isinstance(op, Supersede):
            if self.approvals is not None:
                self.approvals.supersede_others(op.key, op.workflow_id, op.payload_hash)
            return None
        raise AssertionError(f"unknown operation {op!r}")  # pragma: no cover

    def _unit(self, op: Unit) -> Any:
        """Drive ``op.steps`` inside one write transaction on the sync engine."""
        steps = op.steps
        with self.transaction(op.label) as conn:
            send: Any = None
            while True:
                try:
                    item = steps.send(send)
                except StopIteration as stop:
                    result = stop.value
                    break
                send = owner_gone(item.owner) if isinstance(item, OwnerGone) else self.steps(conn, item)
        return result

    async def run_async(self, flow: Generator[Op, Any, Any], seen: CallObserver | None = None) -> Any:
        """Drive a flow with asyncio I/O."""
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value
            send, error = None, None
            if seen is not None:
                seen.saw(op)
            try:
                send = await self._aperform(op)
            except BaseException as e:
                error = e

    async def _aperform(self, op: Op) -> Any:
        if isinstance(op, Db):
            return await self.ado(op.work)
        if isinstance(op, Invoke):
            token = _current_effect.set(op.effect)  # current_effect() for the handler's own code
            try:
                started = time.monotonic()
                try:
                    value = op.fn(op.effect)
                    if type(value) not in _PLAIN and hasattr(type(value), "__await__"):
                        value = await value
                except BaseException as e:
                    return None, e, utcnow(), time.monotonic() - started
                return value, None, utcnow(), time.monotonic() - started
            finally:
                _current_effect.reset(token)
        if isinstance(op, Sleep):
            listener = self._listener(op.key)
            if listener is None:
                await asyncio.sleep(op.seconds)
                return utcnow(), time.monotonic()
            assert op.key is not None
            loop = asyncio.get_running_loop()
            woken = loop.create_future()

            def wake() -> None:  # called from the listener thread
                loop.call_soon_threadsafe(_settle, woken)

            listener.watch(op.key, wake)
            try:
                await asyncio.wait({woken}, timeout=listener.pause(op))
            finally:
                listener.unwatch(op.key, wake)
                woken.cancel()
            return utcnow(), time.monotonic()
        if isinstance(op, Beat):
            return asyncio.get_running_loop().create_task(self._abeat(op))
        if isinstance(op, StopBeat):
            op.handle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await op.handle
            return None
        if isinstance(op, Notify):
            if self.approvals is not None:
                await self.approvals.anotify_request(op.approval)
            return None
        if isinstance(op, Unit):
            return await self._aunit(op)
        if isinstance(op, Supersede):
            if self.approvals is not None:  # blocking: the service's writes and channel hooks are sync
                await asyncio.to_thread(self.approvals.supersede_others, op.key, op.workflow_id, op.payload_hash)
            return None
        return self._perform(op)

    async def _aunit(self, op: Unit) -> Any:
        """Drive ``op.steps`` inside one write transaction on the async engine."""
        await self.aensure_schema()
        steps = op.steps
        with _mapped(op.label):
            async with self.aengine.connect() as conn, conn.begin():
                send: Any = None
                while True:
                    try:
                        item = steps.send(send)
                    except StopIteration as stop:
                        return stop.value
                    if isinstance(item, OwnerGone):
                        send = owner_gone(item.owner)
                    else:
                        send = await self._asteps(conn, item)

    async def _abeat(self, op: Beat) -> None:
        """The async driver's heartbeat: a task per claim (the sync driver's is one shared thread)."""
        interval = op.lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                answer = await self.ado(_heartbeat(self.store, op))
            except StorageError as e:
                answer = e
            if not _keep_beating(op, answer):
                return

    @property
    def heartbeats(self) -> _Heartbeats:
        """The shared heartbeat thread of the sync driver (started on first use)."""
        if self._heartbeats is None:
            with self._lock:
                if self._heartbeats is None:
                    self._heartbeats = _Heartbeats(self)
        return self._heartbeats

    # -- lifecycle -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered replay records now."""
        self._replays.flush()

    def close(self) -> None:
        """Flush, stop background threads and dispose the sync engine."""
        if self._closed:
            return
        self._closed = True
        self._replays.close()
        if self._heartbeats is not None:
            self._heartbeats.close()
        if self._engine is not None:
            self._engine.dispose()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        for pool in (self._spool, self._rpool):
            if pool is not None:
                pool.close()
        if self._listen is not None:
            self._listen.close()

    async def aclose(self) -> None:
        """``close()`` plus disposing the async engine."""
        self.close()
        await self.aclose_loop()

    async def aclose_loop(self) -> None:
        """Dispose the async engine and connections of the running event loop (they cannot outlive it)."""
        loop = asyncio.get_running_loop()
        eng = self._aengines.pop(loop, None)
        if eng is not None:
            await eng.dispose()
        pool = self._apools.pop(loop, None)
        if pool is not None:
            await pool.close()

    def after_fork(self) -> None:
        """In a forked child: take a new owner id and drop inherited connections and threads (they
        belong to the parent).

        The owner id names the process (``host:pid:random``); with the parent's id, the child's claims
        would look dead (``owner_gone``) as soon as the parent exits, while the child still runs them.
        """
        self.owner = make_owner()
        if self.approvals is not None:
            self.approvals.actor = self.owner
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._spool = self._rpool = None  # the parent's connections stay the parent's
        self._listen = None
        self._executor = None
        self._aengines = weakref.WeakKeyDictionary()
        self._apools = weakref.WeakKeyDictionary()
        self._heartbeats = None
        self._replays = _ReplayBuffer(self)
        self._lock = threading.Lock()
        self._schema_lock = threading.Lock()


# Types a handler commonly returns that are never awaitable: checked first, because looking up a missing
# ``__await__`` (what inspect.isawaitable does too) costs a few hundred ns per call.
_PLAIN = frozenset({dict, list, str, int, float, bool, type(None), tuple, bytes})


def _refused_awaitable(op: Invoke, value: Any) -> _AwaitableInSyncCall:
    """The error for an awaitable returned in a sync call; an unstarted coroutine is closed (it never ran)."""
    started = True
    if inspect.iscoroutine(value) and inspect.getcoroutinestate(value) == inspect.CORO_CREATED:
        value.close()
        started = False
    return _AwaitableInSyncCall(op.effect.tool, op.role, value, started, op.effect.key)


class _Heartbeats:
    """One daemon thread extending the leases of every live sync claim of a runtime."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._cond = threading.Condition()
        self._beats: dict[int, tuple[Beat, float]] = {}
        self._next = 0
        self._stopped = False
        self._wake_at = 0.0  # when the thread will look next; a beat due later needs no wake-up
        self._thread = threading.Thread(target=self._loop, name="agent-ledger-heartbeat", daemon=True)
        self._thread.start()

    def start(self, op: Beat) -> int:
        due = time.monotonic() + op.lease / 3
        with self._cond:
            self._next += 1
            self._beats[self._next] = (op, due)
            if due < self._wake_at:  # only wake the thread when it would otherwise look too late
                self._cond.notify()
            return self._next

    def stop(self, handle: int) -> None:
        with self._cond:
            self._beats.pop(handle, None)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                due = [(h, op) for h, (op, at) in self._beats.items() if at <= now]
                for h, op in due:
                    self._beats[h] = (op, now + op.lease / 3)
                if not due:
                    # Look at least every second, so most new beats (due lease/3 from now) need no notify.
                    nxt = min((at for _, at in self._beats.values()), default=now + 1.0)
                    self._wake_at = min(nxt, now + 1.0)
                    self._cond.wait(max(0.0, self._wake_at - now))
                    continue
            for h, op in due:
                self._beat(h, op)

    def _beat(self, handle: int, op: Beat) -> None:
        try:
            answer = self._rt.do(_heartbeat(self._rt.store, op))
        except StorageError as e:
            answer = e
        if not _keep_beating(op, answer):
            self.stop(handle)


def _heartbeat(store: Store, op: Beat) -> Work:
    """One heartbeat of ``op``'s claim: its lease runs ``op.lease`` seconds from now (fenced on the claim)."""
    return store.heartbeat(
        key=op.key,
        workflow_id=op.workflow_id,
        owner=op.owner,
        attempt=op.attempt,
        lease_expires_at=utcnow() + timedelta(seconds=op.lease),
    )


def _keep_beating(op: Beat, answer: Any) -> bool:
    """Whether to go on after a heartbeat answered ``answer`` (its rowcount, or the ``StorageError`` it
    raised): a failed write is retried at the next beat; a claim that matched nothing was lost."""
    if isinstance(answer, StorageError):
        log.warning("heartbeat for %s failed, will retry: %s", op.key, answer)
        return True
    if not answer:
        log.warning("lost the lease of %s (attempt %s): another worker took over", op.key, op.attempt)
        return False
    return True


class _ReplayBuffer:
    """Replay records, written in batches by a background thread: replays stay one read on the hot path.

    A process that dies loses at most the last ``interval`` seconds of replay counts, never an execution
    record (those are written in the same transaction as the state change they describe). ``limit`` only
    bounds memory: on SQLite every commit from another connection empties the readers' page caches, so
    flushing every few hundred replays made each replay of a busy reader measurably slower than one
    write every ``interval``.

    A write that fails (the database is down, locked or full) keeps its records, counted per key, and the
    thread tries again with a growing pause (``interval`` doubled up to ``max_backoff``); a new replay, which
    proves the database answers again, cuts the pause short (never below ``interval``). Memory stays
    bounded through a long outage: at most ``5 * limit`` records queued and ``5 * limit`` keys kept; replays
    beyond that are dropped and counted in a warning.
    """

    def __init__(self, rt: Runtime, interval: float = 0.5, limit: int = 10_000, max_backoff: float = 5.0) -> None:
        self._rt = rt
        self._interval = interval
        self._limit = limit
        self._max_backoff = max_backoff
        self._max_queued = 5 * limit
        self._items: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._writing = threading.Lock()  # one write at a time; guards the fields below
        self._pending: dict[str, dict[str, Any]] = {}  # per key: the record not written yet, with its count
        self._dropped = 0
        self._failing = False

    def add(self, row: Mapping[str, Any]) -> None:
        with self._lock:
            if len(self._items) >= self._max_queued:  # writes have been failing for long: bound memory
                self._dropped += 1
                return
            self._items.append(row)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="agent-ledger-replays", daemon=True)
                self._thread.start()
            if self._failing or len(self._items) >= self._limit:
                self._wake.set()

    def flush(self) -> None:
        """Write every buffered record now (on failure they stay buffered for the thread's next try)."""
        self._write()

    def _write(self) -> bool:
        with self._writing:
            with self._lock:
                items, self._items = self._items, []
            # One audit row per key and flush, counting its replays: a key replayed in a tight retry loop
            # costs one row, not one per retry.
            rows = self._pending
            for item in items:
                row = rows.get(item["key"])
                if row is not None:
                    row["detail"]["count"] += 1
                    row["at"] = item["at"]
                elif len(rows) < self._max_queued:
                    detail = item["detail"]
                    rows[item["key"]] = {**item, "detail": {"count": 1} if detail is None else {**detail, "count": 1}}
                else:
                    self._dropped += 1
            if not rows:
                return True
            try:
                self._rt.do(self._rt.store.events(list(rows.values())))
            except Exception as e:  # StorageError, or anything else: the thread must survive it
                replays = sum(r["detail"]["count"] for r in rows.values())
                if not self._failing:
                    log.warning("could not record %d replays (will retry): %s", replays, e)
                self._failing = True
                return False
            if self._failing:
                log.warning("recorded %d replays held back by a database failure", len(rows))
            self._pending = {}
            self._failing = False
            dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("dropped %d replay records during a long database failure (memory bound)", dropped)
            return True

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._wake.set()
        if not self._write():
            lost = sum(r["detail"]["count"] for r in self._pending.values())
            log.warning("closing with %d replay records not written (the database is failing)", lost)

    def _loop(self) -> None:
        pause = backoff = self._interval
        while not self._closed:
            self._wake.wait(pause)
            self._wake.clear()
            if self._closed:
                return
            if self._write():
                pause = backoff = self._interval
                continue
            # Back off, but never retry sooner than ``interval``; a replay (add) cuts the rest short.
            backoff = min(backoff * 2, self._max_backoff)
            if self._stop.wait(self._interval):
                return
            pause = backoff - self._interval


_live: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _flush_all() -> None:
    for rt in list(_live):
        with contextlib.suppress(Exception):
            rt.flush()


def _reset_after_fork() -> None:
    for rt in list(_live):
        rt.after_fork()


atexit.register(_flush_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
