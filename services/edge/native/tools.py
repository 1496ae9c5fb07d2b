"""Tool calling on the native API: ``tools``, ``toolChoice`` and ``parallelToolCalls``. Pure.

The native body is read as the OpenAI chat fields it names (``tools`` is OpenAI's list of
function tools, ``toolChoice`` / ``parallelToolCalls`` are ``tool_choice`` /
``parallel_tool_calls``; ``messages`` are OpenAI messages, with ``tool_calls`` and
``tool_call_id``) and planned and rendered by the same code as ``/v1/chat/completions``
(``services.edge.openai.tools``), so the native answer is constrained and read the same way.
"""

from __future__ import annotations

from schemas.errors import BusError, ErrorCode
from schemas.inference import StructuredOutput
from services.edge.native.types import NativeInferenceBody
from services.edge.openai import tools
from services.edge.openai.tools import ToolPlan
from services.edge.openai.types import ChatCompletionBody

# The OpenAI name of each native field in an error's ``param`` (the rest is spelled the same).
_NATIVE_PARAMS = (("tool_choice", "toolChoice"), ("response_format", "responseFormat"))


def _native_param(param: str | None) -> str | None:
    for openai_name, native_name in _NATIVE_PARAMS:
        if param is not None and param.startswith(openai_name):
            return native_name + param[len(openai_name):]
    return param


def plan(body: NativeInferenceBody, constraint: StructuredOutput | None) -> ToolPlan | None:
    """The tools of a native body (None when it offers none); ``constraint``: its ``responseFormat``."""
    if body.tools is None and body.toolChoice is None:
        return None
    if body.messages is None:
        raise BusError(ErrorCode.INVALID_REQUEST, "'tools' needs 'messages' (a chat), not 'prompt'",
                       param="tools" if body.tools is not None else "toolChoice")
    chat = ChatCompletionBody(model="", messages=body.messages, tools=body.tools, tool_choice=body.toolChoice,
                              parallel_tool_calls=body.parallelToolCalls)
    try:
        return tools.plan_tools(chat, constraint)
    except BusError as err:
        raise BusError(err.code, err.message, param=_native_param(err.param)) from None

