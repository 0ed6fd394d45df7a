"""``python -m agent_ledger`` is the ``agent-ledger`` command."""

from .cli import main

raise SystemExit(main())
