"""The edge's OpenAI inference surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``
(create, retrieve, delete, input items), ``/v1/models``
(listing, one model, run-time load and unload) and vLLM's ``/tokenize`` and ``/detokenize``;
registered on the app by ``add_routes``."""

from __future__ import annotations

from aiohttp import web

from services.edge.openai import catalog, completions, model_admin, responses, tokenize


def add_routes(app: web.Application) -> None:
    """Register the OpenAI inference and model routes."""
    r = app.router
    r.add_post("/v1/chat/completions", completions.chat_completions)
    r.add_post("/v1/completions", completions.completions)
    r.add_post("/v1/responses", responses.create_response)
    r.add_get("/v1/responses/{response_id}", responses.retrieve_response)
    r.add_delete("/v1/responses/{response_id}", responses.delete_response)
    r.add_get("/v1/responses/{response_id}/input_items", responses.list_input_items)
    r.add_get("/v1/models", catalog.list_models)
    r.add_post("/v1/models/load", model_admin.load_model)
    r.add_get("/v1/models/{model:.+}", catalog.get_model)
    r.add_delete("/v1/models/{model:.+}", model_admin.unload_model)
    r.add_post("/tokenize", tokenize.tokenize)
    r.add_post("/detokenize", tokenize.detokenize)
