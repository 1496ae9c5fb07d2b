"""The operator surface of the edge.

- ``routes``: ``add_routes(app)``, the routes of this folder.
- ``health``: ``GET /healthz`` (is this edge useful now?) and ``GET /metrics``.
- ``management``: ``/v1/system/*`` and ``/v1/cluster/*``: system and cluster views, strategy switch.
- ``openapi``: ``GET /openapi.json``, the OpenAPI 3.1 description of the HTTP API.
"""
