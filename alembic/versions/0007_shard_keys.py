"""Shard-ready keys: every primary and unique key of a workflow's rows holds ``workflow_id``.

effects (key, workflow_id); events (id, workflow_id); approvals (id, workflow_id) and the one-open-
request index (key, payload_hash, workflow_id); approval_votes gets the request's ``workflow_id``
(filled from its approval), primary key (id, workflow_id), one vote per (approval_id, approver,
workflow_id). The key (and an approval's id) already determines its workflow, so nothing that was
unique stops being unique. On SQLite, events and approval_votes keep ``id`` alone as their primary key:
it is their rowid, the only column SQLite numbers itself, and a SQLite file is never sharded.

With partitions (``-x partitions=N``, ``agent-ledger migrate --partitions N``, see
``agent_ledger._migrate``; Postgres only) those four tables are then rebuilt ``PARTITION BY HASH
(workflow_id)`` into N partitions ``<table>_p0`` .. ``<table>_p<N-1>``, rows included. The inbound ids
are not a workflow's and stay one plain table. The limits' usage table (revision 0006), whose key is
(name, scope, window_start), is partitioned ``BY HASH (scope)`` with the same modulus: a per-workflow
budget's scope is its workflow id, so its row lands in the partition number of its workflow's rows.
Downgrade rebuilds plain tables first, then restores the keys of the revision before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import warnings

import sqlalchemy as sa
from alembic import op

from agent_ledger._migrate import naming, partitions

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# table suffix -> (primary key before, primary key after)
_KEYS = {
    "effects": (["key"], ["key", "workflow_id"]),
    "events": (["id"], ["id", "workflow_id"]),
    "approvals": (["id"], ["id", "workflow_id"]),
    "approval_votes": (["id"], ["id", "workflow_id"]),
}


def _q(name: str, schema: str | None) -> str:
    prep = sa.sql.compiler.IdentifierPreparer(op.get_bind().dialect)
    return f"{prep.quote_schema(schema)}.{prep.quote(name)}" if schema else prep.quote(name)


def _set_primary_key(table: str, schema: str | None, columns: list[str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        if columns[0] == "id" and table.endswith(("events", "approval_votes")):
            return  # the rowid stays the key (see the docstring)
        with warnings.catch_warnings():
            # The batch copy is reflected with the old key, then given the new one: what is asked for.
            warnings.filterwarnings("ignore", r"Table '_alembic_tmp_.*primary_key", sa.exc.SAWarning)
            with op.batch_alter_table(table, schema=schema, recreate="always") as batch:
                batch.create_primary_key(f"pk_{table}", columns)
        return
    old = sa.inspect(bind).get_pk_constraint(table, schema=schema)
    if old.get("name"):
        op.drop_constraint(old["name"], table, schema=schema, type_="primary")
    op.create_primary_key(f"{table}_pkey", table, columns, schema=schema)


def _pending_index(prefix: str, schema: str | None, columns: list[str]) -> None:
    table = f"{prefix}approvals"
    op.drop_index(f"ux_{prefix}approvals_pending", table, schema=schema)
    op.create_index(
        f"ux_{prefix}approvals_pending",
        table,
        columns,
        unique=True,
        schema=schema,
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def _is_partitioned(table: str, schema: str | None) -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    found = bind.execute(
        sa.text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(:t)"),
        {"t": _q(table, schema)},
    ).first()
    return found is not None


def _rebuild(table: str, schema: str | None, n: int | None, column: str = "workflow_id") -> None:
    """Postgres: rebuild ``table`` with its columns, keys, indexes and rows, partitioned by hash of
    ``column`` into ``n`` partitions (None: one plain table). The new table takes over the old one's
    names and its id sequence."""
    bind = op.get_bind()
    insp = sa.inspect(bind)
    old = sa.Table(table, sa.MetaData(), schema=schema, autoload_with=bind)
    pk = insp.get_pk_constraint(table, schema=schema)
    uniques = insp.get_unique_constraints(table, schema=schema)
    indexes = [ix for ix in insp.get_indexes(table, schema=schema) if not ix.get("duplicates_constraint")]
    serial = {
        c.name: bind.execute(
            sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": _q(table, schema), "c": c.name}
        ).scalar()
        for c in old.columns
        if c.server_default is not None and "nextval" in str(getattr(c.server_default, "arg", ""))
    }
    moved = f"{table}_pre0007"
    # Free the names the new table takes: the old one's indexes and constraints go (its rows stay).
    for ix in indexes:
        op.drop_index(ix["name"], table, schema=schema)
    for uq in uniques:
        op.drop_constraint(uq["name"], table, schema=schema, type_="unique")
    op.drop_constraint(pk["name"], table, schema=schema, type_="primary")
    op.rename_table(table, moved, schema=schema)
    kwargs = {"postgresql_partition_by": f"HASH ({column})"} if n else {}
    new = sa.Table(
        table,
        sa.MetaData(),
        *(c._copy() for c in old.columns),
        sa.PrimaryKeyConstraint(*pk["constrained_columns"], name=pk["name"]),
        *(sa.UniqueConstraint(*uq["column_names"], name=uq["name"]) for uq in uniques),
        schema=schema,
        **kwargs,
    )
    for c in new.columns:
        c.autoincrement = False  # the copied server default (the old sequence) numbers the rows
    new.create(bind)
    for i in range(n or 0):
        op.execute(
            f"CREATE TABLE {_q(f'{table}_p{i}', schema)} PARTITION OF {_q(table, schema)} "
            f"FOR VALUES WITH (MODULUS {n}, REMAINDER {i})"
        )
    for ix in indexes:
        where = (ix.get("dialect_options") or {}).get("postgresql_where")
        op.create_index(
            ix["name"],
            table,
            ix["column_names"],
            unique=bool(ix["unique"]),
            schema=schema,
            postgresql_where=sa.text(where) if where else None,
        )
    names = ", ".join(sa.sql.compiler.IdentifierPreparer(bind.dialect).quote(c.name) for c in old.columns)
    op.execute(f"INSERT INTO {_q(table, schema)} ({names}) SELECT {names} FROM {_q(moved, schema)}")
    for column, sequence in serial.items():
        if sequence:
            op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {_q(table, schema)}.{column}")
    op.drop_table(moved, schema=schema)


def upgrade() -> None:
    prefix, schema = naming()
    n = partitions()
    bind = op.get_bind()
    votes = f"{prefix}approval_votes"
    with op.batch_alter_table(votes, schema=schema) as batch:
        batch.add_column(sa.Column("workflow_id", sa.String(255), nullable=True))
    ap, vt = _q(f"{prefix}approvals", schema), _q(votes, schema)
    # A vote whose request is gone (none should be: prune deletes both) keeps an empty workflow id.
    op.execute(
        f"UPDATE {vt} SET workflow_id = coalesce((SELECT a.workflow_id FROM {ap} a WHERE a.id = {vt}.approval_id), '')"
    )
    with op.batch_alter_table(votes, schema=schema) as batch:
        batch.alter_column("workflow_id", existing_type=sa.String(255), nullable=False)
        batch.drop_constraint(f"uq_{prefix}approval_votes_approver", type_="unique")
        batch.create_unique_constraint(
            f"uq_{prefix}approval_votes_approver", ["approval_id", "approver", "workflow_id"]
        )
    for suffix, (_before, after) in _KEYS.items():
        _set_primary_key(f"{prefix}{suffix}", schema, after)
    _pending_index(prefix, schema, ["key", "payload_hash", "workflow_id"])
    if n and bind.dialect.name == "postgresql":
        for suffix in _KEYS:
            _rebuild(f"{prefix}{suffix}", schema, n)
        if sa.inspect(bind).has_table(f"{prefix}usage", schema=schema):
            _rebuild(f"{prefix}usage", schema, n, "scope")


def downgrade() -> None:
    prefix, schema = naming()
    for suffix in (*_KEYS, "usage"):
        if _is_partitioned(f"{prefix}{suffix}", schema):
            _rebuild(f"{prefix}{suffix}", schema, None)
    _pending_index(prefix, schema, ["key", "payload_hash"])
    for suffix, (before, _after) in _KEYS.items():
        _set_primary_key(f"{prefix}{suffix}", schema, before)
    votes = f"{prefix}approval_votes"
    with op.batch_alter_table(votes, schema=schema) as batch:
        batch.drop_constraint(f"uq_{prefix}approval_votes_approver", type_="unique")
        batch.create_unique_constraint(f"uq_{prefix}approval_votes_approver", ["approval_id", "approver"])
        batch.drop_column("workflow_id")
