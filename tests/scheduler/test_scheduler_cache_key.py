"""The prompt cache's key and eligibility: pure, no NATS."""

from __future__ import annotations

import msgspec
import pytest

from schemas.inference import ChatMessage, InferenceRequest, SamplingParams, StructuredOutput
from services.common.cache_key import cache_key, is_cacheable, is_deterministic

BASE_SAMPLING = SamplingParams(max_tokens=32, temperature=0.0, top_p=0.9, top_k=40, seed=7, stop=["\n"],
                               presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1, n=1)

# One changed value for every SamplingParams field: adding a field without a case here fails the test below.
SAMPLING_CHANGES = {
    "max_tokens": 33, "temperature": 0.5, "top_p": 0.8, "top_k": 41, "seed": 8, "stop": ["\n\n"],
    "presence_penalty": 0.3, "frequency_penalty": 0.4, "repetition_penalty": 1.2, "n": 2,
    "logprobs": 2, "logit_bias": {5: -100.0},
}


def chat(**kw) -> InferenceRequest:
    fields = dict(id="r1", model="m", reply_to="_INBOX.t.r1", messages=[ChatMessage(role="user", content="hi")],
                  sampling=msgspec.structs.replace(BASE_SAMPLING))
    fields.update(kw)
    return InferenceRequest(**fields)


def test_every_sampling_field_has_a_change_case():
    assert set(SAMPLING_CHANGES) == set(SamplingParams.__struct_fields__)


@pytest.mark.parametrize("field", sorted(SAMPLING_CHANGES))
def test_requests_differing_in_one_sampling_field_never_share_a_key(field):
    changed = msgspec.structs.replace(BASE_SAMPLING, **{field: SAMPLING_CHANGES[field]})
    assert cache_key(chat()) != cache_key(chat(sampling=changed))


@pytest.mark.parametrize("change", [
    dict(model="other"), dict(adapter="lora-1"), dict(messages=[ChatMessage(role="user", content="hi!")]),
    dict(messages=[ChatMessage(role="system", content="hi")]),
    dict(messages=[ChatMessage(role="user", content="hi", name="bob")]),
    dict(messages=[ChatMessage(role="user", content="h"), ChatMessage(role="user", content="i")]),
    dict(messages=None, prompt="hi"),
    dict(structured=StructuredOutput(kind="json_object")),
    dict(structured=StructuredOutput(kind="choice", choice=["a"])),
])
def test_requests_differing_in_model_adapter_or_input_never_share_a_key(change):
    assert cache_key(chat()) != cache_key(chat(**change))


def test_stop_order_and_prompt_kind_are_part_of_the_key():
    a = msgspec.structs.replace(BASE_SAMPLING, stop=["a", "b"])
    b = msgspec.structs.replace(BASE_SAMPLING, stop=["b", "a"])
    assert cache_key(chat(sampling=a)) != cache_key(chat(sampling=b))
    assert cache_key(chat(messages=None, prompt="")) != cache_key(chat(messages=[]))


def test_fields_that_do_not_change_the_output_do_not_change_the_key():
    same = chat(id="r2", reply_to="_INBOX.x.r2", stream=False, priority=5, deadline=9.0, created=1.0, user="u",
                cache_key="whatever")
    assert cache_key(chat()) == cache_key(same)


def test_the_key_uses_the_canonical_model_and_normalises_numbers():
    assert cache_key(chat(model="alias"), "m") == cache_key(chat(model="m"))
    ints = msgspec.structs.replace(BASE_SAMPLING, temperature=0, top_p=1, presence_penalty=0)
    floats = msgspec.structs.replace(BASE_SAMPLING, temperature=0.0, top_p=1.0, presence_penalty=0.0)
    assert cache_key(chat(sampling=ints)) == cache_key(chat(sampling=floats))


def test_key_is_a_sha256_hex_digest():
    key = cache_key(chat())
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)


def test_only_deterministic_requests_that_did_not_opt_out_are_cacheable():
    assert is_deterministic(SamplingParams(temperature=0.0))
    assert is_deterministic(SamplingParams(temperature=0.9, seed=3))
    assert not is_deterministic(SamplingParams(temperature=0.9))
    assert is_cacheable(chat())
    assert not is_cacheable(chat(cache=False))
    assert not is_cacheable(chat(sampling=SamplingParams(temperature=0.7)))


def test_a_migrated_request_is_never_cached_but_a_plain_re_dispatch_is():
    # The continuation's engine produces only the rest of the answer: storing it under the key would
    # answer the next identical request with half a response.
    assert not is_cacheable(chat(id="r1-r1", attempt=1, continuation="tok1 tok2 "))
    assert is_cacheable(chat(id="r1-r1", attempt=1))  # lost before the first token: the whole answer again
    assert cache_key(chat(id="r1-r1", attempt=1)) == cache_key(chat())


def test_a_request_asking_for_logprobs_is_keyed_apart_and_never_cached():
    # The cache stores text only: a hit would answer without the log-probabilities asked for.
    with_logprobs = chat(sampling=msgspec.structs.replace(BASE_SAMPLING, logprobs=0))
    assert cache_key(with_logprobs) != cache_key(chat())
    assert not is_cacheable(with_logprobs)


def test_fanned_out_choices_of_a_seeded_request_have_keys_of_their_own():
    # The edge sends OpenAI n=3 as three n=1 requests seeded seed, seed+1, seed+2: each is cacheable
    # (reproducible) and a later identical n=3 request finds each choice under its own key.
    keys = {cache_key(chat(sampling=msgspec.structs.replace(BASE_SAMPLING, temperature=0.8, seed=7 + i)))
            for i in range(3)}
    assert len(keys) == 3
