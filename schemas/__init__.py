"""Wire contracts of CY-LLM: msgspec Structs for every bus message and the name builders.

Everything that crosses NATS is defined here. Structs are open-world (unknown fields are
ignored) and evolve only by adding defaulted fields; a breaking change gets ``llm.v2``.
"""

from schemas.auth import ApiKeyRecord, Scope
from schemas.errors import ErrorCode, BusError
from schemas.events import (
    StreamEnd,
    StreamError,
    StreamEvent,
    StreamStart,
    TokenDelta,
    Usage,
    decode_event,
    encode,
)
from schemas.inference import (
    CancelRequest,
    ChatMessage,
    DispatchReply,
    InferenceRequest,
    SamplingParams,
)
from schemas.heartbeat import EngineHeartbeat, ServedModel

__all__ = [
    "ApiKeyRecord",
    "BusError",
    "CancelRequest",
    "ChatMessage",
    "DispatchReply",
    "EngineHeartbeat",
    "ErrorCode",
    "InferenceRequest",
    "SamplingParams",
    "Scope",
    "ServedModel",
    "StreamEnd",
    "StreamError",
    "StreamEvent",
    "StreamStart",
    "TokenDelta",
    "Usage",
    "decode_event",
    "encode",
]
