"""The documentation cannot drift from the code.

Every Python block of README.md and docs/**/*.md runs as a test (pytest-markdown-docs, enabled in
pyproject.toml; fixtures in the root conftest.py). Shell blocks are not run, so this module checks what
they name instead: every ``agent-ledger`` subcommand and option in the docs exists in the CLI's parser.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from agent_ledger import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _command_lines() -> list[tuple[str, str]]:
    """(page, command line) for every ``agent-ledger ...`` in a shell block or in inline code."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = str(page.relative_to(ROOT))
        for info, body in FENCE.findall(text):
            lang = info.split()[:1]
            if lang in (["sh"], ["console"], ["bash"], []):
                for line in body.splitlines():
                    line = line.strip()
                    if lang == ["console"]:  # only the prompts are commands, the rest is their output
                        if not line.startswith("$ "):
                            continue
                        line = line[2:]
                    for part in re.split(r"&&|\|", line):
                        part = part.strip()
                        if part.startswith("agent-ledger ") and not part.startswith("agent-ledger: "):
                            found.append((name, part))
        prose = FENCE.sub("", text)
        found += [(name, m) for m in re.findall(r"`(agent-ledger [^`]+)`", prose)]
    return found


COMMANDS = _command_lines()


def test_the_docs_name_commands() -> None:
    assert len(COMMANDS) > 30  # the extraction above works


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{line[:40]}" for p, line in COMMANDS])
def test_every_command_in_the_docs_exists(page: str, line: str) -> None:
    words = line.split()[1:]
    parser = cli._parser()
    if words[0].startswith("{"):  # the synopsis: agent-ledger {demo,migrate,...} ...
        assert set(words[0].strip("{}").split(",")) == set(_subparsers(parser)), f"{page}: {line}"
        return
    if words[0] in ("--help", "-h"):
        return
    commands = _subparsers(parser)
    assert words[0] in commands, f"{page}: no subcommand {words[0]!r} in `{line}`"
    sub = commands[words[0]]
    nested = _subparsers(sub)
    if nested and len(words) > 1 and not words[1].startswith("-"):
        assert words[1] in nested, f"{page}: no subcommand {words[0]} {words[1]!r} in `{line}`"
        sub = nested[words[1]]
    options = _options(sub)
    for word in words:
        option = re.match(r"\[?\(?(--?[a-z][a-z-]*)", word)
        if option:
            assert option.group(1) in options, f"{page}: `{line}` uses {option.group(1)}, not an option of it"


def test_python_blocks_are_run_and_isolated(pytestconfig: pytest.Config) -> None:
    """The docs' Python blocks are collected by the normal test run, and every block that is not run
    says so: a ``notest`` block needs a reason in the paragraph before it."""
    assert "--markdown-docs" in pytestconfig.getini("addopts")
    assert {"tests", "README.md", "docs"} <= set(pytestconfig.getini("testpaths"))
    assert pytestconfig.option.markdowndocs
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            info = m.group(1).split()
            if info[:1] == ["python"] and "notest" in info:
                before = text[: m.start()].rstrip().rsplit("\n\n", 1)[-1]
                assert re.search(r"not run|cannot run|needs? (a|an|the) real", before), (
                    f"{page.name}: a block marked notest must say why in the paragraph before it"
                )


def test_every_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from README.md"
