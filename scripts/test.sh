#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]   (paths relative to the repo root)
#
# The Postgres tests start their own throwaway server (tests/_pgserver.py) on a free
# port of 127.0.0.1, so only the PostgreSQL server binaries are needed; no running
# server, no configuration. The same goes for PgBouncer (tests/_pgbouncer.py).  To use an existing server instead pass
# --postgresql-port=PORT (and --postgresql-host/--postgresql-user/--postgresql-password).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

have_pg_binaries() {
    if [ -n "${AGENT_LEDGER_PG_BIN:-}" ]; then
        [ -x "$AGENT_LEDGER_PG_BIN/pg_ctl" ] && return 0
        echo "scripts/test.sh: AGENT_LEDGER_PG_BIN=$AGENT_LEDGER_PG_BIN has no pg_ctl" >&2
        exit 1
    fi
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null && return 0
    command -v pg_ctl >/dev/null 2>&1 && return 0
    # pg_config alone (e.g. from libpq-dev) is not enough: its bindir must hold the server.
    if command -v pg_config >/dev/null 2>&1; then
        local bindir
        bindir=$(pg_config --bindir 2>/dev/null || true)
        [ -n "$bindir" ] && [ -x "$bindir/pg_ctl" ] && return 0
    fi
    return 1
}

if ! have_pg_binaries; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: PostgreSQL server binaries not found; installing the Debian package postgresql" >&2
        # We start our own clusters, so tell Debian's postgresql-common not to create
        # (and auto-start) its default 'main' cluster on port 5432.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/agent-ledger-tests.conf
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q postgresql </dev/null
        have_pg_binaries || { echo "scripts/test.sh: postgresql installed but pg_ctl still not found" >&2; exit 1; }
    else
        cat >&2 <<'MSG'
scripts/test.sh: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found.
Install them, e.g. on Debian/Ubuntu: sudo apt-get install -y postgresql
(or set AGENT_LEDGER_PG_BIN to a directory holding initdb, pg_ctl and postgres).
MSG
        exit 1
    fi
fi

# PgBouncer: tests marked pgbouncer (tests/_pgbouncer.py) run Postgres tests through a throwaway
# pgbouncer in transaction pooling mode as well. Debian puts it in /usr/sbin.
have_pgbouncer() {
    if [ -n "${AGENT_LEDGER_PGBOUNCER:-}" ]; then
        [ -x "$AGENT_LEDGER_PGBOUNCER" ] && return 0
        echo "scripts/test.sh: AGENT_LEDGER_PGBOUNCER=$AGENT_LEDGER_PGBOUNCER is not executable" >&2
        exit 1
    fi
    command -v pgbouncer >/dev/null 2>&1 && return 0
    [ -x /usr/sbin/pgbouncer ] || [ -x /usr/local/sbin/pgbouncer ]
}

if ! have_pgbouncer; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: pgbouncer not found; installing the Debian package pgbouncer" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        # The tests start their own pgbouncer on a free port; the package's service is not used.
        apt-get install -y -q pgbouncer </dev/null
        have_pgbouncer || { echo "scripts/test.sh: pgbouncer installed but not found" >&2; exit 1; }
    else
        cat >&2 <<'MSG'
scripts/test.sh: pgbouncer not found (the PgBouncer tests need it).
Install it, e.g. on Debian/Ubuntu: sudo apt-get install -y pgbouncer
(or set AGENT_LEDGER_PGBOUNCER to the pgbouncer binary).
MSG
        exit 1
    fi
fi

# As root, initdb/pg_ctl are run as the 'postgres' OS user, which the Debian package creates.
if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
fi

# The console's browser tests drive Debian's headless Chromium through its matching chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: chromium or chromedriver not found; installing the Debian packages chromium and chromium-driver" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q chromium chromium-driver </dev/null
    else
        echo "scripts/test.sh: chromium and chromium-driver are not installed: the browser tests will be skipped" >&2
        echo "(on Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver)" >&2
    fi
fi

# The interpreter that has the package installed: python in a venv, else python3.
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
"$PYTHON" -m pytest "$@"

# Then the tests that use Postgres again, on the schema hash-partitioned by workflow_id (every unique
# key must hold the partition column: the constraint a sharded Postgres such as Citus imposes; see
# docs/scaling.md). Only the tests marked `postgres` (tests/conftest.py): the documentation blocks and
# the SQLite tests are not run twice. Set AGENT_LEDGER_SKIP_PARTITIONED=1 to skip this pass.
if [ -z "${AGENT_LEDGER_SKIP_PARTITIONED:-}" ]; then
    echo "scripts/test.sh: the Postgres tests again, on the partitioned schema (--pg-partitions 4)" >&2
    exec "$PYTHON" -m pytest -m postgres --pg-partitions 4 "$@"
fi
