"""Migrations: the shipped alembic revisions match the tables the code declares, in every mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from agent_ledger import Ledger, SchemaMissing, ToolCall, migrations_path
from agent_ledger._migrate import alembic_dir, config_for
from agent_ledger._schema import SCHEMA_REVISION, build_tables

ROOT = Path(__file__).resolve().parents[1]


def _diff(url: str, prefix: str = "agent_ledger_", schema: str | None = None) -> list[object]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_schemas": schema is not None, "compare_type": True})
        diff = compare_metadata(ctx, build_tables(prefix, schema).metadata)
    engine.dispose()
    ours = build_tables(prefix, schema).metadata.tables
    # Only differences that concern the ledger's tables (a host app's own tables are not ours to judge,
    # nor are the partitions of a partitioned schema, whose indexes are the parent's).
    return [d for d in diff if "alembic_version" not in repr(d) and _table_of(d) in (*ours, None)]


def _table_of(d: object) -> str | None:
    """The table (``schema.name`` as in ``MetaData.tables``) a difference is about; None: unknown."""
    item = d[0] if isinstance(d, list) else d  # column changes come as a list of tuples
    if not isinstance(item, tuple) or not item:
        return None
    kind = str(item[0])
    if kind in ("add_column", "remove_column") or kind.startswith("modify_"):
        schema, name = item[1], item[2]
        return f"{schema}.{name}" if schema else str(name)
    obj = item[1]
    table = obj if isinstance(obj, sa.Table) else getattr(obj, "table", None)
    return str(table.key) if isinstance(table, sa.Table) else None


def test_schema_revision_is_the_head() -> None:
    script = ScriptDirectory.from_config(config_for(build_tables()))
    assert script.get_heads() == [SCHEMA_REVISION]
    assert Path(migrations_path()) == alembic_dir() / "versions"


def test_upgrade_head_matches_declared_tables(db_url: str) -> None:
    Ledger(db_url).migrate()
    assert _diff(db_url) == []


def test_postgres_schema_and_prefix_are_configurable(pg_url: str) -> None:
    led = Ledger(pg_url, schema="ledger", table_prefix="al_")
    led.migrate()
    assert _diff(pg_url, "al_", "ledger") == []
    assert led.run(ToolCall(workflow_id="w", tool="t", args={"x": 1}), handler=lambda x: x + 1) == 2
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ledger.al_effects")).scalar() == 1
    engine.dispose()
    led.close()


def test_postgres_without_migrations_explains_what_to_do(pg_url: str) -> None:
    led = Ledger(pg_url)
    with pytest.raises(SchemaMissing, match="agent-ledger migrate"):
        led.run(ToolCall(workflow_id="w", tool="t", args={}), handler=lambda: pytest.fail("ran"))
    led.close()


def test_sqlite_creates_its_tables_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    led = Ledger(url)
    assert led.run(ToolCall(workflow_id="w", tool="t", args={"x": 1}), handler=lambda x: x) == 1
    led.close()
    assert _diff(url) == []


def test_cli_migrate_upgrades_a_fresh_postgres(pg_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "migrate", "--url", pg_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert _diff(pg_url) == []


def test_alembic_ini_upgrades_with_env_url(pg_url: str) -> None:
    env = {**os.environ, "AGENT_LEDGER_URL": pg_url}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert _diff(pg_url) == []


def test_host_app_alembic_environment_includes_ledger_versions(pg_url: str, tmp_path: Path) -> None:
    """A host app with its own migrations adds the ledger's versions to version_locations."""
    app = tmp_path / "hostapp"
    (app / "migrations" / "versions").mkdir(parents=True)
    (app / "alembic.ini").write_text(
        textwrap.dedent(f"""\
        [alembic]
        script_location = %(here)s/migrations
        version_locations = %(here)s/migrations/versions {migrations_path()}
        sqlalchemy.url = {pg_url}
        """)
    )
    (app / "migrations" / "env.py").write_text(
        textwrap.dedent("""\
        from alembic import context
        from sqlalchemy import create_engine
        config = context.config
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        """)
    )
    (app / "migrations" / "script.py.mako").write_text("")
    (app / "migrations" / "versions" / "a1_users.py").write_text(
        textwrap.dedent("""\
        import sqlalchemy as sa
        from alembic import op
        revision = "a1"
        down_revision = None
        branch_labels = ("app",)
        depends_on = None
        def upgrade():
            op.create_table("users", sa.Column("id", sa.Integer, primary_key=True))
        def downgrade():
            op.drop_table("users")
        """)
    )
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(app / "alembic.ini"), "upgrade", "heads"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=app,
    )
    assert out.returncode == 0, out.stderr
    assert _diff(pg_url) == []
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        versions = {r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}
        assert versions == {"a1", SCHEMA_REVISION}
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0
    engine.dispose()
    led = Ledger(pg_url)  # the ledger finds its tables, whoever migrated them
    assert led.run(ToolCall(workflow_id="w", tool="t", args={"x": 2}), handler=lambda x: x * 2) == 4
    led.close()
