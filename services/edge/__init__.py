"""The edge: OpenAI-compatible and native HTTP in front of the NATS JetStream inference queue.

``create_app(config)`` builds the aiohttp application (tests run it in-process);
``python -m services.edge`` serves it. Nothing here is state that must survive the process.

Modules:
- ``app``: builds the application; the bus-side setup and teardown; calls each folder's ``add_routes``.
- ``server``: runs the edge as a process (HTTP site, signals, graceful shutdown).
- ``config``: the one strict configuration Struct, parsed once at start-up.
- ``state``: what handlers share (config, live bus objects) under typed app keys.
- ``errors``: the one place error codes become HTTP statuses and OpenAI error bodies.
- ``middleware``: metrics around every request, every failure as an OpenAI error body.
- ``metrics``: the edge's Prometheus metrics.

Folders:
- ``openai/``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.
- ``native/``: the native ``/api/v1/inference`` API (JSON, SSE, WebSocket).
- ``training/``: ``/v1/files``, ``/v1/fine_tuning/jobs`` and the native ``/api/v1/training/*``.
- ``batch/``: ``/v1/batches`` and the batch runner (batch lines on the low lane).
- ``system/``: health, metrics, OpenAPI, system and cluster views.
- ``auth/``: API keys, JWTs, scopes and rate limits.
- ``bus/``: everything the edge publishes and follows on NATS (requests, replies, heartbeats, cache).
- ``http/``: HTTP plumbing shared by the routes (SSE/JSON answers, CORS, parser refusals, body depth).
"""

from services.edge.app import create_app
from services.edge.config import EdgeConfig, parse_args

__all__ = ["EdgeConfig", "create_app", "parse_args"]
