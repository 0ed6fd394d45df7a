"""A throwaway PostgreSQL server for the test suite.

``PgServer`` initdb's a fresh cluster in a temporary directory, starts it on a free
TCP port on 127.0.0.1 (trust auth, superuser ``postgres``) and can stop, restart
(same port, same data: a Postgres outage) and kill it (a crash).  Durability stays
ON (``fsync=on``, ``synchronous_commit=on``) because the library's crash guarantees
are tested against it.

``initdb`` and ``pg_ctl`` refuse to run as root, so when we are root they run as the
``postgres`` OS user (``runuser -u postgres --``) on a directory that user owns.

The PostgreSQL binaries are looked up in this order: ``$AGENT_LEDGER_PG_BIN``,
``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin``, then ``PATH``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["PgServer", "PgServerError", "find_pg_bin_dir"]

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_INSTALL_HINT = (
    "Install PostgreSQL: on Debian/Ubuntu run `apt-get update && apt-get install -y postgresql` "
    "(scripts/test.sh does this automatically when run as root), or point AGENT_LEDGER_PG_BIN "
    "at a directory containing initdb, pg_ctl and postgres."
)


class PgServerError(RuntimeError):
    """The throwaway PostgreSQL server could not be found, initialised, started or stopped."""


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); "9.6" -> (9, 6); non-numeric sorts first.
    name = Path(path).parent.name
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def find_pg_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises PgServerError naming what was tried and how to install PostgreSQL.
    """
    tried: list[str] = []

    env_dir = os.environ.get("AGENT_LEDGER_PG_BIN")
    if env_dir:
        path = Path(env_dir)
        if _has_binaries(path):
            return path
        # An explicit setting that is wrong is an error, not something to silently skip.
        raise PgServerError(
            f"AGENT_LEDGER_PG_BIN={env_dir!r} does not contain executable {', '.join(_REQUIRED_BINARIES)}."
        )

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"`pg_config --bindir` failed ({exc})")
        else:
            # Debian's pg_config (libpq-dev) may report a bindir whose server package is absent.
            if out and _has_binaries(Path(out)):
                return Path(out)
            tried.append(f"`pg_config --bindir` -> {out!r} (no server binaries there)")
    else:
        tried.append("pg_config (not on PATH)")

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_binaries(Path(candidate)):
            return Path(candidate)
    tried.append(f"/usr/lib/postgresql/*/bin ({', '.join(candidates) or 'none'})")

    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        real_dir = Path(os.path.realpath(pg_ctl)).parent
        for candidate_dir in (real_dir, Path(pg_ctl).parent):
            if _has_binaries(candidate_dir):
                return candidate_dir
        tried.append(f"PATH (pg_ctl at {pg_ctl}, but no initdb/postgres beside it)")
    else:
        tried.append("PATH (no pg_ctl)")

    raise PgServerError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found. Tried: "
        + "; ".join(tried)
        + ". "
        + _INSTALL_HINT
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _world_traversable(path: Path) -> bool:
    """Whether every directory from / down to ``path`` can be traversed by any user."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _cleanup(base_dir: str, data_dir: str, pg_ctl: str, run_prefix: list[str]) -> None:
    """Finalizer: stop the server if still running (immediate) and remove its directory."""
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [*run_prefix, pg_ctl, "-D", data_dir, "-m", "immediate", "-w", "-t", "30", "stop"],
                cwd=base_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
    shutil.rmtree(base_dir, ignore_errors=True)


class PgServer:
    """A throwaway PostgreSQL cluster listening on 127.0.0.1.

    >>> server = PgServer()
    >>> server.start()
    >>> url = server.url("postgres")   # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
    >>> server.restart()               # outage: stop, start again on the same port and data
    >>> server.close()                 # stop for good and delete the temp dir

    Also usable as a context manager (``with PgServer() as server: ...``), which starts
    it on entry and closes it on exit.
    """

    host: str
    port: int
    user: str

    def __init__(
        self,
        *,
        port: int | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        extra_options: Sequence[str] = (),
        start_timeout: int = 60,
    ) -> None:
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_pg_bin_dir()
        if not _has_binaries(self.bin_dir):
            raise PgServerError(f"{self.bin_dir} lacks one of {', '.join(_REQUIRED_BINARIES)}. {_INSTALL_HINT}")
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port(self.host)
        self.extra_options = list(extra_options)
        self.start_timeout = start_timeout

        self._run_prefix, self._run_as = self._privilege_drop()

        tmp_root = tempfile.gettempdir()
        if self._run_as is not None and not _world_traversable(Path(tmp_root)):
            tmp_root = "/tmp"  # the postgres user must be able to reach its data dir
        self.base_dir = Path(tempfile.mkdtemp(prefix="agent_ledger_pg_", dir=tmp_root))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgresql.log"
        self.socket_dir.mkdir()
        self.log_path.touch()
        if self._run_as is not None:
            uid, gid = self._run_as
            for path in (self.base_dir, self.socket_dir, self.log_path):
                os.chown(path, uid, gid)

        self._initialized = False
        self._closed = False
        # Safety net: if close() is never called (crash of the test process, forgotten
        # close in a test), stop the server and remove the directory at interpreter exit.
        self._finalizer = weakref.finalize(
            self,
            _cleanup,
            str(self.base_dir),
            str(self.data_dir),
            str(self.bin_dir / "pg_ctl"),
            list(self._run_prefix),
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _privilege_drop() -> tuple[list[str], tuple[int, int] | None]:
        """Command prefix (and uid/gid) to run initdb/pg_ctl as ``postgres`` when we are root."""
        if os.geteuid() != 0:
            return [], None
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PgServerError(
                "Running as root, but initdb/pg_ctl refuse to run as root and there is no 'postgres' "
                "OS user to run them as. Install the Debian package postgresql (it creates that user) "
                "or create it with `useradd --system postgres`."
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PgServerError("Running as root, but `runuser` (util-linux) is not available.")
        return [runuser, "-u", "postgres", "--"], (pw.pw_uid, pw.pw_gid)

    def _env(self) -> dict[str, str]:
        # Drop PG* variables (PGDATA, PGPORT, PGHOST, ...) that could redirect pg_ctl.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def _run(self, args: Sequence[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self._run_prefix, *args]
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.base_dir,  # postgres may not be allowed into our cwd
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgServerError(f"`{shlex.join(cmd)}` timed out after {timeout}s.\n{self._log_excerpt()}") from exc
        if check and proc.returncode != 0:
            raise PgServerError(
                f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}.\n"
                f"stdout:\n{proc.stdout.strip()}\nstderr:\n{proc.stderr.strip()}\n{self._log_excerpt()}"
            )
        return proc

    def _pg_ctl(self) -> str:
        return str(self.bin_dir / "pg_ctl")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_excerpt(self) -> str:
        tail = self.log_tail()
        return f"--- tail of {self.log_path} ---\n{tail}" if tail else f"(server log {self.log_path} is empty)"

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    # ------------------------------------------------------------------ lifecycle

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", self.user,
                "-A", "trust",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=180,
        )  # fmt: skip
        self._initialized = True

    def _server_options(self) -> str:
        opts = [
            "-c", f"listen_addresses={self.host}",
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "max_connections=200",
            *self.extra_options,
        ]  # fmt: skip
        # pg_ctl hands -o to /bin/sh, so quote each word.
        return " ".join(shlex.quote(o) for o in opts)

    def is_running(self) -> bool:
        """Whether ``pg_ctl status`` reports a running server for our data dir."""
        if not self._initialized or self._closed:
            return False
        return self._run([self._pg_ctl(), "-D", str(self.data_dir), "status"], timeout=30, check=False).returncode == 0

    def start(self) -> None:
        """initdb on first use, then start the server and wait until it accepts connections."""
        if self._closed:
            raise PgServerError("this PgServer was closed; create a new one")
        if not self._initialized:
            self._initdb()
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            try:
                self._pg_ctl_start()
                return
            except PgServerError:
                port_taken = "Address already in use" in self.log_tail(20)
                if attempt + 1 < attempts and port_taken:
                    # Lost the race for the port we picked: try another one.
                    self.port = free_port(self.host)
                    continue
                raise

    def _pg_ctl_start(self) -> None:
        self._run(
            [
                self._pg_ctl(),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w",
                "-t", str(self.start_timeout),
                "-o", self._server_options(),
                "start",
            ],
            timeout=self.start_timeout + 30,
        )  # fmt: skip
        # Once the server has run on this port, later starts (restart) must keep it.
        self._port_fixed = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``) and wait for it; keeps the data."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"invalid pg_ctl stop mode {mode!r}")
        if not self.is_running():
            return
        self._run([self._pg_ctl(), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"], timeout=90)

    def restart(self, mode: str = "fast") -> None:
        """Stop, then start again on the same port and data dir (simulates a Postgres outage)."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and all its children (no shutdown checkpoint).

        The data dir is kept; ``start()`` afterwards runs crash recovery.
        """
        pid = self._postmaster_pid()
        if pid is None:
            return
        victims = [pid, *self._children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        for victim in victims:
            while _pid_alive(victim) and time.monotonic() < deadline:
                time.sleep(0.05)
        if any(_pid_alive(victim) for victim in victims):
            raise PgServerError(f"postgres processes {victims} survived SIGKILL.\n{self._log_excerpt()}")
        if _pid_exists(pid):
            # Dead but unreaped (a zombie: the postmaster is orphaned when pg_ctl exits, and
            # PID 1 of a container may never reap it). The next postmaster would see that PID
            # in postmaster.pid and in the socket lock file as alive and refuse to start, so
            # remove those lock files (all our postgres processes are dead).
            lock_files = [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*")]
            for lock_file in lock_files:
                with contextlib.suppress(FileNotFoundError):
                    lock_file.unlink()

    @staticmethod
    def _children(ppid: int) -> list[int]:
        children: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 1 and fields[1] == str(ppid):
                children.append(int(entry.name))
        return children

    def close(self) -> None:
        """Stop for good (fast, falling back to kill) and delete the temp dir. Idempotent."""
        if self._closed:
            return
        try:
            if self._initialized:
                try:
                    self.stop("fast")
                except PgServerError:
                    self.kill()
        finally:
            self._closed = True
            self._finalizer()  # removes base_dir (and stops the server if still somehow up)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ addresses

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL, e.g. ``postgresql+psycopg://postgres@127.0.0.1:PORT/dbname``."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq/psycopg connection string."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def __repr__(self) -> str:
        return f"<PgServer {self.host}:{self.port} data={self.data_dir} bin={self.bin_dir}>"


def _pid_exists(pid: int) -> bool:
    """Whether ``pid`` exists at all (zombies included), as ``kill(pid, 0)`` sees it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _pid_exists(pid)
    return state != "Z"
