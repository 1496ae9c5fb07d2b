"""``GET /openapi.json``: an OpenAPI 3.1 description of the edge's HTTP API.

Request bodies are generated from the msgspec Structs the edge decodes them with, so the
document cannot drift from what is accepted; response shapes are written here, next to the
route list. ``tests/edge/test_edge_openapi.py`` checks every documented route exists, every
inference, model and management route is documented, and (with schemathesis) that answers
to generated requests conform.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from schemas.routing import Strategy
from services.edge.errors import ErrorBody
from services.edge.batch.routes import BatchCreateBody
from services.edge.openai.model_admin import LoadBody
from services.edge.openai.tokenize import DetokenizeBody, TokenizeBody
from services.edge.native.types import NativeInferenceBody
from services.edge.openai.responses_types import ResponsesBody
from services.edge.openai.types import ChatCompletionBody, CompletionBody
from services.edge.training.types import FineTuningJobBody, NativeStartBody

TITLE = "CY-LLM edge"
VERSION = "0.1.0"
_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, **({"required": required} if required else {})}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_USAGE = _obj(["prompt_tokens", "completion_tokens", "total_tokens"], prompt_tokens=_INT,
              completion_tokens=_INT, total_tokens=_INT,
              prompt_tokens_details=_obj(["cached_tokens"], cached_tokens=_INT))
_NATIVE_USAGE = _obj(["promptTokens", "completionTokens", "totalTokens"], promptTokens=_INT,
                     completionTokens=_INT, totalTokens=_INT)
_ANY_OBJECT = {"type": "object"}
_NUMBER = {"type": "number"}
_BYTES = {"type": ["array", "null"], "items": _INT}
_TOP_LOGPROB = _obj(["token", "logprob", "bytes"], token=_STR, logprob=_NUMBER, bytes=_BYTES)
# ``logprobs`` of a choice: null unless the request asked for them.
_CHAT_LOGPROBS = {"anyOf": [{"type": "null"}, _obj(["content"], content={"type": "array", "items": _obj(
    ["token", "logprob", "bytes", "top_logprobs"], token=_STR, logprob=_NUMBER, bytes=_BYTES,
    top_logprobs={"type": "array", "items": _TOP_LOGPROB})})]}
_COMPLETION_LOGPROBS = {"anyOf": [{"type": "null"}, _obj(
    ["tokens", "token_logprobs", "top_logprobs", "text_offset"], tokens={"type": "array", "items": _STR},
    token_logprobs={"type": "array", "items": _NUMBER},
    top_logprobs={"type": "array", "items": {"type": "object", "additionalProperties": _NUMBER}},
    text_offset={"type": "array", "items": _INT})]}

# Response schemas written by hand (the edge builds these bodies with msgspec from dicts).
_RESPONSES: dict[str, Any] = {
    "Usage": _USAGE,
    "ChatCompletion": _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR,
                           object={"const": "chat.completion"}, created=_INT, model=_STR, usage=_ref("Usage"),
                           choices={"type": "array", "items": _obj(
                               ["index", "message", "finish_reason"], index=_INT, finish_reason=_NULLABLE_STR,
                               logprobs=_CHAT_LOGPROBS,
                               message=_obj(["role", "content"], role=_STR, content=_NULLABLE_STR))}),
    "TextCompletion": _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR,
                           object={"const": "text_completion"}, created=_INT, model=_STR, usage=_ref("Usage"),
                           choices={"type": "array", "items": _obj(["text", "index", "finish_reason"], text=_STR,
                                                                   index=_INT, finish_reason=_NULLABLE_STR,
                                                                   logprobs=_COMPLETION_LOGPROBS)}),
    "Response": _obj(["id", "object", "created_at", "status", "model", "output"], id=_STR,
                     object={"const": "response"}, created_at=_INT, model=_STR, previous_response_id=_NULLABLE_STR,
                     status={"enum": ["completed", "incomplete", "failed", "in_progress"]},
                     output={"type": "array", "items": _ANY_OBJECT}, usage={"anyOf": [{"type": "null"}, _obj(
                         ["input_tokens", "output_tokens", "total_tokens"], input_tokens=_INT, output_tokens=_INT,
                         total_tokens=_INT)]}),
    "ResponseDeleted": _obj(["id", "object", "deleted"], id=_STR, object={"const": "response"},
                            deleted={"type": "boolean"}),
    "ResponseItemList": _obj(["object", "data", "has_more"], object={"const": "list"}, has_more={"type": "boolean"},
                             data={"type": "array", "items": _obj(["id", "type"], id=_STR, type=_STR)},
                             first_id=_NULLABLE_STR, last_id=_NULLABLE_STR),
    "Model": _obj(["id", "object", "created", "owned_by"], id=_STR, object={"const": "model"}, created=_INT,
                  owned_by=_STR),
    "ModelList": _obj(["object", "data"], object={"const": "list"}, data={"type": "array", "items": _ref("Model")}),
    "NativeInference": _obj(["requestId", "modelId", "created", "text", "finishReason", "usage"], requestId=_STR,
                            modelId=_STR, created=_INT, text=_STR, finishReason=_STR, usage=_NATIVE_USAGE),
    "NativeModelList": _obj(["models"], models={"type": "array", "items": _obj(
        ["modelId", "contextLength", "aliases", "engines"], modelId=_STR, contextLength={"type": ["integer", "null"]},
        aliases={"type": "array", "items": _STR}, engines=_INT)}),
    "Health": _obj(["status", "nats", "engines", "models", "in_flight", "edge_id"], status=_STR, nats=_STR,
                   engines=_INT, models={"type": "array", "items": _STR}, in_flight=_INT, edge_id=_STR,
                   engineDetails={"type": "array", "items": _ANY_OBJECT}),
    "StrategyBody": _obj(["strategy"], strategy={"type": "string", "examples": [s.value for s in Strategy]}),
    "ModelLoaded": _obj(["object", "model", "worker", "evicted", "load_seconds", "models"],
                        object={"const": "model.load"}, model=_STR, worker=_STR,
                        evicted={"type": "array", "items": _STR}, load_seconds={"type": "number"},
                        models={"type": "array", "items": _STR}),
    "ModelDeleted": _obj(["id", "object", "deleted", "workers", "errors"], id=_STR, object={"const": "model"},
                         deleted={"type": "boolean"}, workers={"type": "array", "items": _STR},
                         errors={"type": "array", "items": _obj(["code", "message"], code=_STR, message=_STR)}),
    "Tokenized": _obj(["tokens", "count", "max_model_len"], tokens={"type": "array", "items": _INT}, count=_INT,
                      max_model_len=_INT),
    "Detokenized": _obj(["prompt"], prompt=_STR),
    # Fine-tuning (OpenAI's shapes; the job object also carries the peft/progress extensions).
    "FileObject": _obj(["id", "object", "bytes", "created_at", "filename", "purpose"], id=_STR,
                       object={"const": "file"}, bytes=_INT, created_at=_INT, filename=_STR, purpose=_STR),
    "FileDeleted": _obj(["id", "object", "deleted"], id=_STR, object={"const": "file"}, deleted={"type": "boolean"}),
    "FineTuningJob": _obj(["id", "object", "created_at", "model", "status", "training_file"], id=_STR,
                          object={"const": "fine_tuning.job"}, created_at=_INT, model=_STR, training_file=_STR,
                          fine_tuned_model=_NULLABLE_STR, status={"enum": [
                              "validating_files", "queued", "running", "succeeded", "failed", "cancelled"]}),
    "FineTuningEvent": _obj(["id", "object", "created_at", "level", "message"], id=_STR,
                            object={"const": "fine_tuning.job.event"}, created_at=_INT, level=_STR, message=_STR),
    "FineTuningCheckpoint": _obj(["id", "object", "created_at", "fine_tuning_job_id", "step_number"], id=_STR,
                                 object={"const": "fine_tuning.job.checkpoint"}, created_at=_INT,
                                 fine_tuning_job_id=_STR, step_number=_INT),
    "Batch": _obj(["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
                   "request_counts"], id=_STR, object={"const": "batch"}, endpoint=_STR, input_file_id=_STR,
                  completion_window=_STR, created_at=_INT, output_file_id=_NULLABLE_STR,
                  error_file_id=_NULLABLE_STR, status={"enum": ["validating", "failed", "in_progress", "finalizing",
                                                                "completed", "expired", "cancelling", "cancelled"]},
                  request_counts=_obj(["total", "completed", "failed"], total=_INT, completed=_INT, failed=_INT)),
    "NativeTrainingStatus": _obj(["jobId", "status", "baseModel", "step", "totalSteps", "percent"], jobId=_STR,
                                 status=_STR, baseModel=_STR, step=_INT, totalSteps=_INT, percent={"type": "number"}),
}


def _list_of(item: str) -> dict[str, Any]:
    return _obj(["object", "data"], object={"const": "list"}, data={"type": "array", "items": _ref(item)},
                has_more={"type": "boolean"})

_RATE_HEADERS = {name: {"description": desc, "schema": _STR} for name, desc in (
    ("x-ratelimit-limit-requests", "requests per minute allowed (when --rate-rpm or the key sets one)"),
    ("x-ratelimit-remaining-requests", "requests left in this minute"),
    ("x-ratelimit-reset-requests", "time until the request budget resets, e.g. 17s"),
    ("x-ratelimit-limit-tokens", "tokens per minute allowed"),
    ("x-ratelimit-remaining-tokens", "tokens left in this minute"),
    ("x-ratelimit-reset-tokens", "time until the token budget resets"))}


def _json(schema: dict[str, Any], description: str, headers: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_ERROR = _json(_ref("ErrorBody"), "an OpenAI error body: 400 invalid (also a malformed HTTP request), "
               "401/403 credentials, 404 unknown model or route, 405 wrong method, 413 body too large, "
               "431 request line or headers too large, 429 rate limit or full queue (Retry-After), "
               "503 no engine, 504 timeout")
# For text/event-stream, ``schema`` describes one event (OpenAPI 3.2's reading of 3.1, as schemathesis
# validates it): its ``data`` is a JSON chunk or the closing ``[DONE]``.
_SSE = {"text/event-stream": {"schema": _obj(["data"], data=_STR, event=_STR, id=_STR, retry=_INT)}}


def _op(summary: str, ok: dict[str, Any], *, body: str | None = None, scope: str | None = "inference",
        tag: str = "inference") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {"200": ok, "default": _ERROR}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if scope is None:
        op["security"] = []
    else:
        op["description"] = f"Needs the '{scope}' scope when authentication is on."
    return op


def _streamable(schema: str, description: str) -> dict[str, Any]:
    ok = _json(_ref(schema), description + "; with \"stream\": true, server-sent events ending with "
               "'data: [DONE]'", _RATE_HEADERS)
    ok["content"].update(_SSE)
    return ok


def _paths() -> dict[str, dict[str, Any]]:
    health = _json(_ref("Health"), "this edge is connected and accepting (503 with the same body otherwise)")
    any_json = _json(_ANY_OBJECT, "a JSON object")
    stream_ok = {"description": "server-sent events {requestId, token}, then {requestId, finishReason, usage, "
                                "done: true}, then 'data: [DONE]'", "content": _SSE, "headers": _RATE_HEADERS}
    return {
        "/v1/chat/completions": {"post": _op("Chat completion (OpenAI)", _streamable("ChatCompletion", "a chat "
                                                                                     "completion"),
                                             body="ChatCompletionBody")},
        "/v1/completions": {"post": _op("Text completion (OpenAI, legacy)", _streamable("TextCompletion", "a text "
                                                                                        "completion"),
                                        body="CompletionBody")},
        **_responses_paths(),
        "/tokenize": {"post": _op("Token ids of a prompt or chat as the model sees them (vLLM)", _json(
            _ref("Tokenized"), "the token ids, their count and the model's context length"), body="TokenizeBody")},
        "/detokenize": {"post": _op("The text of token ids (vLLM)", _json(_ref("Detokenized"), "the text"),
                                    body="DetokenizeBody")},
        "/v1/models": {"get": _op("Models live engines serve", _json(_ref("ModelList"), "the model list"))},
        "/v1/models/load": {"post": _op("Load a registered model on an engine (the named worker, else the best "
                                        "one)", _json(_ref("ModelLoaded"), "the model is served"), body="LoadBody",
                                        scope="admin", tag="management")},
        "/v1/models/{model}": {
            "get": {**_op("One model by id or alias", _json(_ref("Model"), "the model")),
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STR}]},
            "delete": {**_op("Unload a model from every engine serving it (or from ?worker=)",
                             _json(_ref("ModelDeleted"), "the engines that unloaded it"), scope="admin",
                             tag="management"),
                       "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STR},
                                      {"name": "worker", "in": "query", "required": False, "schema": _STR}]}},
        "/api/v1/inference": {"post": _op("Native inference, one JSON answer", _json(
            _ref("NativeInference"), "the whole answer", _RATE_HEADERS), body="NativeInferenceBody")},
        "/api/v1/inference/stream": {"post": _op("Native inference over SSE", stream_ok, body="NativeInferenceBody")},
        "/api/v1/inference/ws": {"get": {
            **_op("Native inference over a WebSocket (many requests per socket)",
                  {"description": "not a WebSocket upgrade request"}),
            "description": "Upgrade to a WebSocket. Send NativeInferenceBody frames with an optional 'id' "
                           "and 'idempotencyKey' (the Idempotency-Key of /api/v1/inference/stream); "
                           "receive {requestId, id, token} frames, then {requestId, id, finishReason, usage, "
                           "done: true}; {\"type\": \"cancel\", \"id\"} cancels; errors are {id, requestId, "
                           "error} frames. Needs the 'inference' scope when authentication is on.",
            "responses": {"101": {"description": "switching to the WebSocket protocol"}, "default": _ERROR}}},
        "/api/v1/models": {"get": _op("Models (native)", _json(_ref("NativeModelList"), "the models"))},
        "/api/v1/health": {"get": {
            **_op("Health (native); ?detail=true adds engine details", health, scope=None, tag="health"),
            "parameters": [{"name": "detail", "in": "query", "required": False, "schema": _STR}]}},
        "/healthz": {"get": _op("Health of this edge", health, scope=None, tag="health")},
        "/metrics": {"get": _op("Prometheus metrics", {"description": "Prometheus text exposition",
                                                       "content": {"text/plain": {"schema": _STR}}},
                                scope=None, tag="health")},
        "/openapi.json": {"get": _op("This document", _json(_ANY_OBJECT, "OpenAPI 3.1"), scope=None, tag="health")},
        "/v1/system/health": {"get": _op("Detailed health", health, scope="admin", tag="management")},
        "/v1/system/status": {"get": _op("This edge's status", any_json, scope="admin", tag="management")},
        "/v1/system/metrics": {"get": _op("This edge's metrics as JSON", any_json, scope="admin", tag="management")},
        "/v1/cluster/status": {"get": _op("Engines, models, strategy and queue depth", any_json, scope="admin",
                                          tag="management")},
        "/v1/cluster/strategy": {"post": _op("Switch every scheduler's routing strategy", _json(
            _ref("StrategyBody"), "the strategy now active"), body="StrategyBody", scope="admin", tag="management")},
        **_training_paths(),
        **_batch_paths(),
    }


def _batch_paths() -> dict[str, dict[str, Any]]:
    batch = _json(_ref("Batch"), "the batch")
    return {
        "/v1/batches": {
            "post": _op("Create a batch of an uploaded file (purpose batch); its lines run on the low lane", batch,
                        body="BatchCreateBody", tag="batch"),
            "get": {**_op("Batches, newest first", _json(_list_of("Batch"), "the batches"), tag="batch"),
                    "parameters": _paged("")}},
        "/v1/batches/{batch_id}": {"get": {**_op("One batch, with its live counts", batch, tag="batch"),
                                           "parameters": _path_param("batch_id")}},
        "/v1/batches/{batch_id}/cancel": {"post": {**_op("Cancel a batch (lines already done are kept)", batch,
                                                         tag="batch"), "parameters": _path_param("batch_id")}},
    }


def _responses_paths() -> dict[str, dict[str, Any]]:
    ok = _json(_ref("Response"), "the response object; with \"stream\": true, typed server-sent events "
               "(event: response.created ... response.completed), each with its sequence_number", _RATE_HEADERS)
    ok["content"].update(_SSE)
    stored = _json(_ref("Response"), "the stored response (404 if it was not stored, was deleted, expired, or "
                   "another caller created it)")
    query = [{"name": name, "in": "query", "required": False, "schema": _STR} for name in ("order", "after")]
    return {
        "/v1/responses": {"post": _op("Create a response (OpenAI Responses API)", ok, body="ResponsesBody")},
        "/v1/responses/{response_id}": {
            "get": {**_op("A stored response", stored), "parameters": _path_param("response_id")},
            "delete": {**_op("Delete a stored response", _json(_ref("ResponseDeleted"), "deleted")),
                       "parameters": _path_param("response_id")}},
        "/v1/responses/{response_id}/input_items": {"get": {
            **_op("A stored response's input items, newest first unless order=asc",
                  _json(_ref("ResponseItemList"), "the items")),
            "parameters": _path_param("response_id") + query + [
                {"name": "limit", "in": "query", "required": False, "schema": _INT}]}},
    }


def _path_param(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": _STR}]


def _paged(name: str) -> list[dict[str, Any]]:
    return [{"name": "after", "in": "query", "required": False, "schema": _STR},
            {"name": "limit", "in": "query", "required": False, "schema": _INT}] + (_path_param(name) if name else [])


def _training_op(summary: str, ok: dict[str, Any], params: list | None = None, body: str | None = None,
                 ) -> dict[str, Any]:
    op = _op(summary, ok, body=body, scope="training", tag="fine-tuning")
    if params:
        op["parameters"] = params
    return op


def _training_paths() -> dict[str, dict[str, Any]]:
    job = _json(_ref("FineTuningJob"), "the job")
    native = _json(_ref("NativeTrainingStatus"), "the job's status")
    upload = _training_op("Upload a training file (purpose fine-tune) or a batch's input (purpose batch)", _json(_ref("FileObject"), "the file"))
    upload["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _obj(
        ["file", "purpose"], file={"type": "string", "contentMediaType": "application/octet-stream"},
        purpose={"type": "string", "enum": ["fine-tune", "batch"]})}}}
    return {
        "/v1/files": {"post": upload,
                      "get": _training_op("Uploaded files", _json(_list_of("FileObject"), "the files"), [
                          {"name": "purpose", "in": "query", "required": False, "schema": _STR}] + _paged(""))},
        "/v1/files/{file_id}": {
            "get": _training_op("One file", _json(_ref("FileObject"), "the file"), _path_param("file_id")),
            "delete": _training_op("Delete a file", _json(_ref("FileDeleted"), "deleted"), _path_param("file_id"))},
        "/v1/files/{file_id}/content": {"get": _training_op("A file's bytes", {
            "description": "the file as uploaded", "content": {"application/octet-stream": {"schema": _STR}}},
            _path_param("file_id"))},
        "/v1/fine_tuning/jobs": {
            "post": _training_op("Create a fine-tuning job (OpenAI; extensions peft, extra_hyperparameters)", job,
                                 body="FineTuningJobBody"),
            "get": _training_op("Fine-tuning jobs, newest first", _json(_list_of("FineTuningJob"), "the jobs"),
                                _paged(""))},
        "/v1/fine_tuning/jobs/{job_id}": {"get": _training_op("One job", job, _path_param("job_id"))},
        "/v1/fine_tuning/jobs/{job_id}/cancel": {"post": _training_op("Cancel a job", job, _path_param("job_id"))},
        "/v1/fine_tuning/jobs/{job_id}/events": {"get": _training_op(
            "A job's events, newest first", _json(_list_of("FineTuningEvent"), "the events"), _paged("job_id"))},
        "/v1/fine_tuning/jobs/{job_id}/checkpoints": {"get": _training_op(
            "A job's checkpoints", _json(_list_of("FineTuningCheckpoint"), "the checkpoints"), _paged("job_id"))},
        "/api/v1/training/start": {"post": _training_op("Start a job (native; camelCase or snake_case)", native,
                                                        body="NativeStartBody")},
        "/api/v1/training/jobs": {"get": _training_op("Jobs (native)", _json(_ANY_OBJECT, "the jobs"), [
            {"name": "status", "in": "query", "required": False, "schema": _STR}])},
        "/api/v1/training/status/{job_id}": {"get": _training_op("A job's status (native)", native,
                                                                  _path_param("job_id"))},
        "/api/v1/training/{job_id}/cancel": {"post": _training_op("Cancel a job (native)", native,
                                                                  _path_param("job_id"))},
        "/api/v1/training/{job_id}/stream": {"get": _training_op("A job's events live over SSE", {
            "description": "server-sent events, one per job event, ending when the job ends", "content": _SSE},
            _path_param("job_id"))},
    }


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once per process)."""
    _, components = msgspec.json.schema_components(
        (ChatCompletionBody, CompletionBody, ResponsesBody, NativeInferenceBody, ErrorBody, FineTuningJobBody,
         NativeStartBody, LoadBody, TokenizeBody, DetokenizeBody, BatchCreateBody),
        ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "OpenAI-compatible and native LLM inference in front of NATS JetStream."},
        "paths": _paths(),
        "components": {
            "schemas": {**components, **_RESPONSES},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API key (cy-...) or a JWT"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


_DOCUMENT = msgspec.json.encode(build_document())


async def serve_document(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.Response(body=_DOCUMENT, content_type="application/json")
