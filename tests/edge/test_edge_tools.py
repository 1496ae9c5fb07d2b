"""Tool calling at the edge: ``tools`` / ``tool_choice`` into the request, and calls out of the answer."""

from __future__ import annotations

import json

import pytest

from schemas.errors import BusError
from schemas.events import Usage
from services.common.cache_key import cache_key
from services.edge.openai.bodies import ChoiceResult, chat_completion
from services.edge.openai.tool_answers import ToolChunkFormatter, tool_message
from services.edge.openai.translate import parse_chat, to_request

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
ANSWER = 'Checking. <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def refused(raw: bytes, code: str, param: str) -> None:
    with pytest.raises(BusError) as info:
        parse_chat(raw)
    assert (info.value.code, info.value.param) == (code, param), info.value


def test_tool_choice_picks_the_constraint_and_whether_calls_are_read():
    auto = parse_chat(chat(tools=TOOLS))
    assert auto.read_calls and auto.structured.kind == "grammar" and "head[lazy]" in auto.structured.grammar
    assert auto.messages[0].role == "system" and "get_weather" in auto.messages[0].content
    none = parse_chat(chat(tools=TOOLS, tool_choice="none"))
    assert not none.read_calls and none.structured is None and none.messages == auto.messages
    required = parse_chat(chat(tools=TOOLS, tool_choice="required"))
    assert "head[lazy]" not in required.structured.grammar and "fn_1" in required.structured.grammar
    assert "call call{0,7}" in required.structured.grammar
    single = parse_chat(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert "call{0," not in single.structured.grammar
    named = parse_chat(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}))
    assert "fn_1" not in named.structured.grammar and '\\"now\\"' in named.structured.grammar


def test_tools_and_tool_choice_change_the_cache_key():
    def key(**fields) -> str:
        req = to_request(parse_chat(chat(temperature=0, **fields)), request_id="r", model="m", reply_to="x",
                         created=0, deadline=1)
        return cache_key(req)

    keys = {key(), key(tools=TOOLS), key(tools=TOOLS, tool_choice="none"), key(tools=TOOLS, tool_choice="required"),
            key(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), key(tools=TOOLS[:1]),
            key(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}})}
    assert len(keys) == 7


def test_earlier_calls_and_results_are_rendered_into_the_chat():
    messages = [{"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    parsed = parse_chat(json.dumps({"model": "m", "messages": messages, "tools": TOOLS}).encode())
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "tool"]
    assert parsed.messages[2].content == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert parsed.messages[3].content == '<tool_response name="get_weather">sunny</tool_response>'
    assert parsed.messages[3].name == "get_weather"


def test_results_pair_with_their_calls_by_id_not_by_order():
    calls = [{"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": "{}"}}
             for n, name in ((1, "get_weather"), (2, "now"))]
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    parsed = parse_chat(json.dumps({"model": "m", "messages": messages, "tools": TOOLS}).encode())
    assert [m.content for m in parsed.messages[-2:]] == ['<tool_response name="now">noon</tool_response>',
                                                         '<tool_response name="get_weather">sunny</tool_response>']
    stray = messages[:3] + [{"role": "tool", "tool_call_id": "call_9", "content": "?"}]
    with pytest.raises(BusError) as info:
        parse_chat(json.dumps({"model": "m", "messages": stray, "tools": TOOLS}).encode())
    assert (info.value.code, info.value.param) == ("invalid_request", "messages[3].tool_call_id")
    assert "'call_9'" in info.value.message
    early = [{"role": "user", "content": "?"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]
    refused(json.dumps({"model": "m", "messages": early}).encode(), "invalid_request", "messages[1].tool_call_id")


def test_bad_tool_requests_are_refused_by_name():
    refused(chat(tools=[{"type": "custom"}]), "unsupported", "tools[0].type")
    refused(chat(tools=[{"type": "function"}]), "invalid_request", "tools[0].function")
    refused(chat(tools=[{"type": "function", "function": {"name": "a b"}}]), "invalid_request",
            "tools[0].function.name")
    refused(chat(tools=TOOLS + TOOLS[:1]), "invalid_request", "tools[2].function.name")
    refused(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]), "unsupported",
            "tools[0].function.parameters")
    refused(chat(tool_choice="required"), "invalid_request", "tool_choice")
    refused(chat(tools=TOOLS, tool_choice="sometimes"), "invalid_request", "tool_choice")
    refused(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}), "invalid_request",
            "tool_choice.function.name")
    refused(chat(tools=TOOLS, structured_outputs={"regex": "a+"}), "unsupported", "structured_outputs")
    refused(chat(tools=TOOLS, logprobs=True), "unsupported", "logprobs")
    refused(chat(functions=[{"name": "f"}], tools=TOOLS), "invalid_request", "functions")
    bad_args = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                       "function": {"name": "f", "arguments": "{oops"}}]}]
    refused(json.dumps({"model": "m", "messages": bad_args}).encode(), "invalid_request",
            "messages[0].tool_calls[0].function.arguments")
    assert not parse_chat(chat(tools=TOOLS, tool_choice="none", response_format={"type": "json_object"})).read_calls


def test_a_whole_answer_shows_its_calls():
    message, finish = tool_message(ChoiceResult(ANSWER, "stop"))
    assert finish == "tool_calls" and message["content"] == "Checking. "
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert tool_message(ChoiceResult("just text", "stop")) == ({"role": "assistant", "content": "just text"}, "stop")
    cut, finish = tool_message(ChoiceResult(ANSWER[:ANSWER.index("ris")], "length"))
    assert finish == "length" and cut["tool_calls"][0]["function"]["arguments"] == '{"city":"Pa'
    usage = Usage(prompt_tokens=1, completion_tokens=2)
    body = json.loads(chat_completion(request_id="r", created=0, model="m", usage=usage, text=ANSWER,
                                      finish_reason="stop", message=tool_message))
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def _events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]


def test_a_stream_sends_name_first_then_argument_fragments_in_openais_shape():
    fmt = ToolChunkFormatter(request_id="r", created=0, model="m", include_usage=False)
    raw = b"".join(fmt.delta(ANSWER[i:i + 7]) for i in range(0, len(ANSWER), 7)) + fmt.finish("stop")
    events = [e["choices"][0] for e in _events(raw)]
    content = "".join(e["delta"].get("content") or "" for e in events)
    calls = [part for e in events for part in e["delta"].get("tool_calls", [])]
    assert content == "Checking. "
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert all(set(part) == {"index", "function"} and set(part["function"]) == {"arguments"} for part in calls[1:])
    assert "".join(part["function"]["arguments"] for part in calls) == '{"city":"Paris"}'
    assert events[-1]["finish_reason"] == "tool_calls"
