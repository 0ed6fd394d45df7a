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


def _library_modules() -> list[object]:
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.walk_packages(agent_ledger.__path__, "agent_ledger."):
        if info.name.endswith("__main__") or info.name.startswith("agent_ledger._alembic"):
            continue
        found.append(importlib.import_module(info.name))
    return found


def test_every_exception_class_is_a_ledger_error_in_the_tree() -> None:
    """Every public exception class in the package (channels included) is a LedgerError drawn in the
    tree of errors' docstring, under its real base."""
    seen: dict[str, type[BaseException]] = {}
    for module in _library_modules():
        for name, value in vars(module).items():
            if (
                not name.startswith("_")
                and isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("agent_ledger")
            ):
                seen[name] = value
    assert {"SlackError", "WebhookDeliveryError", "ChannelError", "LedgerError", "SchemaMissing"} <= set(seen)
    drawn = _drawn_tree()
    for name, cls in seen.items():
        assert issubclass(cls, errors.LedgerError), f"{cls.__module__}.{name} is not a LedgerError"
        assert name in drawn, f"{name} is not drawn in the tree of errors' docstring"
    assert set(drawn) == set(seen), "the tree draws a class that does not exist"
    for name, parent in drawn.items():  # the tree is the real hierarchy: each class under its base
        if parent is not None:
            assert seen[name].__bases__[0] is seen[parent], f"{name} is drawn under {parent}"


def _drawn_tree() -> dict[str, str | None]:
    """{class name: parent drawn above it} from the tree in errors' docstring."""
    block = (errors.__doc__ or "").split("::", 1)[1].strip("\n").split("\n\n", 1)[0]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        text = line.lstrip(" │├└─")
        name = text.split()[0]
        depth = len(line) - len(text)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_importing_the_library_loads_no_http_client() -> None:
    """Ledger uses the approvals package for its service; the HTTP channels (httpx, standardwebhooks)
    load only when a channel or the approvals app is used."""
    import subprocess
    import sys

    code = (
        "import sys, agent_ledger, agent_ledger.approvals as a; "
        "print(sorted(m for m in ('httpx', 'standardwebhooks') if m in sys.modules)); "
        "a.SlackChannel; print('httpx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_the_core_imports_neither_mcp_nor_pydantic_ai() -> None:
    """The MCP and Pydantic AI adapters are optional extras: the core, the CLI and the other adapters load
    neither SDK (nor does current_effect); only their own adapter modules do."""
    import subprocess
    import sys

    code = (
        "import sys, agent_ledger, agent_ledger.adapters, agent_ledger.cli, agent_ledger.downstream; "
        "agent_ledger.current_effect(); "
        "print(sorted(m for m in ('mcp', 'mcp_types', 'pydantic_ai') if m in sys.modules)); "
        "import agent_ledger.adapters.mcp, agent_ledger.adapters.pydantic_ai; "
        "print(sorted(m for m in ('mcp', 'pydantic_ai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['mcp', 'pydantic_ai']"]


def test_the_core_imports_nothing_of_the_console(tmp_path: Path) -> None:
    """The console is an optional extra: ``import agent_ledger`` (ConsoleAuth included), the CLI and
    ``ledger.timeline`` load neither Starlette, Jinja2, itsdangerous nor uvicorn; ``console_app`` does."""
    import subprocess
    import sys

    code = (
        "import sys, agent_ledger, agent_ledger.cli, agent_ledger.console; "
        f"led = agent_ledger.Ledger('sqlite:///{tmp_path / 'l.db'}'); led.timeline('w'); led.workflows(); "
        "auth = agent_ledger.ConsoleAuth({'alice': 'a' * 16}); "
        "names = ('starlette', 'jinja2', 'itsdangerous', 'uvicorn', 'multipart'); "
        "print(sorted(m for m in names if m in sys.modules)); "
        "led.console_app(auth=auth); "
        "print(sorted(m for m in names if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['itsdangerous', 'jinja2', 'starlette']"]
