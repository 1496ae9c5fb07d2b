"""Structured outputs at the edge: ``response_format`` / vLLM's ``structured_outputs`` into ``StructuredOutput``.

Pure: no aiohttp, no grammar library. The edge checks that a JSON Schema stays inside the
subset every engine's grammar compiler enforces (``check_schema``), without compiling it: a
schema using anything else is a 400 ``unsupported`` naming the keyword and where it is. The
engine compiles the constraint (and answers ``invalid_request`` if it cannot, e.g. a regex
its library rejects).

The supported subset (README, "Structured outputs"): ``type`` (one or a list of object, array,
string, integer, number, boolean, null); objects with ``properties``, ``required`` and
``additionalProperties`` (false, true or a schema); ``enum`` and ``const``; arrays with
``items``, ``minItems``, ``maxItems``; strings with ``minLength``, ``maxLength``, ``pattern``
and ``format`` (date-time, date, time, duration, email, hostname, ipv4, ipv6, uuid); numbers
and integers with ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``;
``anyOf``; local ``$ref`` into ``$defs`` / ``definitions``; and the annotations ``title``,
``description``, ``default``, ``examples``, ``$schema``, ``$id``, ``$comment``.
"""

from __future__ import annotations

import json
from typing import Any

from schemas.errors import BusError, ErrorCode
from schemas.inference import StructuredOutput
from services.edge.openai.types import ResponseFormat, StructuredOutputsBody

TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
_NUMBER_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_COUNTS = frozenset({"minItems", "maxItems", "minLength", "maxLength"})
KEYWORDS = _ANNOTATIONS | _NUMBER_BOUNDS | _COUNTS | frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const", "items", "pattern", "format",
    "anyOf", "$ref", "$defs", "definitions"})
MAX_SCHEMA_BYTES = 64 * 1024  # a bigger schema is refused before it reaches an engine
MAX_CHOICES = 256
MAX_PATTERN_CHARS = 4096


def _unsupported(message: str, param: str) -> BusError:
    return BusError(ErrorCode.UNSUPPORTED, message, param=param)


def _invalid(message: str, param: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _check_type(value: Any, at: str, param: str) -> None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _invalid(f"'type' at {at} must be a type name or a list of them", param)
    for name in names:
        if name not in TYPES:
            raise _unsupported(f"JSON Schema type {name!r} at {at} is not supported "
                               f"(supported: {', '.join(sorted(TYPES))})", param)


def _check_value(key: str, value: Any, at: str, param: str, defs: set[str]) -> None:
    """Check one keyword's value (and recurse into the subschemas it holds)."""
    where = f"{at}/{key}"
    if key == "type":
        _check_type(value, at, param)
    elif key == "properties":
        if not isinstance(value, dict):
            raise _invalid(f"'properties' at {at} must be an object", param)
        for name, sub in value.items():
            check_schema(sub, param, f"{where}/{name}", defs)
    elif key in ("additionalProperties", "items"):
        if not isinstance(value, bool):
            check_schema(value, param, where, defs)
        elif key == "items":
            raise _unsupported(f"'items' at {at} must be a schema (a boolean is not supported)", param)
    elif key == "anyOf":
        if not isinstance(value, list) or not value:
            raise _invalid(f"'anyOf' at {at} must be a non-empty list of schemas", param)
        for i, sub in enumerate(value):
            check_schema(sub, param, f"{where}/{i}", defs)
    elif key in ("$defs", "definitions"):
        if not isinstance(value, dict):
            raise _invalid(f"'{key}' at {at} must be an object", param)
        for name, sub in value.items():
            check_schema(sub, param, f"{where}/{name}", defs)
    elif key == "$ref":
        if not isinstance(value, str) or value not in defs:
            raise _unsupported(f"'$ref' {value!r} at {at}: only local references to '#/$defs/<name>' or "
                               "'#/definitions/<name>' of this schema are supported", param)
    elif key == "required":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _invalid(f"'required' at {at} must be a list of property names", param)
    elif key == "enum":
        if not isinstance(value, list) or not value:
            raise _invalid(f"'enum' at {at} must be a non-empty list", param)
    elif key in _COUNTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _invalid(f"'{key}' at {at} must be a non-negative integer", param)
    elif key in _NUMBER_BOUNDS:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _invalid(f"'{key}' at {at} must be a number", param)
    elif key == "pattern":
        if not isinstance(value, str) or len(value) > MAX_PATTERN_CHARS:
            raise _invalid(f"'pattern' at {at} must be a string of at most {MAX_PATTERN_CHARS} characters", param)
    elif key == "format" and value not in FORMATS:
        raise _unsupported(f"string format {value!r} at {at} is not supported "
                           f"(supported: {', '.join(sorted(FORMATS))})", param)


def check_schema(schema: Any, param: str, at: str = "#", defs: set[str] | None = None) -> None:
    """Raise ``unsupported`` naming the first keyword outside the supported subset (``at``: its JSON pointer)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _invalid(f"the schema at {at} must be an object", param)
    if defs is None:  # the root: every local reference a $ref may name
        defs = {f"#/{group}/{name}" for group in ("$defs", "definitions")
                if isinstance(schema.get(group), dict) for name in schema[group]}
    for key, value in schema.items():
        if key not in KEYWORDS:
            raise _unsupported(f"JSON Schema keyword {key!r} at {at} is not supported by constrained decoding "
                               "here (see the README's 'Structured outputs' for the subset)", param)
        _check_value(key, value, at, param, defs)


def _json_schema(schema: Any, param: str) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise _invalid(f"the schema is not valid JSON: {exc}", param) from None
    check_schema(schema, param)
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)  # key order kept: it orders the answer
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise _invalid(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes", param)
    return StructuredOutput(kind="json_schema", json=text)


def from_response_format(fmt: ResponseFormat | None, param: str = "response_format") -> StructuredOutput | None:
    """OpenAI ``response_format`` (or the native ``responseFormat``): None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(kind="json_object")
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise _invalid(f"'{param}.json_schema' is required when type is 'json_schema'", f"{param}.json_schema")
        if fmt.json_schema.schema is None:  # OpenAI: no schema means any JSON object
            return StructuredOutput(kind="json_object")
        return _json_schema(fmt.json_schema.schema, f"{param}.json_schema.schema")
    raise _invalid(f"'{param}.type' must be one of text, json_object, json_schema, got {fmt.type!r}",
                   f"{param}.type")


def from_structured_outputs(body: StructuredOutputsBody | None) -> StructuredOutput | None:
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, grammar, json_object."""
    if body is None:
        return None
    given = [name for name in ("json", "regex", "choice", "grammar") if getattr(body, name) is not None]
    if body.json_object:
        given.append("json_object")
    if body.structural_tag is not None:
        raise _unsupported("'structured_outputs.structural_tag' is not supported", "structured_outputs.structural_tag")
    if len(given) != 1:
        raise _invalid("'structured_outputs' must set exactly one of json, regex, choice, grammar, json_object"
                       f" (got {', '.join(given) or 'none'})", "structured_outputs")
    kind = given[0]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return _json_schema(body.json, param)
    if kind == "json_object":
        return StructuredOutput(kind="json_object")
    if kind == "choice":
        if not body.choice or len(body.choice) > MAX_CHOICES or any(not c for c in body.choice):
            raise _invalid(f"'{param}' must be 1..{MAX_CHOICES} non-empty strings", param)
        return StructuredOutput(kind="choice", choice=list(body.choice))
    text = body.regex if kind == "regex" else body.grammar
    if not text or len(text) > MAX_SCHEMA_BYTES:
        raise _invalid(f"'{param}' must be a non-empty string of at most {MAX_SCHEMA_BYTES} characters", param)
    return StructuredOutput(kind=kind, regex=text) if kind == "regex" else StructuredOutput(kind=kind, grammar=text)


def structured(fmt: ResponseFormat | None, outputs: StructuredOutputsBody | None) -> StructuredOutput | None:
    """The request's one constraint: ``response_format`` or ``structured_outputs``, never both."""
    a = from_response_format(fmt)
    b = from_structured_outputs(outputs)
    if a is not None and b is not None:
        raise _invalid("set either 'response_format' or 'structured_outputs', not both", "structured_outputs")
    return a or b
