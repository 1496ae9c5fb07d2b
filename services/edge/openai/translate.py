"""Translate OpenAI HTTP bodies into ``schemas.InferenceRequest``. Pure: no aiohttp, no I/O.

``parse_chat`` / ``parse_completion`` decode and validate a raw body, raising ``BusError``
(``invalid_request`` or ``unsupported``, with the JSON path of the offending field as
``param``). ``to_request`` then builds the bus message once the edge has resolved the model
and chosen the request id, reply subject and deadline; ``choice_requests`` fans a request with
OpenAI ``n`` > 1 out into ``n`` ordinary requests (see its docstring for seeds).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams, StructuredOutput
from services.edge.openai import fields, tools
from services.edge.openai.structured import structured
from services.edge.openai.types import ChatCompletionBody, CompletionBody, MessageBody, SamplingFields

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})  # function: legacy results
MAX_STOP = 4
MAX_CHOICES = 16  # default bound on ``n`` (the edge's ``max_choices``)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat ``top_logprobs``
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the legacy completions ``logprobs``
_INT64 = 1 << 64

_chat_decoder = msgspec.json.Decoder(ChatCompletionBody)
_completion_decoder = msgspec.json.Decoder(CompletionBody)

# msgspec: "Expected `float`, got `str` - at `$.temperature`"; "Object missing required field `model`"
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated OpenAI request, independent of how it came in (chat or legacy completion)."""

    model: str
    messages: list[ChatMessage] | None
    prompt: str | None
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    priority: int
    adapter: str | None
    user: str | None
    timeout: float | None
    cache: bool = True
    n: int = 1  # choices asked for; ``sampling.n`` stays 1 (each choice is a request of its own)
    structured: StructuredOutput | None = None  # response_format / structured_outputs, or the tools' grammar
    read_calls: bool = False  # tools with a tool_choice other than none: the answer is read for tool calls
    legacy_calls: bool = False  # asked with the legacy ``functions``: a call is shown as ``function_call``


def _invalid(message: str, param: str | None) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _decode(decoder: msgspec.json.Decoder, raw: bytes):
    """Decode a body, turning msgspec's errors into ``invalid_request`` with the JSON path as param."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT_PATH.search(text)
        path = at.group(1) if at else ""
        missing = _MISSING.search(text)
        if missing:
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        unknown = _UNKNOWN.search(text)
        if unknown:  # never silently ignored: a field the edge does not know is refused by name
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise BusError(ErrorCode.UNSUPPORTED, f"unknown request field '{path}': it is not an OpenAI field this "
                           "platform serves (see the README's field table)", param=path) from None
        detail = _AT_PATH.sub("", text)
        raise _invalid(f"invalid request body: {detail}" + (f" (at '{path}')" if path else ""),
                       path or None) from None
    except msgspec.DecodeError as exc:
        raise _invalid(f"the request body is not valid JSON: {exc}", None) from None


def _check_range(value: float | None, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    if value is None:
        return
    if value < low or value > high or (low_open and value == low):
        lo = "(" if low_open else "["
        raise _invalid(f"'{name}' must be in {lo}{low:g}, {high:g}], got {value!r}", name)


def _check_min(value: int | float | None, name: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise _invalid(f"'{name}' must be at least {minimum}, got {value!r}", name)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise _invalid(f"'stop' may hold at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise _invalid("'stop' sequences must not be empty strings", "stop")
    return list(stops)


def _choices(n: int | None, max_n: int) -> int:
    """The number of choices asked for, in 1..``max_n`` (a ``max_n`` of 1: the API serves one choice only)."""
    if n is None:
        return 1
    if max_n == 1 and n != 1:
        raise BusError(ErrorCode.UNSUPPORTED, f"'n' must be 1 here (several choices per request are served by "
                                              f"the OpenAI endpoints), got {n}", param="n")
    if not 1 <= n <= max_n:
        raise _invalid(f"'n' must be in [1, {max_n}], got {n}", "n")
    return n


def _chat_logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """``SamplingParams.logprobs`` for chat's ``logprobs`` (bool) and ``top_logprobs`` (0..20, needs logprobs)."""
    if top_logprobs is not None:
        if not logprobs:
            raise _invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        _check_range(top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    return (top_logprobs or 0) if logprobs else None


def _completion_logprobs(logprobs: int | None) -> int | None:
    """``SamplingParams.logprobs`` for the legacy completions ``logprobs`` (an integer 0..5)."""
    _check_range(logprobs, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return logprobs


def _sampling(body: SamplingFields, max_tokens: int | None, default_max_tokens: int,
              max_tokens_param: str, max_n: int = 1) -> SamplingParams:
    """Check every sampling field's range and build ``SamplingParams`` (unset fields keep defaults).

    ``n`` is only checked (1..``max_n``): ``SamplingParams.n`` stays 1, choices are fanned out by the edge.
    """
    _choices(body.n, max_n)
    _check_min(max_tokens, max_tokens_param, 1)
    _check_range(body.temperature, "temperature", 0.0, 2.0)
    _check_range(body.top_p, "top_p", 0.0, 1.0, low_open=True)
    _check_range(body.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(body.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    _check_min(body.top_k, "top_k", 0)
    if body.repetition_penalty is not None and body.repetition_penalty <= 0:
        raise _invalid(f"'repetition_penalty' must be > 0, got {body.repetition_penalty!r}", "repetition_penalty")
    params = SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                            stop=_stop_list(body.stop), seed=body.seed,
                            logit_bias=fields.logit_bias(getattr(body, "logit_bias", None)))
    for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    return params


def _flatten_content(message: MessageBody, i: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        if message.role in ("assistant", "tool", "function"):
            return ""
        raise _invalid(f"messages[{i}].content is required for role '{message.role}'", f"messages[{i}].content")
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BusError(ErrorCode.UNSUPPORTED, f"only text content parts are supported, got type '{part.type}'"
                           + ("" if part.type != "text" else " without 'text'"), param=f"messages[{i}].content[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def _messages(bodies: list[MessageBody]) -> list[ChatMessage]:
    if not bodies:
        raise _invalid("'messages' must hold at least one message", "messages")
    out = []
    for i, m in enumerate(bodies):
        if m.role not in ROLES:
            raise _invalid(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got '{m.role}'",
                           f"messages[{i}].role")
        out.append(ChatMessage(role=m.role, content=_flatten_content(m, i), name=m.name))
    return out


def _common(body: ChatCompletionBody | CompletionBody) -> dict:
    if not body.model:
        raise _invalid("'model' must not be empty", "model")
    if body.timeout is not None and body.timeout <= 0:
        raise _invalid(f"'timeout' must be > 0 seconds, got {body.timeout!r}", "timeout")
    return dict(model=body.model, stream=bool(body.stream),
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                priority=body.priority, adapter=body.adapter or None, user=body.user, timeout=body.timeout,
                cache=body.cache, structured=structured(body.response_format, body.structured_outputs))


def parse_chat(raw: bytes, *, default_max_tokens: int = 256, max_n: int = MAX_CHOICES) -> ParsedRequest:
    """Decode and validate a ``/v1/chat/completions`` body (``max_completion_tokens`` wins over ``max_tokens``)."""
    body = _decode(_chat_decoder, raw)
    fields.check_chat_fields(body)
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    common = _common(body)
    sampling = _sampling(body, max_tokens, default_max_tokens, param, max_n)
    sampling.logprobs = _chat_logprobs(body.logprobs, body.top_logprobs)
    plan = tools.plan_tools(body, common["structured"])
    if plan.structured is not None:
        common["structured"] = plan.structured
    messages = tools.render(_messages(body.messages), body.messages, plan.functions)
    return ParsedRequest(messages=messages, prompt=None, sampling=sampling, n=_choices(body.n, max_n),
                         read_calls=plan.read_calls, legacy_calls=plan.legacy, **common)


def parse_completion(raw: bytes, *, default_max_tokens: int = 16, max_n: int = MAX_CHOICES) -> ParsedRequest:
    """Decode and validate a legacy ``/v1/completions`` body (OpenAI's default ``max_tokens`` there is 16)."""
    body = _decode(_completion_decoder, raw)
    fields.check_completion_fields(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BusError(ErrorCode.UNSUPPORTED, f"'prompt' must be a string or a list of exactly one string "
                                                  f"(batched prompts are not supported), got {len(prompt)}",
                           param="prompt")
        prompt = prompt[0]
    common = _common(body)
    sampling = _sampling(body, body.max_tokens, default_max_tokens, "max_tokens", max_n)
    sampling.logprobs = _completion_logprobs(body.logprobs)
    return ParsedRequest(messages=None, prompt=prompt, sampling=sampling, n=_choices(body.n, max_n), **common)


def to_request(parsed: ParsedRequest, *, request_id: str, model: str, reply_to: str, created: float,
               deadline: float) -> InferenceRequest:
    """The bus message for a validated request; ``model`` is the canonical id the alias resolved to."""
    return InferenceRequest(id=request_id, model=model, reply_to=reply_to, messages=parsed.messages,
                            prompt=parsed.prompt, sampling=parsed.sampling, stream=parsed.stream,
                            priority=parsed.priority, deadline=deadline, created=created,
                            adapter=parsed.adapter, user=parsed.user, cache=parsed.cache,
                            structured=parsed.structured,
                            producer_watches=True)  # the edge follows the engine itself (failover)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index``'s seed: ``seed + index`` (wrapped to a signed 64-bit value), or None (random) without one."""
    if seed is None:
        return None
    return (seed + index + (1 << 63)) % _INT64 - (1 << 63)


def choice_requests(req: InferenceRequest, n: int, reply_to: Callable[[str], str]) -> list[InferenceRequest]:
    """``req`` (OpenAI ``n`` choices) as ``n`` ordinary requests, each ``n`` 1 with an id of its own.

    Choice ``i`` has the id ``names.choice_id(req.id, i)`` (its reply subject ``reply_to(id)``) and
    the seed ``seed + i``: a seeded request is reproducible as a whole, yet its choices differ;
    without a seed each choice draws its own. ``n`` 1 is ``[req]`` itself.
    """
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        choice_id = names.choice_id(req.id, i)
        sampling = msgspec.structs.replace(req.sampling, n=1, seed=choice_seed(req.sampling.seed, i))
        out.append(msgspec.structs.replace(req, id=choice_id, reply_to=reply_to(choice_id), sampling=sampling))
    return out
