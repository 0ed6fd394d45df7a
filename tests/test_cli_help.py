"""The CLI never prints a database password."""

from __future__ import annotations

import os
import subprocess
import sys


def test_help_masks_the_password_of_the_default_url() -> None:
    env = {**os.environ, "AGENT_LEDGER_URL": "postgresql+psycopg://app:s3cr3t-pw@db.internal/app"}
    out = subprocess.run(
        [sys.executable, "-m", "agent_ledger", "history", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0
    assert "s3cr3t-pw" not in out.stdout and "app:***@db.internal" in out.stdout
