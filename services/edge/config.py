"""The edge's configuration: one strict Struct, parsed once at start-up."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from services.common.bus import NatsOptions, add_nats_arguments, option_problems
from services.common import reply_socket
from services.common.hosts import is_loopback

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
AuthMode = Literal["none", "keys", "jwt", "keys+jwt"]
AUTH_MODES: tuple[str, ...] = ("none", "keys", "jwt", "keys+jwt")
# JWT algorithms verified with the shared secret, and with the public key ("none" is never accepted).
HMAC_ALGORITHMS: tuple[str, ...] = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                          "PS256", "PS384", "PS512")

HOW_TO_CONFIGURE_AUTH = (
    "configure authentication: --auth keys (create keys with './cy keys create --name NAME --scope inference'), "
    "or --auth jwt with --jwt-secret-file FILE (HS256) or --jwt-public-key-file PEM (RS256/ES256), "
    "or --auth keys+jwt; or bind to loopback (--host 127.0.0.1) to run open")


class EdgeConfig(NatsOptions, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Everything the edge reads from outside (NATS options inherited); nothing is looked up again while serving."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Default time a request may take from arrival to its last token (a request's ``timeout`` overrides).
    request_timeout: Seconds = 600.0
    # How long JetStream may take to acknowledge a published request.
    publish_timeout: Seconds = 5.0
    # How long a publish that meets a stream leader election (a NATS node lost) is retried, with the
    # same Nats-Msg-Id so it is stored once; elections take seconds, the client sees a short stall.
    publish_retry_window: Seconds = 20.0
    # On SIGTERM: how long open requests and streams may take to finish.
    shutdown_timeout: Seconds = 30.0
    # How often engine liveness is checked, and how long a dead engine's requests wait for a re-dispatch.
    liveness_interval: Seconds = 0.5
    worker_lost_grace: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # How many times one request may be re-published after losing its engine (0: fail it with worker_lost).
    max_failovers: NonNegative = 3
    # ``Retry-After`` (seconds) on 429 queue_full and 503 answers.
    retry_after: Positive = 1
    default_max_tokens: Positive = 256
    default_completion_max_tokens: Positive = 16
    max_body_bytes: Positive = 1 << 20
    # Largest file ``POST /v1/files`` stores (streamed to the object store, not bound by max_body_bytes).
    max_upload_bytes: Positive = 512 << 20
    # Seconds between SSE keep-alive comments on an idle training progress stream.
    training_keepalive: Seconds = 15.0
    # Subject token of this edge's reply inbox; empty means a fresh random one per start.
    edge_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""
    access_log: bool = False
    # Who may call: "none" (open; only allowed on a loopback host), API keys, JWTs, or either.
    auth: AuthMode = "none"
    # How long the edge trusts a looked-up API key record: the bound on a revoked key still working.
    auth_cache_ttl: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None
    # Accepted JWT algorithms; empty means HS256 with a secret and RS256 + ES256 with a public key.
    jwt_algorithms: list[str] = []
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_scope_claim: str = "scope"
    jwt_leeway: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Per-caller budgets shared by every edge (counted in the LLM_RATE stream); 0 = unlimited.
    # An API key's own rate_rpm/rate_tpm/rate_streams override these.
    rate_rpm: NonNegative = 0
    rate_tpm: NonNegative = 0
    rate_streams: NonNegative = 0
    # Origins browsers may call from (CORS); empty = no CORS headers at all; "*" = any origin.
    cors_origins: list[str] = []
    # WebSocket ping interval; a peer that misses a pong is disconnected (and its requests cancelled).
    ws_heartbeat: Seconds = 20.0
    # A client that stops reading its stream (SSE or WebSocket) is cut once this many events of one
    # request wait for it, or once one write to it has not completed for write_timeout seconds:
    # the request is cancelled on the bus, the connection closed (``llm_edge_slow_consumers_total``).
    max_stream_buffer: Positive = 4096
    write_timeout: Seconds = 30.0
    # Deepest JSON nesting a request body may have (bounds the decoder's work on hostile input).
    max_json_depth: Positive = 64
    # Most choices (OpenAI ``n``) one request may ask for; each is generated as a request of its own.
    max_choices: Positive = 16
    # Prompt cache: answer hits of cacheable OpenAI requests here, without the queue (False:
    # every request goes to the queue and the scheduler answers hits). Entries read lately are kept in
    # memory (0 = one KV read per lookup), dropped at once when their key changes and at most
    # cache_mirror_check seconds after the bucket expired or evicted them.
    cache_enabled: bool = True
    cache_mirror_bytes: NonNegative = 32 * 1024 * 1024
    cache_mirror_check: Seconds = 1.0
    # Batch lines this edge's batch runner runs at once (0: this edge runs no batches; others do).
    batch_concurrency: NonNegative = 16
    # Longest request line and single header aiohttp accepts (longer: 431 headers_too_large).
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8190
    # Most header fields a request may have (more: 431 headers_too_large).
    max_headers: Annotated[int, msgspec.Meta(ge=16)] = 128
    # How long a stored /v1/responses response is kept (its own TTL in KV llm_responses); 30 days, as OpenAI's.
    responses_ttl: Annotated[float, msgspec.Meta(ge=1)] = 30 * 86400.0
    # Engines on this host send their events to this edge's Unix socket instead of through nats-server
    # (``services/common/reply_socket.py``); reply_socket_dir "" is the default directory.
    reply_socket: bool = True
    reply_socket_dir: str = ""
    # A token delta arriving while its request's handler waits is written to the client from the callback
    # that received it (``bus.replies``), without waking the handler.
    write_through: bool = True

    @property
    def uses_keys(self) -> bool:
        """API keys are accepted."""
        return self.auth in ("keys", "keys+jwt")

    @property
    def uses_jwt(self) -> bool:
        """JWTs are accepted."""
        return self.auth in ("jwt", "keys+jwt")


def config_problems(config: EdgeConfig) -> list[str]:
    """Why ``config`` must not be served (empty when it is fine), each saying what to change."""
    problems = option_problems(config)
    if config.auth == "none" and not is_loopback(config.host):
        problems.append(f"refusing to serve on {config.host or 'all interfaces'} without authentication; "
                        + HOW_TO_CONFIGURE_AUTH)
    if config.uses_jwt:
        problems += _jwt_problems(config)
    return problems


def _jwt_problems(config: EdgeConfig) -> list[str]:
    if not (config.jwt_secret_file or config.jwt_public_key_file):
        return [f"--auth {config.auth} needs --jwt-secret-file or --jwt-public-key-file"]
    problems = [f"{flag} {path}: no such file" for flag, path in (("--jwt-secret-file", config.jwt_secret_file),
                ("--jwt-public-key-file", config.jwt_public_key_file)) if path and not Path(path).is_file()]
    for alg in config.jwt_algorithms:
        if alg not in HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS:
            problems.append(f"--jwt-algorithms: {alg!r} is not supported (use some of "
                            f"{', '.join(HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS)})")
        elif alg in HMAC_ALGORITHMS and not config.jwt_secret_file:
            problems.append(f"--jwt-algorithms {alg} needs --jwt-secret-file")
        elif alg in PUBLIC_KEY_ALGORITHMS and not config.jwt_public_key_file:
            problems.append(f"--jwt-algorithms {alg} needs --jwt-public-key-file")
    return problems


def _parser() -> argparse.ArgumentParser:
    defaults = EdgeConfig()
    p = argparse.ArgumentParser(prog="python -m services.edge", description="CY-LLM edge: OpenAI-compatible HTTP "
                                "API in front of the NATS JetStream inference queue.")
    add_nats_arguments(p)
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                   help="default per-request timeout in seconds (%(default)s)")
    p.add_argument("--publish-timeout", type=float, default=defaults.publish_timeout,
                   help="seconds JetStream may take to acknowledge one publish (%(default)s)")
    p.add_argument("--publish-retry-window", type=float, default=defaults.publish_retry_window,
                   help="seconds a publish caught in a NATS leader election is retried, with the same "
                        "Nats-Msg-Id (%(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                   help="seconds open streams may take to finish on SIGTERM (%(default)s)")
    p.add_argument("--retry-after", type=int, default=defaults.retry_after)
    p.add_argument("--max-failovers", type=int, default=defaults.max_failovers,
                   help="re-publications of a request whose engine was lost, before or mid-stream (%(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes,
                   help="largest training file POST /v1/files accepts (default: %(default)s = 512 MiB)")
    p.add_argument("--batch-concurrency", type=int, default=defaults.batch_concurrency,
                   help="batch lines this edge runs at once on the low lane (0: run no batches; "
                        f"default: {defaults.batch_concurrency})")
    p.add_argument("--edge-id", default=defaults.edge_id)
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--no-write-through", dest="write_through", action="store_false", default=defaults.write_through,
                   help="hand every token event to its request's handler, which writes it to the client; by "
                        "default one that arrives while the handler waits is written at once")
    reply_socket.add_arguments(p, "take every token event through the NATS inbox, none through a Unix socket "
                                  "(to watch them with 'nats sub')")
    _auth_arguments(p, defaults)
    _limit_arguments(p, defaults)
    _cache_arguments(p, defaults)
    return p


def _cache_arguments(p: argparse.ArgumentParser, defaults: EdgeConfig) -> None:
    g = p.add_argument_group("prompt cache", "hits of cacheable OpenAI requests answered by the edge itself")
    g.add_argument("--no-cache", dest="cache_enabled", action="store_false", default=defaults.cache_enabled,
                   help="answer no hit here: every request goes to the queue (the scheduler still answers hits)")
    g.add_argument("--cache-mirror-bytes", type=int, default=defaults.cache_mirror_bytes, metavar="BYTES",
                   help="memory for entries read lately, 0 = read KV on every lookup (default: %(default)s)")
    g.add_argument("--cache-mirror-check", type=float, default=defaults.cache_mirror_check, metavar="SECONDS",
                   help="how often the bucket is checked for expired entries, the bound on serving one "
                        "(%(default)s)")


def _limit_arguments(p: argparse.ArgumentParser, defaults: EdgeConfig) -> None:
    g = p.add_argument_group("limits", "budgets per API key / JWT subject (per client address without auth), "
                             "enforced across all edge replicas; 0 = unlimited")
    g.add_argument("--rate-rpm", type=int, default=defaults.rate_rpm, metavar="N", help="requests per minute")
    g.add_argument("--rate-tpm", type=int, default=defaults.rate_tpm, metavar="N",
                   help="tokens (prompt + completion) per minute")
    g.add_argument("--rate-streams", type=int, default=defaults.rate_streams, metavar="N",
                   help="concurrent streaming requests (SSE and WebSocket)")
    g.add_argument("--cors-origins", type=lambda v: [o.strip() for o in v.split(",") if o.strip()],
                   default=[], metavar="ORIGIN,...",
                   help="browser origins allowed to call the API ('*' for any); default: no CORS")
    g.add_argument("--ws-heartbeat", type=float, default=defaults.ws_heartbeat, metavar="SECONDS",
                   help="WebSocket ping interval (%(default)s)")
    g.add_argument("--max-stream-buffer", type=int, default=defaults.max_stream_buffer, metavar="EVENTS",
                   help="events one streaming request may have waiting for a client that does not read; more: "
                        "the request is cancelled and its connection closed, counted in "
                        "llm_edge_slow_consumers_total (%(default)s)")
    g.add_argument("--write-timeout", type=float, default=defaults.write_timeout, metavar="SECONDS",
                   help="how long one write to a streaming client may stay blocked (the client not reading) "
                        "before it is cut the same way (%(default)s)")
    g.add_argument("--max-json-depth", type=int, default=defaults.max_json_depth,
                   help="deepest JSON nesting accepted in a request body (%(default)s)")
    g.add_argument("--max-choices", type=int, default=defaults.max_choices,
                   help="largest OpenAI 'n' (choices per request) accepted (%(default)s)")
    g.add_argument("--responses-ttl", type=float, default=defaults.responses_ttl, metavar="SECONDS",
                   help="how long a stored /v1/responses response is kept for retrieval and "
                        "previous_response_id (default: %(default)s = 30 days)")
    g.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                   help="longest request line / header field accepted; longer: 431 (%(default)s)")
    g.add_argument("--max-headers", type=int, default=defaults.max_headers,
                   help="most header fields a request may have; more: 431 (%(default)s)")


def _auth_arguments(p: argparse.ArgumentParser, defaults: EdgeConfig) -> None:
    g = p.add_argument_group("authentication", "--auth none is only allowed on a loopback --host")
    g.add_argument("--auth", choices=AUTH_MODES, default=defaults.auth,
                   help="credentials required: none, API keys, JWTs, or either (default: %(default)s)")
    g.add_argument("--auth-cache-ttl", type=float, default=defaults.auth_cache_ttl, metavar="SECONDS",
                   help="how long a looked-up API key is trusted, i.e. how soon a revocation bites (%(default)s)")
    g.add_argument("--jwt-secret-file", default=None, metavar="FILE", help="shared secret for HS256 tokens")
    g.add_argument("--jwt-public-key-file", default=None, metavar="PEM",
                   help="public key (PEM) for RS256/ES256 tokens")
    g.add_argument("--jwt-algorithms", type=lambda v: [a.strip() for a in v.split(",") if a.strip()],
                   default=[], metavar="ALG,...",
                   help="accepted algorithms (default: HS256 with a secret, RS256,ES256 with a public key)")
    g.add_argument("--jwt-audience", default=None, help="required 'aud' claim")
    g.add_argument("--jwt-issuer", default=None, help="required 'iss' claim")
    g.add_argument("--jwt-scope-claim", default=defaults.jwt_scope_claim,
                   help="claim holding the scopes, a space-separated string or a list (default: %(default)s)")
    g.add_argument("--jwt-leeway", type=float, default=defaults.jwt_leeway, metavar="SECONDS",
                   help="clock skew allowed on exp/nbf (default: %(default)s)")


def parse_args(argv: Sequence[str] | None = None) -> EdgeConfig:
    """Build the config from the command line; a bad value or an unsafe setup exits with status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = msgspec.convert(vars(args), EdgeConfig)
    except msgspec.ValidationError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers honest
    problems = config_problems(config)
    if problems:
        parser.exit(2, "".join(f"{parser.prog}: error: {p}\n" for p in problems))
    return config
