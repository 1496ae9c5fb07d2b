"""Engine heartbeats: the only source of the scheduler's worker table."""

from __future__ import annotations

import enum

import msgspec


class Health(enum.StrEnum):
    """What an engine's own health checks found (heartbeat ``health``).

    ``ok``: every check passed. ``degraded``: a check did not answer in time; the engine still takes
    work. ``failed``: the engine cannot serve (model thread dead, engine core gone); it ended its
    requests, refuses new ones, and schedulers send it nothing until a check passes again.
    """

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


class ServedModel(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A model an engine has loaded and can serve now."""

    id: str
    context_length: int = 0
    aliases: list[str] = []
    owned_by: str = "cy-llm"
    # Engines serving several models (loaded and evicted at run time): memory the model took when loaded, its requests now,
    # and the PEFT adapters loaded into it.
    memory_bytes: int = 0
    in_flight: int = 0
    adapters: list[str] = []


class EngineHeartbeat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Published every ``interval`` seconds and on every capacity change.

    Sent on core subject ``llm.v1.workers.status.<worker>`` and stored in KV ``llm_workers``
    under key ``<worker>``. ``seq`` grows with every status the engine emits, so a reader keeps
    the newest of a heartbeat and a ``DispatchReply``.
    """

    worker: str
    engine: str
    device: str
    models: list[ServedModel]
    slots: int
    in_flight: int
    seq: int
    ts: float
    interval: float = 1.0
    adapters: list[str] = []
    draining: bool = False
    memory_bytes: int = 0
    pid: int = 0
    host: str = ""
    started: float = 0.0
    engine_reason: str = ""
    weight: float = 1.0  # relative share of work under the scheduler's ``weighted`` strategy
    # How many models the engine keeps loaded at once and its memory budget in bytes (0 = none); a
    # scheduler cold-starting a model prefers an engine with room.
    max_models: int = 0
    memory_budget: int = 0
    # A ``Health`` value (a plain string, so a newer peer's value still decodes) and why it is not ``ok``.
    health: str = Health.OK.value
    health_reason: str = ""
    # Decode speed of one stream: a moving average over the engine's recent requests of tokens after the
    # first per second (0 = none finished yet). Schedulers send work to the fastest engines first.
    tokens_per_second: float = 0.0
