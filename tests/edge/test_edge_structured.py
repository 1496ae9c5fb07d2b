"""Structured outputs and the OpenAI field policy at the edge, without HTTP or NATS: what reaches the bus."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas import encode
from schemas.errors import BusError
from schemas.inference import InferenceRequest
from services.common.cache_key import cache_key
from services.edge.native.api import parse_native
from services.edge.openai.translate import parse_chat, parse_completion, to_request

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}},
          "required": ["b", "a"], "additionalProperties": False}


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def refused(raw: bytes, code: str, param: str, parse=parse_chat) -> str:
    with pytest.raises(BusError) as info:
        parse(raw)
    assert (info.value.code, info.value.param) == (code, param), info.value.message
    return info.value.message


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}


def test_response_format_kinds_reach_the_bus_request():
    assert parse_chat(chat(response_format={"type": "text"})).structured is None
    assert parse_chat(chat(response_format={"type": "json_object"})).structured.kind == "json_object"
    parsed = parse_chat(chat(response_format=json_schema(SCHEMA)))
    assert parsed.structured.kind == "json_schema"
    assert list(json.loads(parsed.structured.json)["properties"]) == ["b", "a"]  # the client's order is kept
    req = to_request(parsed, request_id="r", model="m", reply_to="inbox", created=0, deadline=0)
    back = msgspec.json.decode(encode(req), type=InferenceRequest)
    assert back.structured == parsed.structured
    completion = parse_completion(json.dumps({"model": "m", "prompt": "p", "response_format": {
        "type": "json_object"}}).encode())
    assert completion.structured.kind == "json_object"


def test_vllm_structured_outputs_extras():
    assert parse_chat(chat(structured_outputs={"choice": ["a", "b"]})).structured.choice == ["a", "b"]
    assert parse_chat(chat(structured_outputs={"regex": "[0-9]+"})).structured.regex == "[0-9]+"
    assert parse_chat(chat(structured_outputs={"grammar": "start: \"a\""})).structured.kind == "grammar"
    assert parse_chat(chat(structured_outputs={"json": SCHEMA})).structured.kind == "json_schema"
    refused(chat(structured_outputs={"regex": "a", "choice": ["b"]}), "invalid_request", "structured_outputs")
    refused(chat(structured_outputs={"choice": []}), "invalid_request", "structured_outputs.choice")
    refused(chat(structured_outputs={"whitespace_pattern": " "}), "unsupported", "structured_outputs.whitespace_pattern")
    refused(chat(structured_outputs={"regex": "a"}, response_format={"type": "json_object"}), "invalid_request",
            "structured_outputs")


@pytest.mark.parametrize("keyword, schema", [
    ("not", {"type": "object", "not": {"type": "string"}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^a": {}}}),
    ("allOf", {"allOf": [{"type": "object"}]}),
    ("uniqueItems", {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}),
    ("multipleOf", {"type": "integer", "multipleOf": 3}),
    ("if", {"if": {}, "then": {}}),
])
def test_a_schema_outside_the_subset_is_refused_naming_the_keyword(keyword, schema):
    message = refused(chat(response_format=json_schema(schema)), "unsupported", "response_format.json_schema.schema")
    assert repr(keyword) in message


def test_the_supported_subset_passes_and_unsupported_types_formats_and_refs_do_not():
    rich = {"type": "object", "$defs": {"p": {"type": "object", "properties": {"x": {"type": "number",
            "minimum": 0, "exclusiveMaximum": 1}}}}, "properties": {
            "s": {"type": "string", "minLength": 1, "maxLength": 9, "pattern": "^[a-z]+$", "format": "email",
                  "description": "d"},
            "n": {"type": ["integer", "null"]}, "b": {"type": "boolean"}, "c": {"const": 3},
            "l": {"type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 1, "maxItems": 2},
            "u": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "required": ["s"], "additionalProperties": {"type": "string"}}
    assert parse_chat(chat(response_format=json_schema(rich))).structured.kind == "json_schema"
    refused(chat(response_format=json_schema({"type": "tuple"})), "unsupported", "response_format.json_schema.schema")
    refused(chat(response_format=json_schema({"type": "string", "format": "ipv9"})), "unsupported",
            "response_format.json_schema.schema")
    refused(chat(response_format=json_schema({"$ref": "https://example.com/s.json"})), "unsupported",
            "response_format.json_schema.schema")
    refused(chat(response_format={"type": "json_schema"}), "invalid_request", "response_format.json_schema")
    refused(chat(response_format={"type": "yaml"}), "invalid_request", "response_format.type")


@pytest.mark.parametrize("field, value", [
    ("modalities", ["audio"]),
    ("audio", {"voice": "alloy"}), ("reasoning_effort", "low"), ("verbosity", "low"), ("web_search_options", {}),
    ("not_an_openai_field", 1),
])
def test_every_chat_field_that_would_change_the_answer_is_refused_by_name(field, value):
    refused(chat(**{field: value}), "unsupported", field)


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 3), ("suffix", "end"), ("tools", [])])
def test_legacy_completion_fields_that_cannot_be_honoured_are_refused(field, value):
    raw = json.dumps({"model": "m", "prompt": "p", field: value}).encode()
    refused(raw, "unsupported", field, parse=parse_completion)


def test_no_op_fields_are_accepted_and_change_nothing_on_the_bus():
    plain = parse_chat(chat(seed=1))
    noisy = parse_chat(chat(seed=1, store=True, metadata={"a": "b"}, service_tier="auto", user="u",
                            safety_identifier="s", prompt_cache_key="k", prompt_cache_retention="24h",
                            prediction={"type": "content", "content": "x"}, parallel_tool_calls=False,
                            tool_choice="none", function_call="none", modalities=["text"]))
    assert noisy.sampling == plain.sampling and noisy.structured is None and noisy.messages == plain.messages
    assert parse_completion(b'{"model":"m","prompt":"p","echo":false,"best_of":1,"suffix":""}').prompt == "p"


def test_logit_bias_is_checked_and_carried():
    assert parse_chat(chat(logit_bias={"5": -100, "7": 2.5})).sampling.logit_bias == {5: -100.0, 7: 2.5}
    refused(chat(logit_bias={"x": 1}), "invalid_request", "logit_bias")
    refused(chat(logit_bias={"-3": 1}), "invalid_request", "logit_bias")
    refused(chat(logit_bias={"5": 101}), "invalid_request", "logit_bias")


def test_native_response_format_and_logit_bias():
    raw = json.dumps({"modelId": "m", "prompt": "p", "responseFormat": json_schema(SCHEMA),
                      "generation": {"logit_bias": {"3": 1}}}).encode()
    parsed = parse_native(raw, default_max_tokens=8, stream=False)
    assert parsed.structured.kind == "json_schema" and parsed.sampling.logit_bias == {3: 1.0}
    bad = json.dumps({"modelId": "m", "prompt": "p", "responseFormat": json_schema({"not": {}})}).encode()
    with pytest.raises(BusError) as info:
        parse_native(bad, default_max_tokens=8, stream=False)
    assert (info.value.code, info.value.param) == ("unsupported", "responseFormat.json_schema.schema")


def test_the_prompt_cache_key_covers_the_constraint_and_logit_bias():
    def key(**fields) -> str:
        parsed = parse_chat(chat(temperature=0, **fields))
        return cache_key(to_request(parsed, request_id="r", model="m", reply_to="i", created=0, deadline=0))

    keys = {key(), key(response_format={"type": "json_object"}), key(response_format=json_schema(SCHEMA)),
            key(structured_outputs={"choice": ["a"]}), key(structured_outputs={"choice": ["b"]}),
            key(logit_bias={"1": 1}), key(logit_bias={"1": 2})}
    assert len(keys) == 7
    assert key(logit_bias={"1": 1, "2": 2}) == key(logit_bias={"2": 2, "1": 1})  # order does not matter
