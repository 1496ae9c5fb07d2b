"""``python -m services.cli``: the operator CLI (what ``./cy`` runs once .venv is installed)."""

from services.cli.main import main

raise SystemExit(main())
