"""infra/nats/jetstream.toml spells its names as schemas/names.py builds them, and nothing else.

The file keeps literal subjects and durables so an operator can read it; these tests fail the
moment one of them (or a stream, bucket or consumer) disagrees with names.py in either
direction, and show that provisioning refuses such a file rather than creating the old name.
"""

from __future__ import annotations

import copy
import re

import pytest

from infra import provision
from schemas import names

DEFS = provision.load_definitions()


def _changed(section: str, name: str, **fields) -> dict:
    defs = copy.deepcopy(DEFS)
    defs[section][name].update(fields)
    return defs


def test_every_definition_uses_the_names_of_names_py():
    assert provision.name_mismatches(DEFS) == []


def test_the_file_spells_each_name_as_names_py_builds_it():
    # The same check written out, so a failure reads as the two spellings side by side.
    assert {n: sorted(d["subjects"]) for n, d in DEFS["streams"].items()} == \
        {n: sorted(s) for n, s in names.STREAMS.items()}
    assert {n: (d["stream"], d["filter_subject"]) for n, d in DEFS["consumers"].items()} == names.DURABLES
    assert set(DEFS["kv"]) == set(names.KV_BUCKETS)
    assert set(DEFS["object_stores"]) == set(names.OBJECT_STORES)
    assert DEFS["streams"][names.INFER_STREAM]["subjects"] == [names.INFER_SUBMIT_ALL]
    for lane in names.LANES_BY_PRIORITY:
        assert DEFS["consumers"][names.scheduler_durable(lane)]["filter_subject"] == names.infer_submit(lane)


def test_names_py_builds_what_the_services_subscribe_to():
    # The wildcards provisioning uses cover the concrete subjects the services publish on.
    assert names.infer_submit("high").startswith(names.INFER_SUBMIT_ALL[:-1])
    job = names.train_job_events("ftjob-1")
    assert job.split(".")[:-2] == names.TRAIN_EVENTS_ALL.split(".")[:-2] and job.endswith(".event")
    assert names.rate_counter("key-1", "tokens", 60).startswith(names.RATE_ALL[:-1])
    assert names.kv_stream(names.WORKERS_BUCKET) == "KV_llm_workers"
    assert names.kv_subjects(names.WORKERS_BUCKET) == "$KV.llm_workers.>"
    assert names.obj_stream(names.ARTIFACTS_STORE) == "OBJ_llm_artifacts"
    assert names.obj_subjects(names.ARTIFACTS_STORE) == ("$O.llm_artifacts.C.>", "$O.llm_artifacts.M.>")


@pytest.mark.parametrize(("defs", "expected"), [
    (_changed("streams", names.INFER_STREAM, subjects=["llm.v1.infer.queue.*"]),
     r"\[streams.LLM_INFER\] subjects = \['llm.v1.infer.queue.\*'\], "
     r"schemas/names.py has \['llm.v1.infer.submit.\*'\]"),
    (_changed("consumers", names.scheduler_durable("low"), filter_subject="llm.v1.infer.submit.normal"),
     r"\[consumers.schedulers_low\] stream, filter_subject = 'LLM_INFER', 'llm.v1.infer.submit.normal'"),
    (_changed("consumers", names.TRAIN_DURABLE, stream="LLM_TRAINING"),
     r"\[consumers.trainers\] .*'LLM_TRAINING'"),
], ids=["stream subject", "consumer filter", "consumer stream"])
def test_a_misspelled_name_is_reported(defs: dict, expected: str):
    (mismatch,) = provision.name_mismatches(defs)
    assert re.search(expected, mismatch), mismatch


def test_an_object_names_py_does_not_know_or_one_it_lacks_is_reported():
    defs = copy.deepcopy(DEFS)
    defs["kv"]["llm_worker"] = defs["kv"].pop(names.WORKERS_BUCKET)  # a typo of the bucket
    defs["streams"].pop(names.RATE_STREAM)

    assert provision.name_mismatches(defs) == [
        "[streams.LLM_RATE] is missing (schemas/names.py names it)",
        "[kv.llm_worker] is not a kv name of schemas/names.py",
        "[kv.llm_workers] is missing (schemas/names.py names it)",
    ]
