"""What the edge keeps per stored ``/v1/responses`` response in KV ``llm_responses`` (key: the response id).

A stored response carries its own input items and output items (typed, so that a later request's
``previous_response_id`` can rebuild the conversation by walking the chain back) and the response
object exactly as it was served (OpenAI's shape, owned by the edge), for ``GET /v1/responses/{id}``.
Each record expires on its own (a per-message TTL, the edge's ``--responses-ttl``).
"""

from __future__ import annotations

import msgspec


class ResponseItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One input or output item: a ``message``, a ``function_call`` or a ``function_call_output``.

    A message has a ``role`` and its text parts in order (``texts``); a function call its
    ``call_id``, ``name`` and ``arguments`` (JSON text); a call's output its ``call_id`` and ``output``.
    """

    id: str
    type: str
    role: str = ""
    texts: list[str] = []
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    output: str = ""


class StoredResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stored response: who may read it (``owner``, empty without auth), its chain link and items."""

    id: str
    created_at: int
    response: msgspec.Raw
    owner: str = ""
    previous_response_id: str | None = None
    input: list[ResponseItem] = []
    output: list[ResponseItem] = []
