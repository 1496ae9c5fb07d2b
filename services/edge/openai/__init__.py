"""The OpenAI inference surface of the edge.

- ``routes``: ``add_routes(app)``, the routes of this folder.
- ``types``: the request bodies accepted, as msgspec Structs.
- ``translate``: request bodies to ``schemas.InferenceRequest``. Pure.
- ``tools``: ``tools`` / ``tool_choice`` / tool messages into the request (prompt and grammar). Pure.
- ``tool_answers``: tool calls read from the answer: ``message.tool_calls`` and ``delta.tool_calls``. Pure.
- ``completions``: ``POST /v1/chat/completions`` and ``/v1/completions``: validate, resolve, admit, answer.
- ``responses``: ``/v1/responses`` (create, retrieve, delete, input items): a translation of chat completions.
- ``responses_types`` / ``responses_translate``: its request body, and the body as the chat request it means. Pure.
- ``responses_tools``: function tools and calls between the Responses and the chat shapes. Pure.
- ``responses_body`` / ``responses_stream``: the response object, its items and typed SSE events; the pump's writers.
- ``responses_store``: stored responses in KV ``llm_responses`` (per-caller, with a TTL), and conversation chains.
- ``choices``: ``n`` > 1 as ``n`` ordinary requests merged into one event source.
- ``bodies``: response bodies and SSE chunks. Pure.
- ``catalog``: ``GET /v1/models`` and ``/v1/models/{id}``: what live engines serve, fine-tuned models included.
- ``model_admin``: ``POST /v1/models/load`` and ``DELETE /v1/models/{id}`` on engines.
- ``tokenize``: ``POST /tokenize`` and ``/detokenize``, answered by an engine serving the model.
"""
