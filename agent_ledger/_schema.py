"""SQLAlchemy Core tables: the one source of the schema, for queries and for the migration test.

Table names carry a configurable prefix (default ``agent_ledger_``) and may live in a Postgres schema,
so the ledger can share a host application's database.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from .errors import InvalidArguments

__all__ = ["DEFAULT_PREFIX", "SCHEMA_REVISION", "Tables", "UTCDateTime", "build_tables", "json_type"]

DEFAULT_PREFIX = "agent_ledger_"
SCHEMA_REVISION = "0007"
"""The alembic revision these tables correspond to (a test checks it is the head)."""


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise InvalidArguments("agent_ledger stores aware datetimes only")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


def json_type() -> Any:
    """JSON on SQLite, JSONB on Postgres; Python ``None`` is stored as JSON ``null``."""
    return JSON(none_as_null=False).with_variant(JSONB(none_as_null=False), "postgresql")


@dataclass(frozen=True)
class Tables:
    """The ledger's tables for one prefix/schema."""

    metadata: MetaData
    effects: Table
    events: Table
    approvals: Table
    inbound: Table
    votes: Table
    usage: Table


def build_tables(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> Tables:
    """Declare the ledger's tables with the given name prefix, in the given schema (Postgres only)."""
    md = MetaData(schema=schema)
    effects = Table(
        f"{prefix}effects",
        md,
        # Shard-ready: every primary and unique key holds workflow_id (the distribution column of a
        # sharded Postgres, the partition key of the partitioned schema; see docs/scaling.md). The key
        # determines its workflow, so (key, workflow_id) is as unique as the key; key first, so that a
        # key-only lookup still probes the index.
        Column("key", String(80), primary_key=True),
        Column("workflow_id", String(255), primary_key=True),
        Column("tool", String(255), nullable=False),
        Column("status", String(16), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("payload_hash", String(80), nullable=False),
        Column("args", json_type(), nullable=False),
        Column("result", json_type(), nullable=True),
        Column("result_replayable", Boolean, nullable=True),
        Column("result_repr", Text, nullable=True),
        Column("error", json_type(), nullable=True),
        Column("owner", String(255), nullable=True),
        Column("lease_expires_at", UTCDateTime(), nullable=True),
        Column("created_at", UTCDateTime(), nullable=False),
        Column("started_at", UTCDateTime(), nullable=True),
        Column("finished_at", UTCDateTime(), nullable=True),
        Column("retain_until", UTCDateTime(), nullable=True),
        Index(f"ix_{prefix}effects_workflow", "workflow_id", "created_at"),
        Index(f"ix_{prefix}effects_retention", "retain_until"),
        Index(f"ix_{prefix}effects_status_lease", "status", "lease_expires_at"),
    )
    events = Table(
        f"{prefix}events",
        md,
        # Postgres: primary key (id, workflow_id). SQLite keeps ``id`` alone (its rowid: SQLite numbers
        # only a single-column INTEGER PRIMARY KEY, and a SQLite file is never sharded).
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("key", String(80), nullable=False),
        Column("workflow_id", String(255), primary_key=True),
        Column("tool", String(255), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("attempt", Integer, nullable=True),
        Column("owner", String(255), nullable=True),
        Column("at", UTCDateTime(), nullable=False),
        Column("detail", json_type(), nullable=True),
        Index(f"ix_{prefix}events_key", "key", "id"),
        Index(f"ix_{prefix}events_workflow", "workflow_id", "at"),
    )
    approvals = Table(
        f"{prefix}approvals",
        md,
        Column("id", String(40), primary_key=True),
        Column("key", String(80), nullable=False),
        Column("workflow_id", String(255), primary_key=True),
        Column("tool", String(255), nullable=False),
        Column("payload_hash", String(80), nullable=False),
        Column("args", json_type(), nullable=False),
        Column("status", String(16), nullable=False),
        Column("approvers", json_type(), nullable=True),
        Column("requested_at", UTCDateTime(), nullable=False),
        Column("expires_at", UTCDateTime(), nullable=False),
        Column("decided_at", UTCDateTime(), nullable=True),
        Column("decided_by", String(255), nullable=True),
        Column("reason", Text, nullable=True),
        Column("consumed_at", UTCDateTime(), nullable=True),
        Column("channel_state", json_type(), nullable=True),
        Column("quorum", Integer, nullable=False, server_default=text("1")),
        Column("approved_count", Integer, nullable=False, server_default=text("0")),
        Column("approved_by", json_type(), nullable=True),
        Column("requested_by", String(255), nullable=True),
        Index(f"ix_{prefix}approvals_key", "key", "payload_hash", "requested_at"),
        Index(f"ix_{prefix}approvals_status", "status", "expires_at"),
        # At most one open request per payload: concurrent first calls share it.
        Index(
            f"ux_{prefix}approvals_pending",
            "key",
            "payload_hash",
            "workflow_id",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
    )
    inbound = Table(
        f"{prefix}inbound",
        md,
        # Message ids of signed inbound decisions already processed: a replayed id is refused.
        # Not a workflow's: keyed (and distributed, on a sharded Postgres) by its own id; see
        # docs/scaling.md.
        Column("message_id", String(255), primary_key=True),
        Column("source", String(32), nullable=False),
        Column("received_at", UTCDateTime(), nullable=False),
    )
    votes = Table(
        f"{prefix}approval_votes",
        md,
        # One row per vote; the unique key makes "the same person twice" impossible, whatever the race.
        # Postgres: primary key (id, workflow_id), SQLite: id (as for events). workflow_id is the
        # request's (the approval id determines it).
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("workflow_id", String(255), primary_key=True),
        Column("approval_id", String(40), nullable=False),
        Column("approver", String(255), nullable=False),
        Column("decision", String(16), nullable=False),
        Column("reason", Text, nullable=True),
        Column("at", UTCDateTime(), nullable=False),
        UniqueConstraint("approval_id", "approver", "workflow_id", name=f"uq_{prefix}approval_votes_approver"),
    )
    usage = Table(
        f"{prefix}usage",
        md,
        # One row per budget and fixed window: what a declared Limit's scope used (agent_ledger._limits).
        # Self-contained: a limit removed from code leaves rows nothing reads.
        Column("name", String(255), primary_key=True),
        Column("scope", String(255), primary_key=True),
        Column("window_start", UTCDateTime(), primary_key=True),
        Column("window_end", UTCDateTime(), nullable=True),
        Column("used", Double(), nullable=False),
        Column("cap", Double(), nullable=False),
        Column("per", String(16), nullable=False),
        Column("tool", String(255), nullable=True),
        Column("updated_at", UTCDateTime(), nullable=False),
    )
    return Tables(md, effects, events, approvals, inbound, votes, usage)
