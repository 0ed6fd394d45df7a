"""The public API: every public name is exported, documented and typed."""

from __future__ import annotations

import inspect
from pathlib import Path

import agent_ledger
from agent_ledger import errors


def test_all_lists_every_public_name() -> None:
    public = {n for n in dir(agent_ledger) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(agent_ledger, n))}
    assert set(agent_ledger.__all__) == (public - modules) | {"__version__"}


def test_contract_names_exist() -> None:
    for name in (
        "Ledger",
        "ToolCall",
        "Effect",
        "LedgerError",
        "PayloadMismatch",
        "NoWorkflow",
        "InvalidArguments",
        "ResultNotReplayable",
        "InProgress",
        "OutcomeUnknown",
    ):
        assert name in agent_ledger.__all__
    for name in errors.__all__:
        assert getattr(agent_ledger, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), errors.LedgerError)
        assert name in (errors.__doc__ or ""), f"{name} missing from the tree in errors' docstring"


def test_public_names_have_docstrings() -> None:
    for name in agent_ledger.__all__:
        obj = getattr(agent_ledger, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
    for name, member in inspect.getmembers(agent_ledger.Ledger):
        if not name.startswith("_") and callable(member):
            assert member.__doc__, f"Ledger.{name}"


def test_package_is_typed() -> None:
    assert (Path(agent_ledger.__file__).parent / "py.typed").is_file()
