"""Dataset records to conversations: the record shapes (alpaca, ShareGPT, OpenAI, text) and
the one normalised form the tokenizer reads.

Pure logic over decoded records (dicts); reading files is ``datasets.py``'s concern. Every
error is a ``DatasetError`` naming the field, located by the caller at its line or record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from services.common import tool_format

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
# Conversation kinds: a chat (chat template, loss on assistant turns), a raw prompt/completion
# pair (no template, loss on the completion) and plain text (loss on every token).
CHAT, COMPLETION, TEXT = "chat", "completion", "text"

ALPACA, SHAREGPT, OPENAI, PLAIN = "alpaca", "sharegpt", "openai", "text"
SHAPES = (ALPACA, SHAREGPT, OPENAI, PLAIN)

EXPECTED = {
    ALPACA: 'alpaca records: {"instruction": ..., "input": ..., "output": ...}',
    SHAREGPT: 'ShareGPT records: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}',
    OPENAI: 'OpenAI chat records: {"messages": [{"role": ..., "content": ...}]}',
    PLAIN: 'text records: {"text": ...}',
}

SHAREGPT_ROLES = {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT,
                  "assistant": ASSISTANT, "model": ASSISTANT, "chatgpt": ASSISTANT}
OPENAI_ROLES = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}


class DatasetError(Exception):
    """A dataset the trainer cannot use, with where and why, worded for the user who sent it.

    ``code`` is a stable machine value (``missing_field``, ``invalid_json``, ``empty_file``…);
    ``line`` is 1-based and counts ``unit``\\s: text lines of a JSON Lines file, records of a
    JSON array, CSV, Parquet or saved dataset. ``str(err)`` is the full sentence.
    """

    def __init__(self, code: str, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, unit: str = "line") -> None:
        self.code = code
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.unit = unit
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where = f"{where} {self.unit} {self.line}".strip()
        return f"{where}: {self.message}" if where else self.message

    def __repr__(self) -> str:
        return f"DatasetError({self.code!r}, {str(self)!r})"

    def at(self, file: str, line: int | None = None, unit: str = "line") -> DatasetError:
        """This error located in ``file`` (at ``line``, counted in ``unit``), unless already located."""
        if self.file is not None:
            return self
        return DatasetError(self.code, self.message, file=file, line=line, field=self.field, unit=unit)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``trained`` is False on an assistant turn not to learn from
    (OpenAI ``"weight": 0``) and is ignored on system and user turns."""

    role: str
    text: str
    trained: bool = True


@dataclass(frozen=True)
class Conversation:
    """One training example in normalised form.

    ``kind`` CHAT: rendered with the model's chat template, loss on trained assistant turns.
    COMPLETION: ``turns`` is (user prompt, assistant completion), concatenated raw, loss on the
    completion. TEXT: one assistant turn holding the text, loss on all of it. ``source`` is
    where the record came from, ``(file, line, unit)``, for error messages only.
    """

    turns: tuple[Turn, ...]
    kind: str = CHAT
    source: tuple[str, int, str] | None = field(default=None, compare=False)


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _missing(name: str, shape: str) -> DatasetError:
    return DatasetError("missing_field", f'field "{name}" is missing (expected {EXPECTED[shape]})', field=name)


def _string(record: dict, name: str, shape: str, *, required: bool = True, path: str | None = None) -> str:
    """``record[name]`` as a string; None counts as absent (tables fill missing cells with null)."""
    value = record.get(name)
    path = path or name
    if value is None:
        if required:
            raise _missing(path, shape)
        return ""
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(value) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    if not isinstance(value, str):
        raise DatasetError("invalid_field_type",
                           f'field "{path}" must be a string, got {json_type(value)}', field=path)
    return value


def _turn_list(record: dict, name: str, shape: str) -> list:
    """``record[name]`` as a list of turns, decoding a JSON string (a CSV or Parquet cell)."""
    value = record.get(name)
    if value is None:
        raise _missing(name, shape)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetError("invalid_json", f'field "{name}" is not valid JSON ({exc.msg})', field=name) from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DatasetError("invalid_field_type", f'field "{name}" must be an array, got {json_type(value)}',
                           field=name)
    return value


def _with_assistant(turns: list[Turn], name: str) -> Conversation:
    if not any(t.role == ASSISTANT and t.trained for t in turns):
        raise DatasetError("no_assistant_turn", f'field "{name}" has no assistant turn to train on; '
                           "every conversation needs at least one assistant reply", field=name)
    return Conversation(tuple(turns))


def _chat_turns(record: dict, name: str, shape: str, keys: tuple[str, str], roles: dict) -> Conversation:
    """Turns of a ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) record."""
    role_key, text_key = keys
    turns = []
    for i, item in enumerate(_turn_list(record, name, shape)):
        here = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise DatasetError("invalid_field_type", f'field "{here}" must be an object, got {json_type(item)}',
                               field=here)
        # Tables unify struct fields, so a ShareGPT turn may carry role/content and null from/value.
        raw_role = item.get(role_key) if item.get(role_key) is not None else item.get("role")
        if raw_role is None:
            raise _missing(f"{here}.{role_key}", shape)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            known = ", ".join(sorted(roles))
            raise DatasetError("unknown_role", f'field "{here}.{role_key}" has unknown role {json.dumps(raw_role)} '
                               f"(expected one of: {known})", field=f"{here}.{role_key}")
        text_name = "content" if item.get(text_key) is None and item.get("content") is not None else text_key
        text = _string(item, text_name, shape, path=f"{here}.{text_name}")
        turns.append(Turn(role, text, trained=item.get("weight") not in (0, 0.0)))
    return _with_assistant(turns, name)


def _alpaca(record: dict) -> Conversation:
    instruction = _string(record, "instruction", ALPACA)
    extra = _string(record, "input", ALPACA, required=False)
    output = _string(record, "output", ALPACA)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Conversation((Turn(USER, prompt), Turn(ASSISTANT, output)))


def _openai(record: dict) -> Conversation:
    if record.get("messages") is None and record.get("prompt") is not None:
        prompt = _string(record, "prompt", OPENAI)
        completion = _string(record, "completion", OPENAI)
        return Conversation((Turn(USER, prompt), Turn(ASSISTANT, completion)), kind=COMPLETION)
    if record.get("tools") is not None or _has_tool_calls(record):
        return _openai_with_tools(record)
    return _chat_turns(record, "messages", OPENAI, ("role", "content"), OPENAI_ROLES)


def _json_field(value: object, name: str) -> object:
    """A field that a CSV or Parquet cell holds as JSON text, decoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise DatasetError("invalid_json", f'field "{name}" is not valid JSON ({exc.msg})', field=name) from None


def _has_tool_calls(record: dict) -> bool:
    messages = _json_field(record.get("messages"), "messages")
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("tool_calls") for m in messages)


def _invalid(name: str, what: str) -> DatasetError:
    return DatasetError("invalid_field_type", f'field "{name}" must be {what}', field=name)


def _functions(record: dict) -> list[tool_format.Function]:
    """The record's ``tools`` (OpenAI function tools) for the prompt's tools section."""
    tools = _json_field(record.get("tools"), "tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "an array of tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _invalid(f"tools[{i}]", 'a function tool: {"type": "function", "function": {"name": ...}}')
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _invalid(f"tools[{i}].function.parameters", "a JSON Schema object")
        out.append(tool_format.Function(fn["name"], fn.get("description") or "",
                                        params if params is not None else dict(tool_format.NO_PARAMETERS)))
    return out


def _calls(item: dict, here: str) -> list[tool_format.Call]:
    """An assistant message's ``tool_calls`` (arguments as JSON text, or an object)."""
    calls = item.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _invalid(f"{here}.tool_calls", "an array of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _invalid(f"{here}.tool_calls[{j}]", 'a call: {"function": {"name": ..., "arguments": ...}}')
        arguments = fn.get("arguments", "{}")
        out.append(tool_format.Call(fn["name"], arguments if isinstance(arguments, str) else json.dumps(arguments),
                                    call.get("id") if isinstance(call.get("id"), str) else None))
    return out


def _openai_with_tools(record: dict) -> Conversation:
    """An OpenAI chat with ``tools``, assistant ``tool_calls`` and ``tool`` turns, in the platform's tool format
    (``services.common.tool_format``: the same rendering the served model sees at inference)."""
    plain = _chat_turns({"messages": [{**m, "content": m.get("content") or ""} if isinstance(m, dict) else m
                                      for m in _turn_list(record, "messages", OPENAI)]},
                        "messages", OPENAI, ("role", "content"), OPENAI_ROLES)
    items = _turn_list(record, "messages", OPENAI)
    dicts = [{"role": t.role, "content": t.text, "tool_calls": _calls(item, f"messages[{i}]"),
              "tool_call_id": item.get("tool_call_id") if t.role == "tool" else None}
             for i, (t, item) in enumerate(zip(plain.turns, items))]
    try:  # a result paired with its call by id shows the call's function name, as the edge renders it
        rendered = tool_format.render_messages(dicts, _functions(record))
    except tool_format.UnknownCallId as exc:
        raise _invalid(f"messages[{exc.index}].tool_call_id", "the id of a call in an earlier assistant message") from None
    trained = [True] * (len(rendered) - len(dicts)) + [t.trained for t in plain.turns]
    return Conversation(tuple(Turn(m["role"], m["content"], trained=w) for m, w in zip(rendered, trained)))


def _plain(record: dict) -> Conversation:
    return Conversation((Turn(ASSISTANT, _string(record, "text", PLAIN)),), kind=TEXT)


PARSERS = {
    ALPACA: _alpaca,
    SHAREGPT: lambda r: _chat_turns(r, "conversations", SHAREGPT, ("from", "value"), SHAREGPT_ROLES),
    OPENAI: _openai,
    PLAIN: _plain,
}


def detect_shape(record: dict) -> str:
    """The record shape a record's fields show; raises ``missing_field`` when none fits."""
    def has(name: str) -> bool:
        return record.get(name) is not None

    if has("messages"):
        return OPENAI
    if has("conversations"):
        return SHAREGPT
    if has("instruction") or (has("output") and not has("text")):
        return ALPACA
    if has("prompt") and has("completion"):
        return OPENAI
    if has("text"):
        return PLAIN
    found = ", ".join(json.dumps(str(k)[:40]) for k in list(record)[:8]) or "none"
    raise DatasetError("missing_field", f"no known record fields (found: {found}); expected "
                       '"messages" (OpenAI chat), "conversations" (ShareGPT), "instruction" and "output" '
                       '(alpaca), "prompt" and "completion", or "text"')


def to_conversations(records: Iterable[tuple[int, object]], shape: str | None, *, file: str,
                     unit: str) -> tuple[str, list[Conversation]]:
    """Validate ``(location, record)`` pairs and normalise them; the shape is ``shape`` or, when
    None, the one the first record shows. Raises the first ``DatasetError``, located."""
    conversations: list[Conversation] = []
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise DatasetError("invalid_file_format",
                                   f"expected a JSON object per record, got {json_type(record)}")
            shape = shape or detect_shape(record)
            conv = PARSERS[shape](record)
        except DatasetError as err:
            raise err.at(file, where, unit) from None
        conversations.append(replace(conv, source=(file, where, unit)))
    if not conversations:
        raise DatasetError("empty_file", "the file has no records to train on", file=file)
    return shape or OPENAI, conversations
