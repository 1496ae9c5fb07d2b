"""The legacy ``functions`` / ``function_call`` form, and ``response_format`` composed with tools, at the edge."""

from __future__ import annotations

import json

import llguidance

from services.edge.openai.bodies import ChoiceResult
from services.edge.openai.tool_answers import FunctionChunkFormatter, function_message
from services.edge.openai.translate import parse_chat
from tests.edge.test_edge_tools import chat, refused

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
FUNCTIONS = [{"name": "get_weather", "description": "weather", "parameters": WEATHER}, {"name": "now"}]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
ANSWER = 'Checking. <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
REPLY = {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"],
         "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY}}


def test_functions_map_onto_tools_never_parallel():
    legacy = parse_chat(chat(functions=FUNCTIONS))
    tools = parse_chat(chat(tools=TOOLS, parallel_tool_calls=False))
    assert legacy.read_calls and legacy.legacy_calls and not tools.legacy_calls
    assert legacy.structured == tools.structured and legacy.messages == tools.messages
    assert "call{0," not in legacy.structured.grammar
    named = parse_chat(chat(functions=FUNCTIONS, function_call={"name": "now"}))
    assert named.structured == parse_chat(chat(tools=TOOLS, parallel_tool_calls=False, tool_choice={
        "type": "function", "function": {"name": "now"}})).structured
    none = parse_chat(chat(functions=FUNCTIONS, function_call="none"))
    assert not none.read_calls and none.structured is None and none.messages == legacy.messages
    assert parse_chat(chat(functions=FUNCTIONS, function_call="auto")).structured == legacy.structured


def test_bad_legacy_requests_are_refused_by_name():
    refused(chat(functions=FUNCTIONS, function_call="required"), "invalid_request", "function_call")
    refused(chat(functions=FUNCTIONS, function_call={"name": "x"}), "invalid_request", "function_call.name")
    refused(chat(functions=[{"name": "a b"}]), "invalid_request", "functions[0].name")
    refused(chat(functions=FUNCTIONS + FUNCTIONS[:1]), "invalid_request", "functions[2].name")
    refused(chat(functions=FUNCTIONS, tool_choice="auto"), "invalid_request", "functions")
    refused(chat(function_call="auto"), "invalid_request", "function_call")
    refused(json.dumps({"model": "m", "messages": [{"role": "function", "content": "x"}]}).encode(),
            "invalid_request", "messages[0].name")


def test_legacy_history_renders_as_calls_and_named_results():
    messages = [{"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": None,
                 "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": "sunny"}]
    parsed = parse_chat(json.dumps({"model": "m", "messages": messages, "functions": FUNCTIONS}).encode())
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "tool"]
    assert parsed.messages[2].content == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert parsed.messages[3].content == '<tool_response name="get_weather">sunny</tool_response>'


def test_a_legacy_answer_shows_function_call_whole_and_streamed():
    message, finish = function_message(ChoiceResult(ANSWER, "stop"))
    assert finish == "function_call" and "tool_calls" not in message
    assert message == {"role": "assistant", "content": "Checking. ",
                       "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert function_message(ChoiceResult("text", "stop")) == ({"role": "assistant", "content": "text"}, "stop")
    fmt = FunctionChunkFormatter(request_id="r", created=0, model="m", include_usage=False)
    raw = b"".join(fmt.delta(ANSWER[i:i + 5]) for i in range(0, len(ANSWER), 5)) + fmt.finish("stop")
    events = [json.loads(line[6:])["choices"][0] for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    parts = [e["delta"]["function_call"] for e in events if "function_call" in e["delta"]]
    assert parts[0] == {"name": "get_weather", "arguments": ""} and all(set(p) == {"arguments"} for p in parts[1:])
    assert "".join(p["arguments"] for p in parts) == '{"city":"Paris"}'
    assert events[-1]["finish_reason"] == "function_call"


def _accepts(grammar: str, text: str) -> bool:
    """Whether the llguidance grammar accepts ``text`` whole (byte-level tokenizer: no model needed)."""
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer("byte"), grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_response_format_composes_with_auto_tools():
    grammar = parse_chat(chat(tools=TOOLS, response_format=FORMAT)).structured.grammar
    assert _accepts(grammar, '{"reply":"hi"}')
    assert _accepts(grammar, '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>')
    assert not _accepts(grammar, "free text") and not _accepts(grammar, '{"other":1}')
    objects = parse_chat(chat(tools=TOOLS, response_format={"type": "json_object"})).structured.grammar
    assert _accepts(objects, '{"any":1}') and not _accepts(objects, "[1]")
    required = parse_chat(chat(tools=TOOLS, tool_choice="required", response_format=FORMAT))
    assert required.structured == parse_chat(chat(tools=TOOLS, tool_choice="required")).structured
    assert not _accepts(required.structured.grammar, '{"reply":"hi"}')
