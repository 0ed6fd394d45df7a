"""docs/architecture.md names only things that exist: every path it names is a file or folder of the
repository, every test file it names exists, and every code name in backticks is defined in the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "agent_ledger"
# Backticked words that are not code names of the package: values, commands, other libraries' names.
NOT_NAMES = {
    "v1:",
    "use",
    "wait",
    "rejected",
    "expire",
    "request",
    "pending",
    "approved",
    "consumed",
    "expired",
    "agent-ledger",
    "os.register_at_fork",
    "@ledger.tool",
}


def _spans() -> list[str]:
    text = PAGE.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`]+)`", text)


def _defined() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        names.add(path.stem)
        names |= set(re.findall(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", source, re.M))
        names |= set(re.findall(r"^\s*(?:self\.)?(\w+)(?:\s*:[^=\n]+)?\s*=", source, re.M))
    return names


def test_the_page_names_existing_paths() -> None:
    paths = [s for s in _spans() if "/" in s or s.endswith(".py")]
    assert len(paths) > 20
    for span in paths:
        if span in NOT_NAMES:
            continue
        candidates = [ROOT / span, PACKAGE / span, PACKAGE / "approvals" / span, PACKAGE / "adapters" / span]
        assert any(c.exists() for c in candidates), f"docs/architecture.md names {span!r}, which does not exist"


def test_the_page_names_existing_code() -> None:
    defined = _defined()
    checked = 0
    for span in _spans():
        if span in NOT_NAMES or "/" in span or span.endswith(".py") or " " in span:
            continue
        for part in re.sub(r"\(.*\)", "", span).lstrip("_").split("."):
            part = part.strip()
            if part and part not in ("...",):
                assert part in defined or f"_{part}" in defined, f"docs/architecture.md names {span!r}: no {part!r}"
                checked += 1
    assert checked > 60
