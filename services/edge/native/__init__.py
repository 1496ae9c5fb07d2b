"""The native inference API of the seed documents.

- ``routes``: ``add_routes(app)``, the routes of this folder.
- ``types``: the request bodies accepted.
- ``api``: ``/api/v1/inference`` (JSON and SSE), ``/api/v1/models``, ``/api/v1/health``.
- ``websocket``: ``/api/v1/inference/ws``: many streamed requests over one WebSocket.
"""
