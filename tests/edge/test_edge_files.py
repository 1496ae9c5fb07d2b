"""``/v1/files``: uploads land in the object store, and the official SDK's files API works end to end."""

from __future__ import annotations

import io

import msgspec
import openai
import pytest

from schemas import names
from services.common import artifacts
from services.common.artifacts import FileMeta
from tests.edge_harness import assert_error
from tests.training_harness import DATASET, edge, sdk, training_config  # noqa: F401 - fixtures


async def test_sdk_file_round_trip_through_the_object_store(sdk, js):
    uploaded = await sdk.files.create(file=("train.jsonl", io.BytesIO(DATASET)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(DATASET)
    assert uploaded.filename == "train.jsonl" and uploaded.purpose == "fine-tune" and uploaded.object == "file"

    store = await js.object_store(names.ARTIFACTS_STORE)
    stored = await store.get(artifacts.file_object(uploaded.id))
    assert stored.data == DATASET
    meta = msgspec.json.decode(stored.info.description, type=FileMeta)
    assert (meta.id, meta.filename, meta.bytes) == (uploaded.id, "train.jsonl", len(DATASET))

    assert (await sdk.files.retrieve(uploaded.id)).model_dump() == uploaded.model_dump()
    assert (await sdk.files.content(uploaded.id)).content == DATASET
    listed = [f.id async for f in sdk.files.list(purpose="fine-tune")]
    assert listed == [uploaded.id]
    assert [f.id async for f in sdk.files.list(purpose="batch")] == []

    deleted = await sdk.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(uploaded.id)
    assert [f.id async for f in sdk.files.list()] == []


async def test_list_is_newest_first_and_pages_with_after(sdk):
    ids = [(await sdk.files.create(file=(f"d{i}.jsonl", io.BytesIO(DATASET)), purpose="fine-tune")).id
           for i in range(3)]
    first = await sdk.files.list(limit=2)
    assert first.has_more is True and len(first.data) == 2
    everything = [f.id async for f in sdk.files.list(limit=2)]  # the SDK follows `after` cursors
    assert sorted(everything) == sorted(ids) and len(everything) == 3
    ascending = await sdk.files.list(order="asc")
    assert [f.id for f in ascending.data] == list(reversed([f.id for f in (await sdk.files.list()).data]))


async def test_unknown_file_is_a_404_openai_error(edge):
    for method, path in (("GET", "/v1/files/file-nope"), ("GET", "/v1/files/file-nope/content"),
                         ("DELETE", "/v1/files/file-nope"), ("GET", "/v1/files/..%2Fetc")):
        resp = await edge.request(method, path)
        assert resp.status == 404, path
        assert_error(await resp.json(), "not_found")


async def test_upload_refuses_a_bad_purpose_an_empty_file_and_no_file(edge):
    resp = await edge.post("/v1/files", data={"purpose": "assistants", "file": io.BytesIO(b"x")})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", "purpose")
    resp = await edge.post("/v1/files", data={"purpose": "fine-tune", "file": io.BytesIO(b"")})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", "file")
    resp = await edge.post("/v1/files", data={"purpose": "fine-tune"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request")
    resp = await edge.post("/v1/files", json={"purpose": "fine-tune", "file": "inline"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", "file")


async def test_a_file_over_the_upload_bound_is_a_413_and_is_not_stored(sdk, edge):
    big = b"x" * (65 << 10)  # the harness bounds uploads to 64 KiB
    with pytest.raises(openai.APIStatusError) as info:
        await sdk.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="fine-tune")
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"
    assert (await (await edge.get("/v1/files")).json())["data"] == []
