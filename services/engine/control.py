"""The engine's control subjects: ``load``/``unload``/``list``/``tokenize``/``detokenize`` commands in,
one ``ControlReply`` out.

The same handler serves ``llm.v1.engine.<worker>.control`` and the broadcast
``llm.v1.engine.all.control``. Each command runs as its own task, so a ``list`` is answered
while a slow load is under way (loads themselves are serialized by ``ModelHost``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from schemas.control import ControlReply, Detokenize, ListModels, LoadModel, Tokenize, UnloadModel, decode_command
from schemas.errors import BusError, ErrorCode
from schemas.events import encode
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import InferenceRequest
from services.engine.model_host import HostedModel, ModelHost

log = logging.getLogger(__name__)


class ModelControl:
    """Answers control commands for one engine (see the module docstring)."""

    def __init__(self, host: ModelHost, worker: str, *, heartbeat: Callable[[], EngineHeartbeat],
                 draining: Callable[[], bool], unload_timeout: float) -> None:
        self._host = host
        self._worker = worker
        self._heartbeat = heartbeat
        self._draining = draining
        self._unload_timeout = unload_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_message(self, msg: Msg) -> None:
        """Subscription callback: handle ``msg`` in its own task."""
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel commands still running (a load under way is abandoned with the process)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _answer(self, msg: Msg) -> None:
        reply = await self.execute(msg.data)
        if not msg.reply:
            return
        try:
            await msg.respond(encode(reply))
        except NatsError as exc:
            log.warning("control reply not sent: %s", exc)

    async def execute(self, data: bytes) -> ControlReply:
        """Run one encoded command; a failure is a reply with ``ok`` false and a typed code."""
        try:
            command = decode_command(data)
        except msgspec.DecodeError as exc:
            return self._reply(False, code=ErrorCode.INVALID_REQUEST,
                               message=f"bad control command (expected type load, unload or list): {exc}")
        try:
            match command:
                case LoadModel(model=name):
                    if self._draining():
                        raise BusError(ErrorCode.ENGINE_BUSY, "engine is draining")
                    began = time.monotonic()
                    result = await self._host.load(name)
                    log.info("load %s: %s in %.1fs (evicted %s)", name, result.model, time.monotonic() - began,
                             result.evicted or "none")
                    return self._reply(True, model=result.model, evicted=result.evicted,
                                       load_seconds=round(result.seconds, 3))
                case UnloadModel(model=name):
                    return self._reply(True, model=await self._host.unload(name, self._unload_timeout))
                case ListModels():
                    return self._reply(True)
                case Tokenize() | Detokenize():
                    return await self._tokens(command)
        except BusError as exc:
            return self._reply(False, code=exc.code, message=exc.message, param=exc.param)
        raise AssertionError(f"unhandled control command {command!r}")

    async def _tokens(self, command: Tokenize | Detokenize) -> ControlReply:
        """Tokenize or detokenize with the loaded model ``command.model`` names (held busy meanwhile, so an
        unload waits for it); no heartbeat in the reply: nothing about the engine changed."""
        model = self._host.route(command.model)
        if model is None:
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"model {command.model!r} is not loaded on this engine",
                           param="model")
        self._host.begin(model)
        try:
            return await self._tokens_on(model, command)
        finally:
            self._host.end(model)

    async def _tokens_on(self, model: HostedModel, command: Tokenize | Detokenize) -> ControlReply:
        backend = model.backend
        if isinstance(command, Detokenize):
            return ControlReply(ok=True, worker=self._worker, model=model.id,
                                prompt=await backend.detokenize(command.tokens))
        if (command.prompt is None) == (command.messages is None):
            raise BusError(ErrorCode.INVALID_REQUEST, "give exactly one of 'prompt' or 'messages'", param="prompt")
        request = InferenceRequest(id="tokenize", model=model.id, reply_to="", prompt=command.prompt,
                                   messages=command.messages)
        tokens = await backend.tokenize(request, command.add_generation_prompt)
        return ControlReply(ok=True, worker=self._worker, model=model.id, tokens=tokens,
                            max_model_len=backend.context_length())

    def _reply(self, ok: bool, **fields) -> ControlReply:
        heartbeat = self._heartbeat()
        return ControlReply(ok=ok, worker=self._worker, models=heartbeat.models, memory_bytes=heartbeat.memory_bytes,
                            heartbeat=heartbeat, **fields)
