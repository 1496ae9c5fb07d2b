"""Frozen v1 wire format: bytes a v1 peer sends must keep decoding to the same values.

Each literal below was written once from the encoders of the first v1 release and is never
recomputed: a renamed or removed field, a changed type or a changed default fails here, which
is the point (such a change needs ``llm.v2`` subjects, see STYLE.md). Adding a field with a
default passes. Values decode with the decoders the services use; messages with every field set
also encode back to the same bytes (the encoding is canonical: declaration order, defaults
omitted). Training messages and stored KV values are in ``test_wire_v1_training.py``.
"""

from __future__ import annotations

import inspect

import msgspec
import pytest

import schemas
from schemas import control, events, names
from schemas.control import ControlReply, Detokenize, ListModels, LoadModel, Tokenize, UnloadModel
from schemas.errors import ErrorCode
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, TokenLogprob, TopLogprob, Usage, encode
from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import (CancelRequest, ChatMessage, DispatchReply, InferenceRequest, SamplingParams,
                              StructuredOutput)
from schemas.routing import Strategy
from tests.common import test_wire_v1_training as training
from tests.common.wire_v1 import WireCase, decoder, frozen_fields, struct_types, with_unknown_field

EVENT = events.decode_event

FULL = [
    WireCase("InferenceRequest", decoder(InferenceRequest), (
        b'{"id":"req-1","model":"SmolLM2-135M-Instruct","reply_to":"_INBOX.edge-1.req-1",'
        b'"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi",'
        b'"name":"ann"}],"prompt":"Once","sampling":{"max_tokens":16,"temperature":0.5,"top_p":0.9,'
        b'"top_k":40,"seed":7,"stop":["\\n"],"presence_penalty":0.1,"frequency_penalty":0.2,'
        b'"repetition_penalty":1.1,"n":2,"logprobs":3},"stream":false,"priority":1,'
        b'"deadline":1767225660.5,"created":1767225600.25,"adapter":"sql","user":"u-1",'
        b'"cache":false,"cache_key":"ab12","attempt":1,"continuation":"Hel","probe":true,'
        b'"dispatch":3,"producer_watches":true}'),
        InferenceRequest(
            id="req-1", model="SmolLM2-135M-Instruct", reply_to="_INBOX.edge-1.req-1",
            messages=[ChatMessage(role="system", content="Be brief."),
                      ChatMessage(role="user", content="Hi", name="ann")],
            prompt="Once", sampling=SamplingParams(
                max_tokens=16, temperature=0.5, top_p=0.9, top_k=40, seed=7, stop=["\n"], presence_penalty=0.1,
                frequency_penalty=0.2, repetition_penalty=1.1, n=2, logprobs=3),
            stream=False, priority=1, deadline=1767225660.5, created=1767225600.25, adapter="sql", user="u-1",
            cache=False, cache_key="ab12", attempt=1, continuation="Hel", probe=True, dispatch=3,
            producer_watches=True)),
    WireCase("InferenceRequest with a structured output and logit_bias", decoder(InferenceRequest), (
        b'{"id":"req-2","model":"m","reply_to":"_INBOX.edge-1.req-2","prompt":"Once",'
        b'"sampling":{"logit_bias":{"42":-100.0}},"structured":{"kind":"json_schema",'
        b'"json":"{\\"type\\":\\"object\\"}","choice":["a"]}}'),
        InferenceRequest(id="req-2", model="m", reply_to="_INBOX.edge-1.req-2", prompt="Once",
                         sampling=SamplingParams(logit_bias={42: -100.0}),
                         structured=StructuredOutput(kind="json_schema", json='{"type":"object"}', choice=["a"]))),
    WireCase("InferenceRequest admitted for an API key's NATS producer", decoder(InferenceRequest), (
        b'{"id":"req-3","model":"m","reply_to":"_INBOX.k1.req-3","prompt":"Once","sampling":{},"rate_caller":"key-k1"}'),
        InferenceRequest(id="req-3", model="m", reply_to="_INBOX.k1.req-3", prompt="Once", rate_caller="key-k1")),
    WireCase("StreamStart", EVENT, (
        b'{"type":"start","id":"req-1","worker":"engine-1","model":"SmolLM2-135M-Instruct",'
        b'"prompt_tokens":12,"dispatch":3}'),
        StreamStart(id="req-1", worker="engine-1", model="SmolLM2-135M-Instruct", prompt_tokens=12, dispatch=3)),
    WireCase("TokenDelta", EVENT, (
        b'{"type":"delta","id":"req-1","seq":1,"text":"Hello","token_ids":[19556],"index":1,'
        b'"logprobs":[{"token_id":19556,"token":"Hello","logprob":-0.25,"top":[{"token_id":19556,'
        b'"token":"Hello","logprob":-0.25},{"token_id":28120,"token":"Hi","logprob":-1.5}]}],'
        b'"dispatch":3}'),
        TokenDelta(id="req-1", seq=1, text="Hello", token_ids=[19556], index=1, dispatch=3, logprobs=[
            TokenLogprob(token_id=19556, token="Hello", logprob=-0.25, top=[
                TopLogprob(token_id=19556, token="Hello", logprob=-0.25),
                TopLogprob(token_id=28120, token="Hi", logprob=-1.5)])])),
    WireCase("StreamEnd", EVENT, (
        b'{"type":"end","id":"req-1","seq":2,"finish_reason":"length","usage":{"prompt_tokens":12,'
        b'"completion_tokens":16,"cached_tokens":8},"index":1,"cached":true,"dispatch":3}'),
        StreamEnd(id="req-1", seq=2, finish_reason="length", index=1, cached=True, dispatch=3,
                  usage=Usage(prompt_tokens=12, completion_tokens=16, cached_tokens=8))),
    WireCase("StreamError", EVENT, (
        b'{"type":"error","id":"req-1","code":"context_length_exceeded",'
        b'"message":"prompt too long","seq":2,"param":"messages","dispatch":3}'),
        StreamError(id="req-1", code="context_length_exceeded", message="prompt too long", seq=2, param="messages",
                    dispatch=3)),
    WireCase("DispatchReply", decoder(DispatchReply), (
        b'{"accepted":false,"worker":"engine-1","in_flight":8,"slots":8,"status_seq":43,'
        b'"code":"engine_busy","message":"all slots busy"}'),
        DispatchReply(accepted=False, worker="engine-1", in_flight=8, slots=8, status_seq=43, code="engine_busy",
                      message="all slots busy")),
    WireCase("CancelRequest", decoder(CancelRequest), b'{"id":"req-1","reason":"dispatch_timeout","dispatch":3}',
             CancelRequest(id="req-1", reason="dispatch_timeout", dispatch=3)),
    WireCase("EngineHeartbeat", decoder(EngineHeartbeat), (
        b'{"worker":"engine-1","engine":"transformers","device":"cuda:0",'
        b'"models":[{"id":"SmolLM2-135M-Instruct","context_length":8192,"aliases":["smol"],'
        b'"owned_by":"acme","memory_bytes":270000000,"in_flight":1,"adapters":["sql"]}],"slots":8,'
        b'"in_flight":1,"seq":42,"ts":1767225600.5,"interval":2.0,"adapters":["sql"],'
        b'"draining":true,"memory_bytes":300000000,"pid":4242,"host":"gpu-host-1",'
        b'"started":1767225000.25,"engine_reason":"warming","weight":2.5,"max_models":2,'
        b'"memory_budget":8000000000}'),
        EngineHeartbeat(
            worker="engine-1", engine="transformers", device="cuda:0",
            models=[ServedModel(id="SmolLM2-135M-Instruct", context_length=8192, aliases=["smol"], owned_by="acme",
                                memory_bytes=270000000, in_flight=1, adapters=["sql"])],
            slots=8, in_flight=1, seq=42, ts=1767225600.5, interval=2.0, adapters=["sql"], draining=True,
            memory_bytes=300000000, pid=4242, host="gpu-host-1", started=1767225000.25, engine_reason="warming",
            weight=2.5, max_models=2, memory_budget=8000000000)),
    WireCase("EngineHeartbeat with its decode speed", decoder(EngineHeartbeat), (
        b'{"worker":"engine-2","engine":"llamacpp","device":"cpu","models":[{"id":"m"}],"slots":4,'
        b'"in_flight":1,"seq":3,"ts":1767225600.5,"tokens_per_second":87.5}'),
        EngineHeartbeat(worker="engine-2", engine="llamacpp", device="cpu", models=[ServedModel(id="m")], slots=4,
                        in_flight=1, seq=3, ts=1767225600.5, tokens_per_second=87.5)),
    WireCase("LoadModel", control.decode_command, b'{"type":"load","model":"smol"}', LoadModel(model="smol")),
    WireCase("UnloadModel", control.decode_command, b'{"type":"unload","model":"smol"}', UnloadModel(model="smol")),
    WireCase("ListModels", control.decode_command, b'{"type":"list"}', ListModels()),
    WireCase("ControlReply", control.decode_reply, (
        b'{"ok":false,"worker":"engine-1","model":"SmolLM2-135M-Instruct","evicted":["old-model"],'
        b'"models":[{"id":"SmolLM2-135M-Instruct"}],"memory_bytes":270000000,"load_seconds":1.5,'
        b'"heartbeat":{"worker":"engine-1","engine":"transformers","device":"cpu","models":[],'
        b'"slots":4,"in_flight":0,"seq":7,"ts":1767225600.5},"code":"unavailable",'
        b'"message":"no room"}'),
        ControlReply(ok=False, worker="engine-1", model="SmolLM2-135M-Instruct", evicted=["old-model"],
                     models=[ServedModel(id="SmolLM2-135M-Instruct")], memory_bytes=270000000, load_seconds=1.5,
                     heartbeat=EngineHeartbeat(worker="engine-1", engine="transformers", device="cpu", models=[],
                                               slots=4, in_flight=0, seq=7, ts=1767225600.5),
                     code="unavailable", message="no room")),
    WireCase("Tokenize", control.decode_command, (
        b'{"type":"tokenize","model":"smol","prompt":"Once","messages":[{"role":"user","content":"Hi"}],'
        b'"add_generation_prompt":false}'),
        Tokenize(model="smol", prompt="Once", messages=[ChatMessage(role="user", content="Hi")],
                 add_generation_prompt=False)),
    WireCase("Detokenize", control.decode_command, b'{"type":"detokenize","model":"smol","tokens":[1,9690,2]}',
             Detokenize(model="smol", tokens=[1, 9690, 2])),
    WireCase("ControlReply to tokenize and detokenize", control.decode_reply, (
        b'{"ok":true,"worker":"engine-1","model":"SmolLM2-135M-Instruct","tokens":[1,9690,2],'
        b'"max_model_len":8192,"prompt":"<|im_start|>system"}'),
        ControlReply(ok=True, worker="engine-1", model="SmolLM2-135M-Instruct", tokens=[1, 9690, 2],
                     max_model_len=8192, prompt="<|im_start|>system")),
    WireCase("ControlReply refusing a field", control.decode_reply, (
        b'{"ok":false,"worker":"engine-1","code":"invalid_request","message":"token 99999 is outside",'
        b'"param":"tokens"}'),
        ControlReply(ok=False, worker="engine-1", code="invalid_request", message="token 99999 is outside",
                     param="tokens")),
]

_SERVED_DEFAULTS = {"context_length": 0, "aliases": [], "owned_by": "cy-llm", "memory_bytes": 0, "in_flight": 0,
                    "adapters": []}
MINIMAL = [
    WireCase("InferenceRequest", decoder(InferenceRequest),
             b'{"id":"req-2","model":"m","reply_to":"_INBOX.p.req-2","prompt":"Once","sampling":{}}',
             {"id": "req-2", "model": "m", "reply_to": "_INBOX.p.req-2", "messages": None, "prompt": "Once",
              "sampling": {"max_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": [],
                           "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "n": 1,
                           "logprobs": None},
              "stream": True, "priority": 0, "deadline": 0.0, "created": 0.0, "adapter": None, "user": None,
              "cache": True, "cache_key": None, "attempt": 0, "continuation": "", "probe": False, "dispatch": 0,
              "producer_watches": False}),
    WireCase("TokenDelta", EVENT, b'{"type":"delta","id":"req-2","seq":1,"text":"x"}',
             {"id": "req-2", "seq": 1, "text": "x", "token_ids": [], "index": 0, "logprobs": [], "dispatch": 0}),
    WireCase("StreamEnd", EVENT, (
        b'{"type":"end","id":"req-2","seq":2,"finish_reason":"stop","usage":{"prompt_tokens":1,'
        b'"completion_tokens":1}}'),
        {"id": "req-2", "seq": 2, "finish_reason": "stop",
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}, "index": 0, "cached": False,
         "dispatch": 0}),
    WireCase("StreamError", EVENT, b'{"type":"error","id":"req-2","code":"timeout","message":"deadline passed"}',
             {"id": "req-2", "code": "timeout", "message": "deadline passed", "seq": 0, "param": None, "dispatch": 0}),
    WireCase("DispatchReply", decoder(DispatchReply), b'{"accepted":true,"worker":"engine-1"}',
             {"accepted": True, "worker": "engine-1", "in_flight": 0, "slots": 0, "status_seq": 0, "code": None,
              "message": None}),
    WireCase("Tokenize", control.decode_command, b'{"type":"tokenize","model":"m","prompt":"x"}',
             {"model": "m", "prompt": "x", "messages": None, "add_generation_prompt": True}),
    WireCase("CancelRequest", decoder(CancelRequest), b'{"id":"req-2"}',
             {"id": "req-2", "reason": "cancelled", "dispatch": 0}),
    WireCase("EngineHeartbeat", decoder(EngineHeartbeat), (
        b'{"worker":"engine-1","engine":"llamacpp","device":"cpu","models":[{"id":"m"}],"slots":1,'
        b'"in_flight":0,"seq":1,"ts":1767225600.5}'),
        {"worker": "engine-1", "engine": "llamacpp", "device": "cpu", "models": [{"id": "m", **_SERVED_DEFAULTS}],
         "slots": 1, "in_flight": 0, "seq": 1, "ts": 1767225600.5, "interval": 1.0, "adapters": [],
         "draining": False, "memory_bytes": 0, "pid": 0, "host": "", "started": 0.0, "engine_reason": "",
         "weight": 1.0, "max_models": 0, "memory_budget": 0}),
]


def _ids(cases: list[WireCase]) -> list[str]:
    return [case.name for case in cases]


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_v1_bytes_decode_to_the_same_message(case: WireCase):
    decoded = case.decode(case.wire)
    assert type(decoded) is type(case.expected)
    assert decoded == case.expected


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_the_message_encodes_to_the_same_v1_bytes(case: WireCase):
    assert encode(case.expected) == case.wire


@pytest.mark.parametrize("case", MINIMAL, ids=_ids(MINIMAL))
def test_fields_a_v1_sender_left_out_keep_their_v1_defaults(case: WireCase):
    decoded = case.decode(case.wire)
    assert frozen_fields(decoded, case.expected) == case.expected
    assert encode(decoded) == case.wire


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_a_field_added_by_a_newer_peer_is_ignored(case: WireCase):
    assert case.decode(with_unknown_field(case.wire)) == case.expected


def test_every_wire_struct_of_schemas_has_frozen_bytes():
    # A new message type in schemas/ gets its literal here (or in the training file) the day it ships.
    modules = [m for m in vars(schemas).values() if inspect.ismodule(m) and m.__name__.startswith("schemas.")]
    declared = {obj for m in modules for obj in vars(m).values()
                if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__ == m.__name__}
    assert len(modules) >= 10 and InferenceRequest in declared
    covered = set().union(*(struct_types(case.expected) for case in FULL + training.FULL))
    assert not declared - covered, f"no frozen v1 bytes for {sorted(t.__name__ for t in declared - covered)}"


def test_v1_subjects_and_string_vocabularies_keep_their_values():
    # Codes and names travel as plain strings: a new one may be added, none may change.
    assert {"invalid_request", "model_not_found", "context_length_exceeded", "unsupported", "no_worker_available",
            "engine_busy", "engine_failed", "worker_lost", "queue_full", "timeout", "cancelled", "internal_error",
            "invalid_api_key", "insufficient_scope", "rate_limit_exceeded", "not_found", "conflict",
            "request_too_large", "unavailable"} <= {code.value for code in ErrorCode}
    assert {"least_connections", "round_robin", "weighted", "random", "response_time",
            "prefix_affinity"} <= {s.value for s in Strategy}
    assert [lane.value for lane in names.LANES_BY_PRIORITY] == ["high", "normal", "low"]
    assert [names.infer_submit(lane) for lane in names.LANES_BY_PRIORITY] == [
        "llm.v1.infer.submit.high", "llm.v1.infer.submit.normal", "llm.v1.infer.submit.low"]
    assert (names.INFER_STREAM, names.INFER_CANCEL, names.TRAIN_SUBMIT, names.TRAIN_CANCEL) == (
        "LLM_INFER", "llm.v1.infer.cancel", "llm.v1.train.submit", "llm.v1.train.cancel")
    assert (names.engine_generate("w1"), names.engine_cancel("w1"), names.engine_control("w1")) == (
        "llm.v1.engine.w1.generate", "llm.v1.engine.w1.cancel", "llm.v1.engine.w1.control")
    assert (names.worker_status("w1"), names.ENGINE_CONTROL_ALL, names.train_job_events("ftjob-1")) == (
        "llm.v1.workers.status.w1", "llm.v1.engine.all.control", "llm.v1.train.job.ftjob-1.event")
    assert (names.BATCH_STREAM, names.BATCH_START, names.batch_lines("batch_1"), names.BATCHES_BUCKET) == (
        "LLM_BATCH", "llm.v1.batch.start", "llm.v1.batch.line.batch_1", "llm_batches")
    assert names.batch_outcome_key("batch_1", "ok", 7) == "batch_1.ok.7"
    assert names.scheduler_durable("high") == "schedulers_high" and names.TRAIN_DURABLE == "trainers"
    assert (names.WORKERS_BUCKET, names.PROMPT_CACHE_BUCKET, names.MODELS_BUCKET, names.TRAIN_JOBS_BUCKET) == (
        "llm_workers", "llm_prompt_cache", "llm_models", "llm_train_jobs")
