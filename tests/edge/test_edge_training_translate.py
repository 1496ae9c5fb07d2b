"""Fine-tuning bodies -> ``TrainingJob``, and job state -> response objects, without HTTP or NATS."""

from __future__ import annotations

import json

import pytest

from schemas.errors import BusError
from schemas.training import RUNNING, Hyperparameters, JobState, Progress, TrainingJob
from services.edge.training.bodies import job_object, native_status, page
from services.edge.training.translate import new_job_id, parse_native_job, parse_openai_job, snake_keys


def _openai(**body):
    raw = json.dumps({"model": "m", "training_file": "file-abc", **body}).encode()
    return parse_openai_job(raw, job_id="ftjob-1", created_at=100, owner="key1").job


def test_auto_and_omitted_hyperparameters_are_the_trainer_defaults():
    defaults = Hyperparameters()
    for job in (_openai(), _openai(hyperparameters={"n_epochs": "auto", "batch_size": "auto",
                                                    "learning_rate_multiplier": "auto"})):
        assert job.hyperparameters == defaults and job.peft.method == "lora" and job.owner == "key1"


def test_learning_rate_multiplier_scales_the_base_rate_and_top_level_matches_method():
    top = _openai(hyperparameters={"learning_rate_multiplier": 2, "n_epochs": 5})
    nested = _openai(method={"type": "supervised", "supervised": {"hyperparameters": {
        "learning_rate_multiplier": 2, "n_epochs": 5}}})
    assert top.hyperparameters == nested.hyperparameters
    assert top.hyperparameters.learning_rate == pytest.approx(4e-4) and top.hyperparameters.n_epochs == 5


def test_hyperparameters_in_both_places_are_refused():
    with pytest.raises(BusError) as info:
        _openai(hyperparameters={"n_epochs": 1},
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert info.value.param == "hyperparameters"


def test_native_keys_are_snake_cased_except_inside_options_and_metadata():
    tree = snake_keys({"baseModel": "m", "lora": {"targetModules": ["q"], "options": {"initLoraWeights": True}},
                       "metadata": {"myKey": "v"}})
    assert tree == {"base_model": "m", "lora": {"target_modules": ["q"], "options": {"initLoraWeights": True}},
                    "metadata": {"myKey": "v"}}


def test_native_method_and_lora_block_must_agree():
    raw = json.dumps({"baseModel": "m", "datasetPath": "/d", "method": "lora", "lora": {"method": "dora"}}).encode()
    with pytest.raises(BusError) as info:
        parse_native_job(raw, created_at=1, owner=None)
    assert info.value.param == "method"


def test_native_dataset_is_exactly_one_of_file_path_or_dataset():
    both = json.dumps({"baseModel": "m", "datasetPath": "/d", "fileId": "file-x"}).encode()
    with pytest.raises(BusError):
        parse_native_job(both, created_at=1, owner=None)
    parsed = parse_native_job(json.dumps({"baseModel": "m", "dataset": "file-abc"}).encode(), created_at=1, owner=None)
    assert parsed.uploaded == [("file-abc", "dataset")]
    parsed = parse_native_job(json.dumps({"baseModel": "m", "datasetPath": "file-x.jsonl"}).encode(), created_at=1,
                              owner=None)
    assert parsed.uploaded == []  # a path on the trainer, even one that looks like a file id


def test_job_ids_sort_by_creation():
    ids = [new_job_id() for _ in range(50)]
    prefixes = [i[: len("ftjob-") + 12] for i in ids]  # milliseconds; the random tail orders one millisecond
    assert prefixes == sorted(prefixes)


def test_job_object_shows_resolved_numbers_and_eta_only_while_running():
    job = TrainingJob(id="ftjob-1", model="m", training_file="file-a",
                      hyperparameters=Hyperparameters(learning_rate=1e-4, n_epochs=2))
    state = JobState(job=job, created_at=10, progress=Progress(eta_s=30.0, step=1))
    body = job_object(state, now=1000.0)
    assert body["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert body["estimated_finish"] is None and body["error"] is None and body["result_files"] == []
    state.status = RUNNING
    assert job_object(state, now=1000.0)["estimated_finish"] == 1030
    assert native_status(state, now=1000.0)["totalEpochs"] == 2


def test_page_after_and_limit():
    items = [{"id": str(i)} for i in range(5)]
    assert page(items, after="1", limit=2) == {"object": "list", "data": [{"id": "2"}, {"id": "3"}], "has_more": True,
                                               "first_id": "2", "last_id": "3"}
    assert page(items, after="3", limit=5)["has_more"] is False
    with pytest.raises(BusError):
        page(items, after="nope", limit=2)
