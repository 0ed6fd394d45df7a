"""Client instructions per call, counted by valgrind's callgrind: a measure that does not depend on the
machine's load (the wall-clock ratios of run.py move by 20% on a busy 2-core machine).

For each path it runs a probe twice under callgrind, with a small and a large number of calls, and
divides the difference in instructions (every thread of the client process: the replay-record flusher
included) by the difference in calls, so start-up, imports and warm-up cancel out. The database server is
another process and is not counted: its side of a call is what ``run.py``'s cost section measures (round
trips, WAL bytes).

    python benchmarks/instructions.py [--pg-url URL] [--paths floor-new,ledger-new,...]

Needs ``valgrind`` (Debian: ``apt-get install valgrind``). A path takes about a minute. To compare with
another version of the library, point ``PYTHONPATH`` at its checkout (the probes use only ``Ledger``,
``ToolCall`` and ``run``; use a separate database per version, their schemas differ).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATHS = ("floor-new", "ledger-new", "floor-replay", "ledger-replay", "sqlite-new", "sqlite-replay")
SMALL, LARGE = 200, 1200
KEYS = 1200
FLUSH_EVERY = 500
"""Replay records are written every ``FLUSH_EVERY`` replays (a real run at a few thousand replays a
second writes a batch of that size every half second; under callgrind, 50 times slower, the timer would
write batches far smaller than any real run's)."""


def probe(path: str, n: int, pg_url: str, sqlite_url: str) -> None:
    """The measured process: warm up, then make ``n`` calls of ``path``."""
    from agent_ledger import _runtime

    init = _runtime._ReplayBuffer.__init__

    def no_timer(self: object, rt: object, interval: float = 0.5, limit: int = 10_000, **kw: float) -> None:
        init(self, rt, interval=1e9, limit=limit, **kw)  # type: ignore[arg-type]

    _runtime._ReplayBuffer.__init__ = no_timer  # type: ignore[method-assign]
    url = sqlite_url if path.startswith("sqlite") else pg_url
    sys.path.insert(0, str(HERE))
    import run as bench  # a sibling script (it imports only what every version of the library has)

    if path.startswith("floor"):
        new, replay, close = bench.floor_pg_sync(bench.floor_conninfo(url), "agent_ledger_effects")
    else:
        new, replay, close = bench.ledger_sync(url)
    for i in range(50):  # warm: connections open, statements prepared
        new(i)
        replay(i)
    base = 1000
    if path.endswith("replay"):
        for i in range(KEYS):
            new(base + i)
        for i in range(n):
            replay(base + i)
            if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                for rt in list(_runtime._live):
                    rt.flush()
    else:
        for i in range(n):
            new(base + i)
    close()


def count(path: str, n: int, pg_url: str, sqlite_url: str, tmp: str) -> int:
    out = Path(tmp) / f"{path}.{n}.callgrind"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--probe",
            path,
            str(n),
            pg_url,
            sqlite_url,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    found = re.search(r"^(?:totals|summary): (\d+)", out.read_text(errors="replace"), re.M)
    if found is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(found.group(1))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", help="an existing Postgres (default: start a throwaway server)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)}")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}")
    server = None
    pg_url = args.pg_url
    if pg_url is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from _pgserver import PgServer

        server = PgServer()
        server.start()
        pg_url = server.url("postgres")
    tmp = tempfile.mkdtemp(prefix="agent-ledger-callgrind-")
    sqlite_url = f"sqlite:///{tmp}/{uuid.uuid4().hex}.db"
    try:
        from agent_ledger import Ledger

        Ledger(pg_url).migrate()
        Ledger(sqlite_url).migrate()
        env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} cpus"
        print(f"client instructions per call (callgrind; {LARGE} - {SMALL} calls; {env_note})")
        for path in paths:
            small = count(path, SMALL, pg_url, sqlite_url, tmp)
            large = count(path, LARGE, pg_url, sqlite_url, tmp)
            print(f"  {path:14} {(large - small) / (LARGE - SMALL) / 1000:8.1f}k", flush=True)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.close()


if __name__ == "__main__":
    raise SystemExit(main())
