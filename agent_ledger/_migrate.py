"""Running the shipped alembic migrations, standalone or from a host application's alembic environment.

Standalone (``agent-ledger migrate`` / ``Ledger.migrate()``) keeps its own version table,
``<prefix>alembic_version``. A host app instead adds ``migrations_path()`` to its ``version_locations``
and runs ``alembic upgrade heads``: the ledger's revisions form their own branch, labelled
``agent_ledger``. The table prefix and schema come from the alembic config attributes, else from the
main options ``agent_ledger.table_prefix`` / ``agent_ledger.schema``, else from the environment
variables ``AGENT_LEDGER_TABLE_PREFIX`` / ``AGENT_LEDGER_SCHEMA``, else the defaults.

Hash partitioning (Postgres only, see docs/scaling.md): revision 0007 creates the tables that hold
``workflow_id`` partitioned ``BY HASH (workflow_id)`` into N partitions when asked for, in the same order
of precedence: the config attribute or main option ``agent_ledger.partitions``, alembic's
``-x partitions=N``, the environment variable ``AGENT_LEDGER_PARTITIONS``. ``agent-ledger migrate
--partitions N`` and ``Ledger.migrate(partitions=N)`` set the attribute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ._schema import DEFAULT_PREFIX, Tables

__all__ = ["MAX_PARTITIONS", "alembic_dir", "check_partitions", "migrations_path", "naming", "partitions", "upgrade"]

_PREFIX = "agent_ledger.table_prefix"
_SCHEMA = "agent_ledger.schema"
_PARTITIONS = "agent_ledger.partitions"
MAX_PARTITIONS = 1024
"""The most hash partitions the migration creates per table."""


def alembic_dir() -> Path:
    """The directory holding ``env.py`` and ``versions/`` (inside the wheel, or the source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_alembic", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"agent_ledger's alembic migrations are missing next to {here}")


def migrations_path() -> str:
    """The ``versions`` directory, for a host app's ``version_locations``."""
    return str(alembic_dir() / "versions")


def naming(config: Any | None = None) -> tuple[str, str | None]:
    """(table prefix, schema) for the running migration."""
    if config is None:
        from alembic import context

        config = context.config
    attrs = getattr(config, "attributes", {})
    prefix = (
        attrs.get(_PREFIX)
        or config.get_main_option(_PREFIX)
        or os.environ.get("AGENT_LEDGER_TABLE_PREFIX")
        or DEFAULT_PREFIX
    )
    schema = attrs.get(_SCHEMA) or config.get_main_option(_SCHEMA) or os.environ.get("AGENT_LEDGER_SCHEMA")
    return prefix, schema or None


def check_partitions(value: object) -> int | None:
    """``value`` (an int or its text; None or empty: no partitioning) as a partition count, or
    ``InvalidArguments`` for anything but a whole number from 1 to ``MAX_PARTITIONS``."""
    from .errors import InvalidArguments

    if value is None or value == "":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdecimal() or not 1 <= int(text) <= MAX_PARTITIONS:
        raise InvalidArguments(f"partitions must be a whole number from 1 to {MAX_PARTITIONS}, not {str(value)[:40]!r}")
    return int(text)


def partitions(config: Any | None = None) -> int | None:
    """How many hash partitions by ``workflow_id`` the running migration creates (None: plain tables)."""
    x_args: dict[str, str] = {}
    if config is None:
        from alembic import context

        config = context.config
        x_args = context.get_x_argument(as_dictionary=True)
    attrs = getattr(config, "attributes", {})
    for value in (
        attrs.get(_PARTITIONS),
        config.get_main_option(_PARTITIONS),
        x_args.get("partitions"),
        os.environ.get("AGENT_LEDGER_PARTITIONS"),
    ):
        if value is not None and value != "":
            return check_partitions(value)
    return None


def config_for(tables: Tables, url: str | None = None) -> Any:
    """An alembic ``Config`` pointing at the shipped migrations, for these tables' prefix and schema."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    name = tables.effects.name
    cfg.attributes[_PREFIX] = name[: -len("effects")]
    cfg.attributes[_SCHEMA] = tables.effects.schema
    return cfg


def upgrade(engine: Engine, tables: Tables, revision: str = "head", partitions: int | None = None) -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (standalone mode); ``partitions``: see the
    module's docstring."""
    from alembic import command

    cfg = config_for(tables)
    if partitions is not None:
        cfg.attributes[_PARTITIONS] = check_partitions(partitions)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
