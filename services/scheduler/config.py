"""Scheduler configuration: one strict struct, parsed once at start-up from flags and an optional TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated

import msgspec

from services.common.bus import NatsOptions, add_nats_arguments, env_default, option_problems
from services.common.metrics_http import DEFAULT_METRICS_HOST, METRICS_HOST_HELP
from services.scheduler.strategies import Strategy

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class SchedulerConfig(NatsOptions, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Everything a scheduler replica needs (NATS options inherited); unknown keys are an error, not a silent typo."""

    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0 = not served
    metrics_host: str = DEFAULT_METRICS_HOST  # where /metrics and /healthz bind
    dispatch_timeout: Seconds = 2.0   # wait this long for an engine's accepted/busy answer
    max_attempts: Positive = 3        # engines tried per message before it goes back to the queue
    retry_delay: Seconds = 0.25       # a message no engine could take returns after this long...
    max_retry_delay: Seconds = 2.0    # ...doubling on each return, up to this long
    fetch_wait: Seconds = 0.05        # a fetch after a doorbell waits this long for the stored message
    probe_wait: Seconds = 0.005       # a speculative fetch (start-up, suspected redeliveries) waits this long
    expire_interval: Seconds = 0.25   # drop engines silent for three heartbeat intervals this often
    stats_interval: Seconds = 2.0     # reconcile lanes with consumer info (depth, redeliveries) this often
    max_batch: Positive = 32          # most messages taken in one fetch (never more than free slots)
    # Starvation guard: after this many messages from higher lanes while a lower lane waited, the
    # lower lane gets one (0 = strict priority, a low lane may wait forever under sustained load).
    starvation_limit: Annotated[int, msgspec.Meta(ge=0)] = 32
    recent_ttl: Seconds = 300.0       # remember cancelled and accepted request ids this long
    drain_timeout: Seconds = 10.0     # on shutdown, wait this long for dispatches under way
    # Prompt cache: TTL and byte bound are the KV bucket's own (infra/nats/jetstream.toml, `./cy infra apply --update`).
    cache_enabled: bool = True
    # Hits read lately are kept in memory up to this many bytes (0 = every lookup reads KV); a kept entry is
    # dropped at once when its key changes, and at most cache_mirror_check seconds after the bucket expired it.
    cache_mirror_bytes: Annotated[int, msgspec.Meta(ge=0)] = 32 * 1024 * 1024
    cache_mirror_check: Seconds = 1.0
    # Routing: the strategy until KV llm_scheduler_config key `strategy` says otherwise (and again if it is deleted).
    strategy: Strategy = Strategy.LEAST_CONNECTIONS
    weights: dict[str, float] = {}    # per-worker weights for `weighted` (override the heartbeat `weight`)
    affinity_load_penalty: Annotated[float, msgspec.Meta(ge=0)] = 1.0  # λ of prefix_affinity's overlap - λ·load
    circuit_failures: Positive = 3    # consecutive unanswered dispatches that open an engine's circuit breaker
    circuit_cooldown: Seconds = 5.0   # an open breaker half-opens (one probe) after this long
    # Cold start: a model no live engine serves but the registry (KV llm_models) knows is loaded on an engine first.
    cold_start: bool = True
    cold_start_timeout: Seconds = 120.0  # the longest wait for an engine to load a model (the deadline bounds it too)
    # Limits of API keys' NATS-native requests (per key, per minute; 0 = unlimited) where the key sets none:
    # give the edge's --rate-rpm/--rate-tpm here too, so both paths hold a key to the same budget.
    rate_rpm: Annotated[int, msgspec.Meta(ge=0)] = 0
    rate_tpm: Annotated[int, msgspec.Meta(ge=0)] = 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.scheduler",
                                description="CY-LLM scheduler: takes requests off the JetStream queue by priority "
                                            "and dispatches each to the fastest, least-loaded engine serving its model.")
    add_nats_arguments(p, url_from_env=False)  # the --config file's nats_url comes before the environment's
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (/metrics) and health (/healthz) on this port (0 = off)")
    p.add_argument("--metrics-host", default=None, help=METRICS_HOST_HELP)
    p.add_argument("--config", type=Path, default=None,
                   help="TOML file with any SchedulerConfig field (flags given here win)")
    p.add_argument("--dispatch-timeout", type=float, default=None, help="seconds to wait for an engine's answer")
    p.add_argument("--max-attempts", type=int, default=None, help="engines tried per message before deferring it")
    p.add_argument("--retry-delay", type=float, default=None, help="seconds before a deferred message is retried")
    p.add_argument("--strategy", choices=[s.value for s in Strategy], default=None,
                   help="initial routing strategy (KV llm_scheduler_config key 'strategy' overrides it at run time)")
    p.add_argument("--no-cache", dest="cache_enabled", action="store_const", const=False, default=None,
                   help="never answer from or write to the prompt cache")
    p.add_argument("--drain-timeout", type=float, default=None, help="seconds to finish dispatches on SIGTERM")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_const", const=False, default=None,
                   help="never ask an engine to load a registered model nobody serves (answer model_not_found)")
    p.add_argument("--rate-rpm", type=int, default=None, metavar="N",
                   help="requests per minute of an API key's NATS producer whose key sets no limit (as the edge's "
                        "--rate-rpm; default: 0, unlimited)")
    p.add_argument("--rate-tpm", type=int, default=None, metavar="N",
                   help="tokens per minute of an API key's NATS producer whose key sets no limit (as the edge's "
                        "--rate-tpm; default: 0, unlimited)")
    p.add_argument("--starvation-limit", type=int, default=None,
                   help="messages taken from higher lanes before a waiting lower lane gets one (0 = strict priority)")
    return p


def parse_args(argv: list[str] | None = None) -> SchedulerConfig:
    """Build the config from the command line (``--config`` file first, then flags, then defaults)."""
    p = _parser()
    args = p.parse_args(argv)
    values: dict[str, object] = {}
    if args.config is not None:
        try:
            values.update(msgspec.toml.decode(args.config.read_bytes()))
        except (OSError, msgspec.DecodeError) as exc:
            p.error(f"--config {args.config}: {exc}")
    if "nats_url" not in values:
        values["nats_url"] = env_default("nats_url")
    values.update({k: v for k, v in vars(args).items() if v not in (None, "") and k != "config"})
    try:
        config = msgspec.convert(values, SchedulerConfig)
    except msgspec.ValidationError as exc:
        p.error(f"invalid configuration: {exc}")
    if problems := option_problems(config):
        p.error("; ".join(problems))
    return config
