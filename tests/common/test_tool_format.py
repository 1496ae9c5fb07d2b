"""The shared tool-call format: rendering into chat messages, the grammar, and reading calls back."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import pytest

from services.common.tool_format import (
    CALL_OPEN, Call, CallArguments, CallStream, Function, Text, call_block, render_messages, split_answer,
    tool_grammar)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FUNCTIONS = [Function("get_weather", "weather in a city", WEATHER), Function("now")]
ANSWER = ('Let me look. <tool_call>{"name":"get_weather","arguments":{"city":"P}a<","unit":"celsius"}}</tool_call>'
          '<tool_call>{"name":"now","arguments":{}}</tool_call>')


def test_tools_go_into_the_system_message_and_calls_into_the_assistant_turn():
    calls = [Call("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    out = render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
                           {"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "content": "21"}], FUNCTIONS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools")
    listed = [json.loads(line) for line in out[0]["content"].splitlines() if line.startswith("{")]
    assert [f["name"] for f in listed] == ["get_weather", "now"] and listed[0]["parameters"] == WEATHER
    assert out[2]["content"] == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}' \
                                '</tool_call>'
    assert out[3]["content"] == "21"
    plain = [{"role": "user", "content": "hi"}]
    assert render_messages(plain, []) == plain
    assert render_messages(plain, FUNCTIONS)[0]["role"] == "system"


def test_a_whole_answer_splits_into_text_and_calls():
    text, calls = split_answer(ANSWER)
    assert text == "Let me look. "
    assert calls == [Call("get_weather", '{"city":"P}a<","unit":"celsius"}'), Call("now", "{}")]
    assert split_answer("no calls <tool here") == ("no calls <tool here", [])
    assert split_answer(CALL_OPEN + "not json</tool_call> rest") == (CALL_OPEN + "not json</tool_call> rest", [])
    assert split_answer('<tool_call>{"name":"now","arguments":{"a":') == ("", [Call("now", '{"a":')])  # cut short
    assert call_block(Call("now", "{ }")) == '<tool_call>{"name":"now","arguments":{}}</tool_call>'


@pytest.mark.parametrize("seed", range(100))
def test_any_split_of_a_stream_gives_the_whole_answers_pieces(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ANSWER)), rng.randint(1, 30)))
    stream = CallStream()
    pieces = []
    for a, b in zip([0, *cuts], [*cuts, len(ANSWER)]):
        pieces += stream.feed(ANSWER[a:b])
    pieces += stream.close()
    arguments: dict[int, str] = {}
    for piece in pieces:
        if isinstance(piece, CallArguments):
            arguments[piece.index] = arguments.get(piece.index, "") + piece.fragment
    text, calls = split_answer(ANSWER)
    assert "".join(p.text for p in pieces if isinstance(p, Text)) == text
    assert list(arguments.values()) == [c.arguments for c in calls] and stream.calls == 2


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    return hf, llguidance.hf.from_tokenizer(hf)


def _walk(tokenizer, grammar: str, seed: int, prefix: str = "") -> str:
    """A random walk through what the grammar allows, token by token, until it allows only the end."""
    hf, lt = tokenizer
    matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = hf(prefix, add_special_tokens=False).input_ids if prefix else []
    assert matcher.consume_tokens(ids)
    mask = llguidance.numpy.allocate_token_bitmask(1, lt.vocab_size)
    rng = random.Random(seed)
    for _ in range(400):
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
        allowed = np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:lt.vocab_size])[0]
        token = int(rng.choice(list(allowed)))
        if token == hf.eos_token_id:
            break
        assert matcher.consume_token(token)
        ids.append(token)
    assert matcher.is_accepting()
    return hf.decode(ids)


@pytest.mark.parametrize("parallel", [False, True])
def test_a_required_grammar_allows_only_valid_calls(tokenizer, parallel):
    grammar = tool_grammar(FUNCTIONS, required=True, parallel=parallel)
    counts = set()
    for seed in range(12):
        text, calls = split_answer(_walk(tokenizer, grammar, seed))
        assert text == "" and calls
        counts.add(len(calls))
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), {"get_weather": WEATHER, "now": {}}[call.name])
    assert counts == {1} if not parallel else max(counts) > 1


def test_an_auto_grammar_is_free_until_the_tag_then_holds_the_call(tokenizer):
    grammar = tool_grammar(FUNCTIONS[:1], required=False, parallel=False)
    text, calls = split_answer(_walk(tokenizer, grammar, 3, prefix="Sure, I will check. " + CALL_OPEN))
    assert text == "Sure, I will check. " and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    hf, lt = tokenizer
    free = llguidance.LLMatcher(lt, grammar, log_level=0)
    assert free.consume_tokens(hf("Any text at all, {not json}", add_special_tokens=False).input_ids)
    assert free.is_accepting()
