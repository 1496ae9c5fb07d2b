"""OpenAI chat training records with tools: rendered exactly as the edge renders a served request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.edge.openai.translate import parse_chat
from services.trainer.datasets import IGNORE_INDEX, DatasetError, load_dataset, prepare

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CHAT = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny and 21 C in Paris."}]


def write(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tools_calls_and_results_render_as_the_edge_renders_them(tmp_path: Path, default_model_dir: Path) -> None:
    loaded = load_dataset(write(tmp_path / "t.jsonl", {"messages": CHAT, "tools": TOOLS}))
    [conv] = list(loaded.conversations)
    served = parse_chat(json.dumps({"model": "m", "messages": CHAT, "tools": TOOLS}).encode()).messages
    assert [(t.role, t.text) for t in conv.turns] == [(m.role, m.content) for m in served]
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenized, info = prepare(tmp_path / "t.jsonl", tokenizer, 1024)
    example = tokenized[0]
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    eot = tokenizer.eos_token
    assert [tokenizer.decode(r) for r in runs] == [
        f'<tool_call>{{"name":"get_weather","arguments":{{"city":"Paris"}}}}</tool_call>{eot}',
        f"It is sunny and 21 C in Paris.{eot}"]


def test_a_bad_tool_call_is_refused_by_field(tmp_path: Path) -> None:
    bad = [CHAT[0], {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]
    with pytest.raises(DatasetError) as err:
        list(load_dataset(write(tmp_path / "t.jsonl", {"messages": bad})).conversations)
    assert (err.value.code, err.value.field) == ("invalid_field_type", "messages[1].tool_calls[0]")


def test_a_result_for_no_earlier_call_is_refused_by_field(tmp_path: Path) -> None:
    stray = CHAT[:2] + [{**CHAT[2], "tool_call_id": "call_9"}] + CHAT[3:]
    with pytest.raises(DatasetError) as err:
        list(load_dataset(write(tmp_path / "t.jsonl", {"messages": stray, "tools": TOOLS})).conversations)
    assert (err.value.code, err.value.field) == ("invalid_field_type", "messages[2].tool_call_id")
