"""Engine control: load, unload and list models at run time; tokenize and detokenize with a served model.

Commands go to ``llm.v1.engine.<worker>.control`` (one engine, request/reply) or to
``llm.v1.engine.all.control`` (every engine answers; the caller collects the replies). Each
command is a JSON object tagged by ``type``; every engine answers with one ``ControlReply``,
``ok`` false carrying a ``code`` from ``schemas.errors.ErrorCode``.
"""

from __future__ import annotations

from typing import Union

import msgspec

from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import ChatMessage


class LoadModel(msgspec.Struct, tag="load", tag_field="type", kw_only=True, omit_defaults=True):
    """Load ``model`` (an id or alias of the model registry ``llm_models``); a no-op if it is served already."""

    model: str


class UnloadModel(msgspec.Struct, tag="unload", tag_field="type", kw_only=True, omit_defaults=True):
    """Unload ``model`` (id or alias) once its requests in flight have finished (within the drain timeout)."""

    model: str


class ListModels(msgspec.Struct, tag="list", tag_field="type", kw_only=True, omit_defaults=True):
    """Answer with the models loaded now."""


class Tokenize(msgspec.Struct, tag="tokenize", tag_field="type", kw_only=True, omit_defaults=True):
    """Token ids of ``prompt``, or of ``messages`` rendered as generation renders them (chat template,
    then the assistant header when ``add_generation_prompt``), with ``model``'s tokenizer."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class Detokenize(msgspec.Struct, tag="detokenize", tag_field="type", kw_only=True, omit_defaults=True):
    """The text ``tokens`` stand for, with ``model``'s tokenizer."""

    model: str
    tokens: list[int]


ControlCommand = Union[LoadModel, UnloadModel, ListModels, Tokenize, Detokenize]


class ControlReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An engine's answer to a control command.

    ``model`` is the canonical id the command acted on; ``evicted`` the idle models unloaded to
    make room for a load; ``models`` what the engine serves after the command; ``heartbeat`` its
    status right after it, so a scheduler can route to a freshly loaded model without waiting
    for the next heartbeat. ``tokens`` and ``max_model_len`` answer ``tokenize``; ``prompt``
    answers ``detokenize``.
    """

    ok: bool
    worker: str
    model: str = ""
    evicted: list[str] = []
    models: list[ServedModel] = []
    memory_bytes: int = 0
    load_seconds: float = 0.0
    heartbeat: EngineHeartbeat | None = None
    code: str | None = None
    message: str | None = None
    tokens: list[int] | None = None
    max_model_len: int = 0
    prompt: str | None = None
    param: str | None = None  # the request field a refusal is about (``tokens``, ``model``...)


_command_decoder = msgspec.json.Decoder(ControlCommand)
_reply_decoder = msgspec.json.Decoder(ControlReply)


def decode_command(data: bytes) -> ControlCommand:
    """Decode one control command (raises ``msgspec.DecodeError`` on a malformed one)."""
    return _command_decoder.decode(data)


def decode_reply(data: bytes) -> ControlReply:
    """Decode one control reply (raises ``msgspec.DecodeError`` on a malformed one)."""
    return _reply_decoder.decode(data)
