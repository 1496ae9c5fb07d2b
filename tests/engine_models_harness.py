"""Harness for the multi-model engine tests — no tests in here.

Runs a real transformers engine (the default model) in-process on the per-test nats-server,
with run-time loading enabled, and talks to it over its control subject.
"""

from __future__ import annotations

import uuid
from pathlib import Path


from schemas import names
from schemas.control import ControlReply, decode_reply
from schemas.events import StreamEnd, StreamError, decode_event, encode
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from schemas.registry import ModelEntry
from services.common import model_registry
from services.common.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID
from services.engine.__main__ import build_backend
from tests.engine.test_engine_service import serving


def real_engine(nats_url: str, model_dir: Path, state_dir: Path, *extra: str):
    """A transformers engine serving the default model that can load more: ``(service, worker)``."""
    argv = ["--nats-url", nats_url, "--engine", "transformers", "--model-id", DEFAULT_MODEL_ID,
            "--model-path", str(model_dir), "--heartbeat-interval", "0.2", "--device", "cpu",
            "--slots", "2", "--drain-timeout", "5"]
    for alias in DEFAULT_MODEL_ALIASES:
        argv += ["--alias", alias]
    return serving([*argv, *extra], factory=build_backend, state_dir=state_dir)


async def register(js, model_id: str, source: str | Path, **fields) -> ModelEntry:
    """Put a base-model entry into the registry."""
    entry = ModelEntry(id=model_id, source=str(source), **fields)
    await model_registry.put_entry(await js.key_value(names.MODELS_BUCKET), entry)
    return entry


async def control(nc, worker: str, command, timeout: float = 120.0) -> ControlReply:
    """Send one control command to ``worker`` and decode its reply."""
    msg = await nc.request(names.engine_control(worker), encode(command), timeout=timeout)
    return decode_reply(msg.data)


def chat(model: str, inbox: str, max_tokens: int = 4) -> InferenceRequest:
    """A short greedy chat request."""
    return InferenceRequest(id=f"r-{uuid.uuid4().hex[:10]}", model=model, reply_to=inbox,
                            messages=[ChatMessage(role="user", content="Say hello.")],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def until_terminal(sub, timeout: float = 60.0) -> list:
    """Events on ``sub`` up to and including the terminal one."""
    out = []
    while True:
        ev = decode_event((await sub.next_msg(timeout=timeout)).data)
        out.append(ev)
        if isinstance(ev, (StreamEnd, StreamError)):
            return out
