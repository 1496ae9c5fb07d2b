"""The edge's fine-tuning surface: OpenAI's ``/v1/files`` and ``/v1/fine_tuning/jobs``, and the
native ``/api/v1/training/*``; registered on the app by ``add_routes`` (scope ``training``, see
``auth_policy``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.edge.training import files as files_api, fine_tuning as fine_tuning_api, native as training_api
from services.edge.state import CONFIG, EDGE
from services.edge.training.store import TRAINING, TrainingStore


async def _store_context(app: web.Application) -> AsyncIterator[None]:
    """Give the handlers a ``TrainingStore`` on the edge's connection (runs after the bus context)."""
    app[TRAINING] = TrainingStore(app[EDGE].nc, publish_timeout=app[CONFIG].publish_timeout,
                                   publish_window=app[CONFIG].publish_retry_window)
    yield


def add_routes(app: web.Application) -> None:
    """Register the training routes and their store; call after the edge's bus context is added."""
    app.cleanup_ctx.append(_store_context)
    r = app.router
    r.add_post("/v1/files", files_api.upload_file)
    r.add_get("/v1/files", files_api.list_files)
    r.add_get("/v1/files/{file_id}", files_api.get_file)
    r.add_get("/v1/files/{file_id}/content", files_api.file_content)
    r.add_delete("/v1/files/{file_id}", files_api.delete_file)
    r.add_post("/v1/fine_tuning/jobs", fine_tuning_api.create_job)
    r.add_get("/v1/fine_tuning/jobs", fine_tuning_api.list_jobs)
    r.add_get("/v1/fine_tuning/jobs/{job_id}", fine_tuning_api.get_job)
    r.add_post("/v1/fine_tuning/jobs/{job_id}/cancel", fine_tuning_api.cancel_job)
    r.add_get("/v1/fine_tuning/jobs/{job_id}/events", fine_tuning_api.list_events)
    r.add_get("/v1/fine_tuning/jobs/{job_id}/checkpoints", fine_tuning_api.list_checkpoints)
    r.add_post("/api/v1/training/start", training_api.start)
    r.add_get("/api/v1/training/jobs", training_api.list_jobs)
    r.add_get("/api/v1/training/status/{job_id}", training_api.status)
    r.add_post("/api/v1/training/{job_id}/cancel", training_api.cancel)
    r.add_get("/api/v1/training/{job_id}/stream", training_api.stream)
