"""OpenAI body -> InferenceRequest translation and validation, without HTTP or NATS."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas import encode
from schemas.errors import BusError
from schemas.inference import InferenceRequest
from services.edge.openai.translate import parse_chat, parse_completion, to_request


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def rejects(raw: bytes, code: str, param: str | None, *, completion: bool = False, **kw) -> BusError:
    with pytest.raises(BusError) as info:
        (parse_completion if completion else parse_chat)(raw, **kw)
    assert (info.value.code, info.value.param) == (code, param), info.value.message
    return info.value


def test_defaults_mirror_openai():
    parsed = parse_chat(chat())
    assert parsed.sampling.max_tokens == 256 and parsed.sampling.temperature == 1.0
    assert parsed.sampling.top_p == 1.0 and parsed.sampling.stop == [] and parsed.sampling.seed is None
    assert (parsed.stream, parsed.include_usage, parsed.priority, parsed.timeout) == (False, False, 0, None)
    assert parse_completion(b'{"model": "m", "prompt": "p"}').sampling.max_tokens == 16


def test_every_sampling_field_and_extra_is_carried():
    parsed = parse_chat(chat(temperature=0, top_p=0.5, top_k=40, seed=7, stop=["a", "b"], presence_penalty=-2,
                             frequency_penalty=2, repetition_penalty=1.1, max_tokens=9, priority=3,
                             adapter="lora-1", user="u1", timeout=2.5, stream=True,
                             stream_options={"include_usage": True}))
    s = parsed.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (0, 0.5, 40, 7, ["a", "b"])
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.max_tokens) == (-2, 2, 1.1, 9)
    assert (parsed.priority, parsed.adapter, parsed.user, parsed.timeout) == (3, "lora-1", "u1", 2.5)
    assert parsed.stream and parsed.include_usage


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat(chat(max_tokens=5, max_completion_tokens=8)).sampling.max_tokens == 8


def test_unknown_fields_are_refused_by_name_and_no_op_fields_accepted():
    rejects(chat(something_new=1), "unsupported", "something_new")
    rejects(b'{"model": "m", "prompt": "p", "store": true}', "unsupported", "store", completion=True)
    parsed = parse_chat(chat(logit_bias={"1": 2}, tools=[], store=True, metadata={"k": "v"}, service_tier="auto",
                             user="u", prediction={"type": "content", "content": "x"}, parallel_tool_calls=True,
                             tool_choice="none", modalities=["text"]))
    assert parsed.sampling.logit_bias == {1: 2.0}


def test_content_parts_are_flattened_and_null_assistant_content_is_empty():
    parsed = parse_chat(json.dumps({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
        {"role": "assistant", "content": None, "name": "bot"},
        {"role": "tool", "content": "42"},
    ]}).encode())
    assert [(m.role, m.content, m.name) for m in parsed.messages] == [
        ("developer", "x\ny", None), ("assistant", "", "bot"), ("tool", "42", None)]


def test_non_text_content_is_unsupported():
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}).encode()
    assert "image_url" in rejects(raw, "unsupported", "messages[0].content[0]").message


def test_user_message_without_content_is_invalid():
    rejects(json.dumps({"model": "m", "messages": [{"role": "user"}]}).encode(), "invalid_request",
            "messages[0].content")


@pytest.mark.parametrize(("raw", "param"), [
    (b"{", None), (b"", None), (b"[]", None), (b'"text"', None),
    (b'{"messages": []}', "model"),
    (b'{"model": "m"}', "messages"),
    (b'{"model": 3, "messages": []}', "model"),
    (chat(temperature="1"), "temperature"),
    (chat(temperature=True), "temperature"),
    (chat(max_tokens=2**40), "max_tokens"),
    (chat(seed=2**70), "seed"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(messages=[{"role": "user", "content": "x"}, {"role": 1, "content": "x"}]), "messages[1].role"),
])
def test_malformed_or_mistyped_bodies_name_the_json_path(raw, param):
    rejects(raw, "invalid_request", param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.01}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": ["1", "2", "3", "4", "5"]}, "stop"), ({"stop": ""}, "stop"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": ""}, "model"), ({"timeout": -1}, "timeout"),
])
def test_out_of_range_values_are_invalid(fields, param):
    rejects(chat(**fields), "invalid_request", param)


def test_boundaries_are_accepted():
    parse_chat(chat(temperature=0, top_p=1, presence_penalty=-2, frequency_penalty=2, top_k=0, max_tokens=1,
                    stop=["a", "b", "c", "d"]))
    parse_chat(chat(temperature=2, n=1))


def test_n_is_bounded_and_fanned_out_by_the_edge_not_the_engine():
    assert "'n' must be in [1, 16]" in rejects(chat(n=17), "invalid_request", "n").message
    assert "'n' must be in [1, 4]" in rejects(chat(n=5), "invalid_request", "n", max_n=4).message
    rejects(chat(n=0), "invalid_request", "n")
    parsed = parse_chat(chat(n=3))
    assert parsed.n == 3 and parsed.sampling.n == 1


def test_legacy_prompt_forms():
    assert parse_completion(b'{"model": "m", "prompt": ["only"]}').prompt == "only"
    rejects(b'{"model": "m", "prompt": ["a", "b"]}', "unsupported", "prompt", completion=True)
    rejects(b'{"model": "m", "prompt": []}', "unsupported", "prompt", completion=True)
    rejects(b'{"model": "m", "prompt": [1, 2]}', "invalid_request", "prompt[0]", completion=True)
    rejects(b'{"model": "m"}', "invalid_request", "prompt", completion=True)


def test_to_request_builds_a_wire_message_that_round_trips():
    parsed = parse_chat(chat(priority=-1, adapter="a", seed=1, stream=True))
    req = to_request(parsed, request_id="chatcmpl-1", model="canonical", reply_to="_INBOX.e.chatcmpl-1",
                     created=100.0, deadline=700.0)
    assert (req.id, req.model, req.reply_to, req.created, req.deadline) == \
        ("chatcmpl-1", "canonical", "_INBOX.e.chatcmpl-1", 100.0, 700.0)
    assert (req.priority, req.adapter, req.stream, req.prompt) == (-1, "a", True, None)
    assert req.producer_watches  # the edge follows the engine itself: no worker_lost from the scheduler
    assert msgspec.json.decode(encode(req), type=InferenceRequest) == req


def test_the_cache_extra_field_opts_a_request_out_of_the_prompt_cache():
    def build(raw: bytes) -> InferenceRequest:
        return to_request(parse_chat(raw), request_id="r", model="m", reply_to="_INBOX.e.r", created=0.0,
                          deadline=0.0)
    assert build(chat()).cache is True
    assert build(chat(cache=False)).cache is False
    assert parse_completion(b'{"model": "m", "prompt": "p", "cache": false}').cache is False
    rejects(chat(cache="no"), "invalid_request", "cache")
