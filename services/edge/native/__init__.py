"""The native inference API of the seed documents.

- ``routes``: ``add_routes(app)``, the routes of this folder.
- ``types``: the request bodies accepted.
- ``api``: ``/api/v1/inference`` (JSON and SSE), ``/api/v1/models``, ``/api/v1/health``.
- ``answers``: the native answer body and token events, with ``toolCalls`` for requests with tools.
- ``tools``: ``tools`` / ``toolChoice`` / ``parallelToolCalls``, planned by the OpenAI chat's tool code.
- ``websocket``: ``/api/v1/inference/ws``: many streamed requests over one WebSocket.
"""
