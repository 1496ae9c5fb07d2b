"""The edge's configuration: one strict Struct, parsed once at start-up."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Annotated

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class EdgeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Everything the edge reads from outside; nothing is looked up again while serving."""

    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Default time a request may take from arrival to its last token (a request's ``timeout`` overrides).
    request_timeout: Seconds = 600.0
    # How long JetStream may take to acknowledge a published request.
    publish_timeout: Seconds = 5.0
    # On SIGTERM: how long open requests and streams may take to finish.
    shutdown_timeout: Seconds = 30.0
    # How often engine liveness is checked, and how long a dead engine's requests wait for a re-dispatch.
    liveness_interval: Seconds = 0.5
    worker_lost_grace: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # ``Retry-After`` (seconds) on 429 queue_full and 503 answers.
    retry_after: Positive = 1
    default_max_tokens: Positive = 256
    default_completion_max_tokens: Positive = 16
    max_body_bytes: Positive = 1 << 20
    # Subject token of this edge's reply inbox; empty means a fresh random one per start.
    edge_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""
    access_log: bool = False


def _parser() -> argparse.ArgumentParser:
    defaults = EdgeConfig()
    p = argparse.ArgumentParser(prog="python -m services.edge", description="CY-LLM edge: OpenAI-compatible HTTP "
                                "API in front of the NATS JetStream inference queue.")
    p.add_argument("--nats-url", default=os.environ.get("CY_NATS_URL", defaults.nats_url),
                   help="NATS server URL (default: $CY_NATS_URL or %(default)s)")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                   help="default per-request timeout in seconds (%(default)s)")
    p.add_argument("--publish-timeout", type=float, default=defaults.publish_timeout)
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                   help="seconds open streams may take to finish on SIGTERM (%(default)s)")
    p.add_argument("--retry-after", type=int, default=defaults.retry_after)
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--edge-id", default=defaults.edge_id)
    p.add_argument("--access-log", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> EdgeConfig:
    """Build the config from the command line; a bad value exits with a usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return msgspec.convert(vars(args), EdgeConfig)
    except msgspec.ValidationError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers honest
