"""The one error mapping, the response formats and the worker-loss sweep, without HTTP or NATS."""

from __future__ import annotations

import json

import pytest

from schemas.errors import BusError, ErrorCode
from schemas.events import StreamError, StreamStart, Usage
from services.edge.errors import error_json, error_response, status_for
from services.edge.openai.bodies import ChatChunkFormatter, CompletionChunkFormatter, chat_completion
from services.edge.bus.replies import ReplyRouter

EXPECTED_STATUS = {
    "invalid_request": 400, "unsupported": 400, "context_length_exceeded": 400, "model_not_found": 404,
    "queue_full": 429, "no_worker_available": 503, "engine_busy": 503, "engine_failed": 502,
    "worker_lost": 502, "timeout": 504, "cancelled": 499, "internal_error": 500,
    "invalid_api_key": 401, "insufficient_scope": 403, "rate_limit_exceeded": 429,
    "not_found": 404, "conflict": 409, "request_too_large": 413, "unavailable": 503, "slow_consumer": 408,
}


def test_every_error_code_has_its_status():
    assert {code.value: status_for(code) for code in ErrorCode} == EXPECTED_STATUS


def test_a_code_from_a_newer_peer_is_a_500_that_keeps_its_code():
    assert status_for("gpu_on_fire") == 500
    body = json.loads(error_json(BusError("gpu_on_fire", "hot")))
    assert body == {"error": {"message": "hot", "type": "server_error", "param": None, "code": "gpu_on_fire"}}


def test_error_body_is_openai_shaped():
    body = json.loads(error_json(BusError(ErrorCode.INVALID_REQUEST, "bad temperature", param="temperature")))
    assert body == {"error": {"message": "bad temperature", "type": "invalid_request_error",
                              "param": "temperature", "code": "invalid_request"}}


@pytest.mark.parametrize(("code", "retry"), [
    (ErrorCode.QUEUE_FULL, "3"), (ErrorCode.NO_WORKER, "3"), (ErrorCode.ENGINE_BUSY, "3"),
    (ErrorCode.INVALID_REQUEST, None), (ErrorCode.TIMEOUT, None), (ErrorCode.WORKER_LOST, None),
])
def test_retry_after_only_on_retryable_answers(code, retry):
    resp = error_response(BusError(code, "x"), retry_after=3)
    assert resp.status == EXPECTED_STATUS[code]
    assert resp.headers.get("Retry-After") == retry
    assert resp.content_type == "application/json"


def test_chat_completion_body():
    body = json.loads(chat_completion(request_id="chatcmpl-1", created=5, model="m", text="hi",
                                      finish_reason="length", usage=Usage(prompt_tokens=2, completion_tokens=1)))
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


@pytest.mark.parametrize("text", ["plain", 'quote " and \\ backslash', "new\nline", "emoji 🦙", "</script>"])
@pytest.mark.parametrize("formatter", [ChatChunkFormatter, CompletionChunkFormatter])
def test_fast_delta_chunks_are_valid_json_for_any_text(formatter, text):
    for include_usage in (True, False):
        fmt = formatter(request_id="id-1", created=1, model='org/"model"', include_usage=include_usage)
        raw = fmt.delta(text)
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
        chunk = json.loads(raw[6:])
        assert (chunk["id"], chunk["model"], chunk["object"]) == ("id-1", 'org/"model"', formatter.object_type)
        got = chunk["choices"][0]["delta"]["content"] if formatter is ChatChunkFormatter else \
            chunk["choices"][0]["text"]
        assert got == text
        assert ("usage" in chunk) == include_usage and chunk.get("usage") is None


async def test_sweep_ends_only_requests_of_dead_engines_after_the_grace():
    router = ReplyRouter("edge-test")
    alive = {"w-ok"}
    on_dead, on_ok, queued = router.register("r1"), router.register("r2"), router.register("r3")
    on_dead.worker, on_ok.worker = "w-dead", "w-ok"
    assert router.sweep_lost_workers(alive.__contains__, now=10.0, grace=1.0) == []  # grace starts
    assert router.sweep_lost_workers(alive.__contains__, now=11.0, grace=1.0) == ["r1"]
    error = on_dead.queue.get_nowait()
    assert isinstance(error, StreamError) and error.code == "worker_lost" and "w-dead" in error.message
    assert on_dead.abandon_reason == "worker_lost"
    assert on_ok.queue.empty() and queued.queue.empty()
    assert router.sweep_lost_workers(alive.__contains__, now=20.0, grace=1.0) == []  # never twice


async def test_a_new_stream_start_resets_the_grace():
    router = ReplyRouter("edge-test")
    pending = router.register("r1")
    pending.worker = "w-dead"
    router.sweep_lost_workers(lambda w: False, now=10.0, grace=1.0)

    class Msg:  # what nats-py hands the callback: subject and data
        subject = "_INBOX.edge-test.r1"
        data = b'{"type": "start", "id": "r1", "worker": "w-new", "model": "m"}'

    await router._on_msg(Msg)
    assert isinstance(pending.queue.get_nowait(), StreamStart)
    assert router.sweep_lost_workers(lambda w: w == "w-new", now=11.5, grace=1.0) == []
