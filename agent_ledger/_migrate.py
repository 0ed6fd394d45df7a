"""Running the shipped alembic migrations, standalone or from a host application's alembic environment.

Standalone (``agent-ledger migrate`` / ``Ledger.migrate()``) keeps its own version table,
``<prefix>alembic_version``. A host app instead adds ``migrations_path()`` to its ``version_locations``
and runs ``alembic upgrade heads``: the ledger's revisions form their own branch, labelled
``agent_ledger``. The table prefix and schema come from the alembic config attributes, else from the
main options ``agent_ledger.table_prefix`` / ``agent_ledger.schema``, else from the environment
variables ``AGENT_LEDGER_TABLE_PREFIX`` / ``AGENT_LEDGER_SCHEMA``, else the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ._schema import DEFAULT_PREFIX, Tables

__all__ = ["alembic_dir", "migrations_path", "naming", "upgrade"]

_PREFIX = "agent_ledger.table_prefix"
_SCHEMA = "agent_ledger.schema"


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


def upgrade(engine: Engine, tables: Tables, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (standalone mode)."""
    from alembic import command

    cfg = config_for(tables)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
