"""The documentation cannot drift from the code.

Every Python block of README.md and docs/**/*.md runs as a test (pytest-markdown-docs, enabled in
pyproject.toml; fixtures in the root conftest.py). Shell blocks are not run, so this module checks what
they name instead: every ``agent-ledger`` subcommand and option in the docs exists in the CLI's parser,
and the console examples of docs/cli.md, run against a ledger seeded like the page's, give the exit
codes and output the page shows.
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
    if nested and len(words) > 1 and not words[1].startswith(("-", "[")):  # "[--opt" is optional, not a command
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


# ---- the console examples of docs/cli.md, run ---------------------------------------------------

CLI_PAGE = ROOT / "docs" / "cli.md"
CONSOLE_BLOCKS = [
    body for info, body in FENCE.findall(CLI_PAGE.read_text(encoding="utf-8")) if info.strip() == "console"
]
# Output that names ids, times or durations of the run that produced the page is not compared.
VARIES = re.compile(r"v1:[0-9a-f]{6}|apr_[0-9a-f]{6}|\d{4}-\d\d-\d\dT\d\d|\d\.\dms|:\d+:[0-9a-f]{6}")


def _seed(url: str) -> None:
    """The ledger the page's examples were taken from: order-123 with a replayed charge, a failed
    receipt and an unknown booking; a refund waiting for alice's approval in order-456."""
    from agent_ledger import ApprovalPending, Ledger, OutcomeUnknown, ToolCall

    ledger = Ledger(url)
    charge = ToolCall(workflow_id="order-123", tool="stripe.charge", args={"customer": "cus_123", "amount": 100})
    for _ in range(2):
        ledger.run(charge, handler=lambda customer, amount: {"charge_id": "ch_1", "amount": amount})

    def fails(**_: object) -> None:
        raise RuntimeError("smtp down")

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    receipt = ToolCall(workflow_id="order-123", tool="email.send_receipt", args={"charge_id": "ch_1"})
    with pytest.raises(RuntimeError):
        ledger.run(receipt, handler=fails)
    booking = ToolCall(workflow_id="order-123", tool="flights.book", args={"flight": "LH123"})
    with pytest.raises(KeyboardInterrupt):
        ledger.run(booking, handler=interrupted)
    with pytest.raises(OutcomeUnknown):
        ledger.run(booking, handler=interrupted)
    refund = ToolCall(workflow_id="order-456", tool="stripe.refund", args={"charge_id": "ch_9", "amount": 5000})
    with pytest.raises(ApprovalPending):
        ledger.run(refund, handler=lambda charge_id, amount: "refunded", requires_approval=True, approvers={"alice"})
    ledger.close()


@pytest.mark.parametrize("block", CONSOLE_BLOCKS, ids=[b.split("\n", 1)[0][:50] for b in CONSOLE_BLOCKS])
def test_cli_examples_give_the_documented_output(block: str, tmp_path: Path) -> None:
    """Each ``$ agent-ledger ...`` line of docs/cli.md, run against a ledger seeded like the page's, exits
    with the code its ``echo $?`` shows and prints the page's output (unless that output names ids,
    times or durations of the run the page was written from; those commands only have to succeed)."""
    import os
    import shlex
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'agent_ledger.db'}"
    _seed(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_LEDGER_")}
    env.update(AGENT_LEDGER_URL=url, COLUMNS="120", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    last: subprocess.CompletedProcess[str] | None = None
    for command, expected in steps:
        if command == "echo $?":
            if last is not None:
                assert str(last.returncode) == expected[0], f"`{last.args}` exited {last.returncode}\n{last.stdout}"
            continue
        words = shlex.split(command)
        assert words[0] == "agent-ledger", command
        if VARIES.search(command) and "v1:nope" not in command:
            last = None  # names a key or an approval id of the page's own run
            continue
        last = subprocess.run(
            [sys.executable, "-m", "agent_ledger", *words[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        shown = (last.stdout + last.stderr).rstrip("\n")
        want = "\n".join(expected).rstrip("\n")
        if "Connection refused" in want:  # the driver's wording; the exit code is checked by `echo $?`
            continue
        if VARIES.search(want):
            assert last.returncode == 0, f"`{command}` failed:\n{shown}"
            continue
        assert shown == want, f"docs/cli.md shows for `{command}`:\n{want}\n\nbut it prints:\n{shown}"
