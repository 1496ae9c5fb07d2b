"""The OpenAI inference surface of the edge.

- ``routes``: ``add_routes(app)``, the routes of this folder.
- ``types``: the request bodies accepted, as msgspec Structs.
- ``translate``: request bodies to ``schemas.InferenceRequest``. Pure.
- ``tools``: ``tools`` / ``tool_choice`` / tool messages into the request (prompt and grammar). Pure.
- ``tool_answers``: tool calls read from the answer: ``message.tool_calls`` and ``delta.tool_calls``. Pure.
- ``completions``: ``POST /v1/chat/completions`` and ``/v1/completions``: validate, resolve, admit, answer.
- ``choices``: ``n`` > 1 as ``n`` ordinary requests merged into one event source.
- ``bodies``: response bodies and SSE chunks. Pure.
- ``catalog``: ``GET /v1/models`` and ``/v1/models/{id}``: what live engines serve, fine-tuned models included.
- ``model_admin``: ``POST /v1/models/load`` and ``DELETE /v1/models/{id}`` on engines.
- ``tokenize``: ``POST /tokenize`` and ``/detokenize``, answered by an engine serving the model.
"""
