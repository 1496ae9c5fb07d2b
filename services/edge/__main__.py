"""``python -m services.edge --nats-url URL --host 127.0.0.1 --port 8080 [--request-timeout 600]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.common.lifecycle import run, setup_logging
from services.edge.config import parse_args
from services.edge.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the config once, then serve on uvloop until SIGTERM/SIGINT."""
    config = parse_args(argv)
    setup_logging("edge")
    run(lambda: serve(config))


if __name__ == "__main__":
    main(sys.argv[1:])
