"""A throwaway PgBouncer in front of a Postgres server, for the test suite and the benchmark.

``PgBouncer(host, port, user)`` writes a configuration to a temporary directory (every database name is
passed through to the server: ``* = host=... port=...``), starts ``pgbouncer`` on a free TCP port of
127.0.0.1 in the foreground, waits until it accepts connections, and stops it (SIGTERM, then SIGKILL)
on ``close()``. Clients log in without a password (``auth_type = trust``, the user listed in the
``auth_file``); when the server needs a password, it is written to the ``auth_file`` for PgBouncer's own
server logins.

pgbouncer refuses to run as root, so when we are root it runs as the ``postgres`` OS user on a directory
that user owns (as tests/_pgserver.py does for Postgres).

The binary is ``$AGENT_LEDGER_PGBOUNCER``, else ``pgbouncer`` on ``PATH``, else ``/usr/sbin/pgbouncer``
(Debian's package puts it there, outside an ordinary user's ``PATH``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

try:  # repo root importable, or tests/ itself on sys.path (the benchmark)
    from tests._pgserver import free_port
except ImportError:
    from _pgserver import free_port  # type: ignore[no-redef,import-not-found,unused-ignore]

__all__ = ["PgBouncer", "PgBouncerError", "find_pgbouncer"]

_INSTALL_HINT = (
    "Install PgBouncer: on Debian/Ubuntu run `apt-get update && apt-get install -y pgbouncer` "
    "(scripts/test.sh does this automatically when run as root), or point AGENT_LEDGER_PGBOUNCER at the binary."
)


class PgBouncerError(RuntimeError):
    """The throwaway PgBouncer could not be found or started."""


def find_pgbouncer() -> str:
    """The ``pgbouncer`` binary, or PgBouncerError with how to install it."""
    explicit = os.environ.get("AGENT_LEDGER_PGBOUNCER")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise PgBouncerError(f"AGENT_LEDGER_PGBOUNCER={explicit!r} is not an executable file.")
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PgBouncerError("pgbouncer not found (PATH, /usr/sbin, /usr/local/sbin). " + _INSTALL_HINT)


def _quote_ini(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _stop(pid: int) -> None:
    """Finalizer: stop a PgBouncer still running (SIGTERM: it exits at once, dropping its connections)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)


class PgBouncer:
    """A throwaway PgBouncer on 127.0.0.1 in front of the Postgres at ``host:port``.

    >>> bouncer = PgBouncer("127.0.0.1", 5432, "postgres")
    >>> bouncer.start()
    >>> url = bouncer.url("postgres")   # postgresql+psycopg://postgres@127.0.0.1:BPORT/postgres?pgbouncer=transaction
    >>> bouncer.close()

    ``pool_mode`` is PgBouncer's (``transaction`` by default); ``settings`` adds or overrides lines of its
    ``[pgbouncer]`` section (e.g. ``{"default_pool_size": "2"}``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str | None = None,
        *,
        pool_mode: str = "transaction",
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.binary = find_pgbouncer()
        self.server_host, self.server_port = host, port
        self.user, self.password = user, password
        self.pool_mode = pool_mode
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.start_timeout = start_timeout
        self.settings = {
            "pool_mode": pool_mode,
            "auth_type": "trust",
            "max_client_conn": "1000",
            "default_pool_size": "40",
            # Never wait long for a server connection: a test that needs more than the pool says so quickly.
            "query_wait_timeout": "60",
            "server_login_retry": "1",
            "ignore_startup_parameters": "extra_float_digits,options",
            **(settings or {}),
        }
        self._run_as = self._owner()
        root = tempfile.gettempdir() if self._run_as is None else "/tmp"
        self.base_dir = Path(tempfile.mkdtemp(prefix="agent_ledger_bouncer_", dir=root))
        self.config_path = self.base_dir / "pgbouncer.ini"
        self.log_path = self.base_dir / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: Any = None
        self._cleanup_dir = weakref.finalize(self, shutil.rmtree, str(self.base_dir), True)

    @staticmethod
    def _owner() -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PgBouncerError(
                "Running as root, but pgbouncer refuses to run as root and there is no 'postgres' OS user to run "
                "it as (the Debian package postgresql creates one)."
            ) from None
        return pw.pw_uid, pw.pw_gid

    def _write_config(self) -> None:
        auth_file = self.base_dir / "users.txt"
        auth_file.write_text(f"{_quote_ini(self.user)} {_quote_ini(self.password or '')}\n")
        auth_file.chmod(0o600)
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_file = {auth_file}",
            f"logfile = {self.log_path}",
            f"pidfile = {self.base_dir / 'pgbouncer.pid'}",
            *(f"{k} = {v}" for k, v in self.settings.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        if self._run_as is not None:
            uid, gid = self._run_as
            for path in (self.base_dir, auth_file, self.config_path):
                os.chown(path, uid, gid)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of PgBouncer's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts connections (a second port is tried if ours was taken)."""
        for attempt in range(3):
            self._write_config()
            owner: dict[str, object] = {}
            if self._run_as is not None:
                owner = {"user": self._run_as[0], "group": self._run_as[1], "extra_groups": []}
            self._proc = subprocess.Popen(
                [self.binary, str(self.config_path)],
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
                **owner,  # type: ignore[arg-type]
            )
            self._finalizer = weakref.finalize(self, _stop, self._proc.pid)
            if self._wait_ready():
                return
            self.close_process()
            if attempt < 2 and "Address already in use" in self.log_tail():
                self.port = free_port(self.host)
                continue
            raise PgBouncerError(f"pgbouncer did not start.\n--- tail of {self.log_path} ---\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return True
            time.sleep(0.05)
        return False

    def close_process(self) -> None:
        """Stop the PgBouncer process (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def close(self) -> None:
        """Stop PgBouncer and delete its directory. Idempotent."""
        self.close_process()
        self._cleanup_dir()

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url(self, dbname: str = "postgres", *, flag: str | None = "transaction") -> str:
        """SQLAlchemy URL of ``dbname`` through this PgBouncer, with ``?pgbouncer=<flag>`` (None: without)."""
        auth = quote(self.user, safe="")
        query = f"?pgbouncer={flag}" if flag else ""
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}{query}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq/psycopg connection string of ``dbname`` through this PgBouncer."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def __repr__(self) -> str:
        return f"<PgBouncer {self.host}:{self.port} -> {self.server_host}:{self.server_port} {self.pool_mode}>"
