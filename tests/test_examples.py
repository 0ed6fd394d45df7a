"""Every script in examples/ runs offline and reports that its side effect ran exactly once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
RAN_ONCE = "charge ran 1 time(s)"


def test_examples_exist() -> None:
    assert {p.name for p in SCRIPTS} >= {
        "openai_chat.py",
        "openai_responses.py",
        "anthropic_tool_use.py",
        "langchain_langgraph.py",
        "openai_agents.py",
        "approvals_callback.py",
    }
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for script in SCRIPTS:
        assert f"python examples/{script.name}" in readme, f"{script.name} is not listed in examples/README.md"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_the_charge_once(script: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_LEDGER_", "OPENAI_", "ANTHROPIC_"))}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert out.returncode == 0, f"{script.name} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    counts = re.findall(r"charge ran (\d+) time\(s\)", out.stdout)
    assert RAN_ONCE in out.stdout and set(counts) == {"1"}, out.stdout
    assert list(tmp_path.iterdir()) == [], "examples must keep their database in a temporary directory"
