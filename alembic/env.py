"""Alembic environment of agent_ledger's own migrations (standalone mode).

Used by ``agent-ledger migrate`` / ``Ledger.migrate()`` and by ``alembic -c alembic.ini upgrade head``
(the URL comes from ``sqlalchemy.url`` or ``$AGENT_LEDGER_URL``, and may carry ``?pgbouncer=transaction``).
A host application does not use this file: it adds ``agent_ledger.migrations_path()`` to its own
``version_locations``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.schema import CreateSchema

from agent_ledger._migrate import naming
from agent_ledger._schema import build_tables

config = context.config
prefix, schema = naming(config)
target_metadata = build_tables(prefix, schema).metadata
version_table = f"{prefix}alembic_version"


def _run(connection: Connection) -> None:
    if schema and connection.dialect.name == "postgresql":
        # The version table lives in the schema too, so it must exist before alembic starts.
        connection.execute(CreateSchema(schema, if_not_exists=True))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        version_table_schema=schema,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("AGENT_LEDGER_URL")
    if not url:
        raise SystemExit("set sqlalchemy.url in alembic.ini or AGENT_LEDGER_URL")
    from agent_ledger._pooling import Pooling
    from agent_ledger._runtime import normalise_url, pooling_mode

    dialect, sync_url, _ = normalise_url(url)  # ?pgbouncer= is checked and taken out of the URL
    engine = create_engine(sync_url)
    Pooling(pooling_mode(url), dialect).install(engine)  # no prepared statements behind a transaction pooler
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or os.environ.get("AGENT_LEDGER_URL"),
        target_metadata=target_metadata,
        version_table=version_table,
        version_table_schema=schema,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
