"""Frozen v1 wire format of fine-tuning messages and of the values kept in KV buckets.

Same rules as ``test_wire_v1.py``: the literals were written once from the first v1 encoders and
are never recomputed. KV values are wire too: a bucket written by an older release (a job's
state, a cached response, an API key) must still read back after an upgrade.
"""

from __future__ import annotations

import msgspec
import pytest


from schemas.auth import ApiKeyRecord
from schemas.batch import BatchError, BatchLine, BatchOutputLine, BatchResponse, BatchStart, BatchState
from schemas.cache import CachedDelta, CachedResponse
from schemas.events import Usage, encode
from schemas.idempotency import IdempotencyRecord
from schemas.registry import ModelEntry
from schemas.responses import ResponseItem, StoredResponse
from schemas.training import (
    Checkpoint,
    Hyperparameters,
    JobError,
    JobState,
    PeftSettings,
    Progress,
    TrainCancel,
    TrainEvent,
    TrainingJob,
)
from tests.common.wire_v1 import WireCase, decoder, frozen_fields, with_unknown_field

FULL = [
    WireCase("TrainingJob", decoder(TrainingJob), (
        b'{"id":"ftjob-1","model":"SmolLM2-135M-Instruct","training_file":"file-1",'
        b'"validation_file":"file-2","dataset_format":"jsonl","peft":{"method":"dora","r":4,'
        b'"alpha":8,"dropout":0.1,"target_modules":["q_proj","v_proj"],'
        b'"options":{"use_rslora":true}},"hyperparameters":{"n_epochs":1,"batch_size":2,'
        b'"gradient_accumulation_steps":2,"learning_rate":0.001,"warmup_ratio":0.1,'
        b'"weight_decay":0.01,"max_seq_length":256,"save_steps":10,"logging_steps":5,'
        b'"max_steps":100},"suffix":"demo","seed":1,"metadata":{"team":"a"},'
        b'"created_at":1767225600,"owner":"key-1","script":"train.py","script_args":["--fast"]}'),
        TrainingJob(
            id="ftjob-1", model="SmolLM2-135M-Instruct", training_file="file-1", validation_file="file-2",
            dataset_format="jsonl",
            peft=PeftSettings(method="dora", r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"],
                              options={"use_rslora": True}),
            hyperparameters=Hyperparameters(n_epochs=1, batch_size=2, gradient_accumulation_steps=2,
                                            learning_rate=0.001, warmup_ratio=0.1, weight_decay=0.01,
                                            max_seq_length=256, save_steps=10, logging_steps=5, max_steps=100),
            suffix="demo", seed=1, metadata={"team": "a"}, created_at=1767225600, owner="key-1", script="train.py",
            script_args=["--fast"])),
    WireCase("TrainEvent", decoder(TrainEvent), (
        b'{"id":"ftevent-1","job_id":"ftjob-1","created_at":1767225601.5,"level":"warn",'
        b'"type":"metrics","message":"step 1","data":{"step":1,"train_loss":2.5}}'),
        TrainEvent(id="ftevent-1", job_id="ftjob-1", created_at=1767225601.5, level="warn", type="metrics",
                   message="step 1", data={"step": 1, "train_loss": 2.5})),
    WireCase("TrainCancel", decoder(TrainCancel), b'{"id":"ftjob-1","reason":"user"}',
             TrainCancel(id="ftjob-1", reason="user")),
    WireCase("JobState", decoder(JobState), (
        b'{"job":{"id":"ftjob-1","model":"SmolLM2-135M-Instruct","training_file":"file-1",'
        b'"peft":{},"hyperparameters":{}},"status":"failed","created_at":1767225600,'
        b'"started_at":1767225601,"finished_at":1767225700,'
        b'"fine_tuned_model":"SmolLM2-135M-Instruct:ftjob-1","trained_tokens":5000,'
        b'"error":{"code":"invalid_request","message":"bad file","param":"training_file"},'
        b'"progress":{"epoch":0.5,"total_epochs":1,"step":5,"total_steps":10,"percent":50.0,'
        b'"loss":2.25,"learning_rate":0.0001,"memory_bytes":1000,"elapsed_s":10.5,"eta_s":10.5,'
        b'"tokens":2500},"checkpoints":[{"id":"ftckpt-1","step":5,"created_at":1767225650,'
        b'"object_name":"ckpt/ftjob-1/5.tar","train_loss":2.25}],"trainer":"trainer-1",'
        b'"attempts":2}'),
        JobState(
            job=TrainingJob(id="ftjob-1", model="SmolLM2-135M-Instruct", training_file="file-1"), status="failed",
            created_at=1767225600, started_at=1767225601, finished_at=1767225700,
            fine_tuned_model="SmolLM2-135M-Instruct:ftjob-1", trained_tokens=5000,
            error=JobError(code="invalid_request", message="bad file", param="training_file"),
            progress=Progress(epoch=0.5, total_epochs=1, step=5, total_steps=10, percent=50.0, loss=2.25,
                              learning_rate=0.0001, memory_bytes=1000, elapsed_s=10.5, eta_s=10.5, tokens=2500),
            checkpoints=[Checkpoint(id="ftckpt-1", step=5, created_at=1767225650, object_name="ckpt/ftjob-1/5.tar",
                                    train_loss=2.25)],
            trainer="trainer-1", attempts=2)),
    WireCase("CachedResponse", decoder(CachedResponse), (
        b'{"model":"SmolLM2-135M-Instruct","deltas":[{"text":"Hel","token_ids":[1,2]},'
        b'{"text":"lo"}],"finish_reason":"stop","usage":{"prompt_tokens":5,"completion_tokens":2},'
        b'"created":1767225600.5}'),
        CachedResponse(model="SmolLM2-135M-Instruct", deltas=[CachedDelta(text="Hel", token_ids=[1, 2]),
                                                              CachedDelta(text="lo")],
                       finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=2), created=1767225600.5)),
    WireCase("IdempotencyRecord", decoder(IdempotencyRecord), (
        b'{"state":"done","request_id":"req-1","body_sha":"abababab","deadline":1767225720.5,'
        b'"run":1,"created":1767225600,"model":"SmolLM2-135M-Instruct","text":"Hello",'
        b'"finish_reason":"stop","usage":{"prompt_tokens":5,"completion_tokens":1}}'),
        IdempotencyRecord(state="done", request_id="req-1", body_sha="abababab", deadline=1767225720.5, run=1,
                          created=1767225600, model="SmolLM2-135M-Instruct", text="Hello", finish_reason="stop",
                          usage=Usage(prompt_tokens=5, completion_tokens=1))),
    WireCase("ModelEntry", decoder(ModelEntry), (
        b'{"id":"sql","kind":"adapter","base":"SmolLM2-135M-Instruct","engine":"transformers",'
        b'"source":"artifact:adapters/sql.tar","format":"peft","method":"lora",'
        b'"context_length":8192,"aliases":["sql-v1"],"created_at":1767225600,"job_id":"ftjob-1"}'),
        ModelEntry(id="sql", kind="adapter", base="SmolLM2-135M-Instruct", engine="transformers",
                   source="artifact:adapters/sql.tar", format="peft", method="lora", context_length=8192,
                   aliases=["sql-v1"], created_at=1767225600, job_id="ftjob-1")),
    WireCase("ApiKeyRecord", decoder(ApiKeyRecord), (
        b'{"id":"key-1","name":"ci","hash":"cdcdcdcd","scopes":["inference","training"],'
        b'"created":1767225600.5,"revoked":true,"revoked_at":1767225700.5,"rate_rpm":60,'
        b'"rate_tpm":0,"rate_streams":2}'),
        ApiKeyRecord(id="key-1", name="ci", hash="cdcdcdcd", scopes=["inference", "training"], created=1767225600.5,
                     revoked=True, revoked_at=1767225700.5, rate_rpm=60, rate_tpm=0, rate_streams=2)),
    WireCase("StoredResponse", decoder(StoredResponse), (
        b'{"id":"resp-1","created_at":1767225600,"response":{"id":"resp-1","object":"response"},'
        b'"owner":"key-key-1","previous_response_id":"resp-0","input":[{"id":"msg_1","type":"message",'
        b'"role":"user","texts":["Hi","there"]},{"id":"fco_1","type":"function_call_output","call_id":"call_1",'
        b'"output":"42"}],"output":[{"id":"fc_1","type":"function_call","call_id":"call_2","name":"f",'
        b'"arguments":"{}"}]}'),
        StoredResponse(id="resp-1", created_at=1767225600, response=msgspec.Raw(b'{"id":"resp-1","object":"response"}'),
                       owner="key-key-1", previous_response_id="resp-0",
                       input=[ResponseItem(id="msg_1", type="message", role="user", texts=["Hi", "there"]),
                              ResponseItem(id="fco_1", type="function_call_output", call_id="call_1", output="42")],
                       output=[ResponseItem(id="fc_1", type="function_call", call_id="call_2", name="f",
                                            arguments="{}")])),
    # Batches: the work on LLM_BATCH and the values in KV llm_batches.
    WireCase("BatchStart", decoder(BatchStart), b'{"batch_id":"batch_1"}', BatchStart(batch_id="batch_1")),
    WireCase("BatchLine", decoder(BatchLine), (
        b'{"batch_id":"batch_1","index":3,"custom_id":"req-3","url":"/v1/chat/completions",'
        b'"body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}'),
        BatchLine(batch_id="batch_1", index=3, custom_id="req-3", url="/v1/chat/completions",
                  body=msgspec.Raw(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'))),
    WireCase("BatchOutputLine", decoder(BatchOutputLine), (
        b'{"id":"batch_req_1","custom_id":"req-3","response":{"status_code":400,"request_id":"bl-1-d1",'
        b'"body":{"error":{"message":"bad","type":"invalid_request_error","param":"max_tokens",'
        b'"code":"invalid_request"}}},"error":{"code":"batch_expired","message":"late"}}'),
        BatchOutputLine(id="batch_req_1", custom_id="req-3", response=BatchResponse(
            status_code=400, request_id="bl-1-d1", body=msgspec.Raw(
                b'{"error":{"message":"bad","type":"invalid_request_error","param":"max_tokens",'
                b'"code":"invalid_request"}}')), error=BatchError(code="batch_expired", message="late"))),
    WireCase("BatchState", decoder(BatchState), (
        b'{"id":"batch_1","endpoint":"/v1/chat/completions","input_file_id":"file-1","completion_window":"24h",'
        b'"status":"completed","created_at":1767225600,"expires_at":1767312000,"total":50,"metadata":{"run":"a"},'
        b'"owner":"key-1","caller":"key-key-1","response_owner":"key-key-1","rpm":60,"tpm":1000,'
        b'"in_progress_at":1767225601,'
        b'"finalizing_at":1767225700,"completed_at":1767225700,"failed_at":1767225700,"expired_at":1767225700,'
        b'"cancelling_at":1767225650,"cancelled_at":1767225700,"output_file_id":"file-2","error_file_id":"file-3",'
        b'"errors":[{"code":"invalid_request","message":"bad line","param":"input_file_id","line":2}],'
        b'"completed":49,"failed":1}'),
        BatchState(id="batch_1", endpoint="/v1/chat/completions", input_file_id="file-1", completion_window="24h",
                   status="completed", created_at=1767225600, expires_at=1767312000, total=50, metadata={"run": "a"},
                   owner="key-1", caller="key-key-1", response_owner="key-key-1", rpm=60, tpm=1000,
                   in_progress_at=1767225601,
                   finalizing_at=1767225700, completed_at=1767225700, failed_at=1767225700, expired_at=1767225700,
                   cancelling_at=1767225650, cancelled_at=1767225700, output_file_id="file-2",
                   error_file_id="file-3", errors=[BatchError(code="invalid_request", message="bad line",
                                                              param="input_file_id", line=2)],
                   completed=49, failed=1)),
]

MINIMAL = [
    WireCase("TrainingJob", decoder(TrainingJob),
             b'{"id":"ftjob-2","model":"m","training_file":"file-1","peft":{},"hyperparameters":{}}',
             {"id": "ftjob-2", "model": "m", "training_file": "file-1", "validation_file": None,
              "dataset_format": "auto",
              "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None, "options": {}},
              "hyperparameters": {"n_epochs": 3, "batch_size": 4, "gradient_accumulation_steps": 1,
                                  "learning_rate": 0.0002, "warmup_ratio": 0.0, "weight_decay": 0.0,
                                  "max_seq_length": 512, "save_steps": 50, "logging_steps": 1, "max_steps": 0},
              "suffix": None, "seed": 42, "metadata": None, "created_at": 0, "owner": None, "script": None,
              "script_args": []}),
    WireCase("TrainEvent", decoder(TrainEvent), b'{"id":"ftevent-2","job_id":"ftjob-2","created_at":1767225601.5}',
             {"id": "ftevent-2", "job_id": "ftjob-2", "created_at": 1767225601.5, "level": "info", "type": "message",
              "message": "", "data": {}}),
    WireCase("JobState", decoder(JobState), b'{"job":{"id":"ftjob-3","model":"m","training_file":"file-1"}}',
             {"status": "queued", "created_at": 0, "started_at": None, "finished_at": None, "fine_tuned_model": None,
              "trained_tokens": None, "error": None, "checkpoints": [], "trainer": None, "attempts": 0,
              "progress": {"epoch": 0.0, "total_epochs": 0, "step": 0, "total_steps": 0, "percent": 0.0,
                           "loss": None, "learning_rate": None, "memory_bytes": 0, "elapsed_s": 0.0, "eta_s": None,
                           "tokens": 0}}),
    WireCase("BatchState", decoder(BatchState),
             b'{"id":"batch_2","endpoint":"/v1/completions","input_file_id":"file-1","completion_window":"24h",'
             b'"status":"validating","created_at":1767225600,"expires_at":1767312000,"total":1}',
             {"metadata": None, "owner": None, "caller": "", "response_owner": "", "rpm": 0, "tpm": 0,
              "in_progress_at": None,
              "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
              "cancelling_at": None, "cancelled_at": None, "output_file_id": None, "error_file_id": None,
              "errors": None, "completed": 0, "failed": 0}),
    WireCase("ApiKeyRecord", decoder(ApiKeyRecord),
             b'{"id":"key-2","name":"ci","hash":"cdcd","scopes":["admin"],"created":1767225600.5}',
             {"id": "key-2", "name": "ci", "hash": "cdcd", "scopes": ["admin"], "created": 1767225600.5,
              "revoked": False, "revoked_at": None, "rate_rpm": None, "rate_tpm": None, "rate_streams": None}),
    WireCase("StoredResponse", decoder(StoredResponse), b'{"id":"resp-2","created_at":1767225600,"response":{}}',
             {"id": "resp-2", "created_at": 1767225600, "response": msgspec.Raw(b"{}"), "owner": "",
              "previous_response_id": None, "input": [], "output": []}),
]


def _ids(cases: list[WireCase]) -> list[str]:
    return [case.name for case in cases]


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_v1_bytes_decode_to_the_same_value(case: WireCase):
    decoded = case.decode(case.wire)
    assert type(decoded) is type(case.expected)
    assert decoded == case.expected


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_the_value_encodes_to_the_same_v1_bytes(case: WireCase):
    assert encode(case.expected) == case.wire


@pytest.mark.parametrize("case", MINIMAL, ids=_ids(MINIMAL))
def test_fields_a_v1_writer_left_out_keep_their_v1_defaults(case: WireCase):
    assert frozen_fields(case.decode(case.wire), case.expected) == case.expected


@pytest.mark.parametrize("case", FULL, ids=_ids(FULL))
def test_a_field_added_by_a_newer_writer_is_ignored(case: WireCase):
    assert case.decode(with_unknown_field(case.wire)) == case.expected
