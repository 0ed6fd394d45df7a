"""A pytest plugin giving your own agent tests an isolated ledger.

Enable it in your ``conftest.py``::

    pytest_plugins = ["agent_ledger.testing"]

Then use the fixtures::

    def test_agent_charges_once(ledger):                 # a fresh SQLite ledger in tmp_path
        ...
        assert [r.status.value for r in ledger.history("order-1")] == ["succeeded"]

    def test_restart(ledger_factory):                    # more ledgers on the same database,
        first, second = ledger_factory(), ledger_factory()   # like two processes
        ...

Each test gets its own database file; every ledger is closed after the test. Set the environment
variable ``AGENT_LEDGER_TEST_URL`` to run the same tests on a database of your choice (for example a
Postgres test database; it is migrated on first use and not cleaned).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._ledger import Ledger

__all__ = ["ledger", "ledger_factory"]


@pytest.fixture
def ledger_factory(tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    """Make ledgers on one isolated database (keyword arguments go to ``Ledger``)."""
    url = os.environ.get("AGENT_LEDGER_TEST_URL") or f"sqlite:///{tmp_path / 'agent_ledger.db'}"
    made: list[Ledger] = []

    def make(**kwargs: Any) -> Ledger:
        kwargs.setdefault("auto_migrate", True)
        made.append(Ledger(url, **kwargs))
        return made[-1]

    yield make
    for led in made:
        led.close()


@pytest.fixture
def ledger(ledger_factory: Callable[..., Ledger]) -> Ledger:
    """A ledger on a fresh database of its own."""
    return ledger_factory()
