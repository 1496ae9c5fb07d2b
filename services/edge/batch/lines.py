"""A batch's input lines, output lines and batch object: parsing and rendering, no I/O.

An input line is ``{"custom_id", "method", "url", "body"}``; ``url`` must be one of
``ENDPOINTS`` (what a line may call) and every ``custom_id`` is unique.
A bad line is reported by its 1-based line number, as OpenAI does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from schemas.batch import BatchError, BatchOutputLine, BatchResponse, BatchState
from schemas.errors import BusError, ErrorCode

# What a batch line may call (``execute.ANSWERS`` has how each is answered).
ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_LINES = 50_000  # OpenAI's limit of requests per batch
# ``completion_window``: OpenAI accepts "24h"; shorter windows ("30m", "90s") are this platform's extension.
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW = 24 * 3600


class InputLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One line of an input file as uploaded."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


_line_decoder = msgspec.json.Decoder(InputLine)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Line:
    """A validated input line: its 0-based index, id, url and raw JSON body."""

    index: int
    custom_id: str
    url: str
    body: bytes


def _bad(number: int, message: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, f"line {number} of the file: {message}", param="file")


def parse_line(raw: bytes, number: int) -> InputLine:
    """One JSONL line (``number`` is 1-based, for the message); ``invalid_request`` naming the line if bad."""
    try:
        line = _line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _bad(number, f"{exc} (each line is {{\"custom_id\", \"method\", \"url\", \"body\"}})") from None
    except msgspec.DecodeError as exc:
        raise _bad(number, f"not valid JSON ({exc})") from None
    if not line.custom_id:
        raise _bad(number, "'custom_id' is empty")
    if line.method != "POST":
        raise _bad(number, f"'method' must be 'POST', got {line.method!r}")
    if line.url not in ENDPOINTS:
        raise _bad(number, f"'url' {line.url!r} is not an endpoint a batch can call "
                           f"(one of: {', '.join(ENDPOINTS)})")
    if not bytes(line.body).lstrip().startswith(b"{"):
        raise _bad(number, "'body' must be a JSON object")
    return line


def parse_lines(rows: Iterable[bytes]) -> list[Line]:
    """Every non-blank line of an input file, validated; the first bad one raises (by line number)."""
    out: list[Line] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(rows, start=1):
        if not raw.strip():
            continue
        line = parse_line(raw, number)
        if (first := seen.get(line.custom_id)) is not None:
            raise _bad(number, f"'custom_id' {line.custom_id!r} was already used on line {first}; "
                               "custom_id values must be unique")
        seen[line.custom_id] = number
        out.append(Line(len(out), line.custom_id, line.url, bytes(line.body)))
        if len(out) > MAX_LINES:
            raise _bad(number, f"a batch holds at most {MAX_LINES} requests")
    if not out:
        raise BusError(ErrorCode.INVALID_REQUEST, "the file has no request lines", param="file")
    return out


def window_seconds(window: object) -> int:
    """Seconds of a ``completion_window`` (``"24h"``, or a shorter ``<n>s|m|h``); ``invalid_request`` if bad."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(match.group(1)) * _UNIT[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW:
        raise BusError(ErrorCode.INVALID_REQUEST, f"'completion_window' must be '24h' (or a shorter window like "
                       f"'30m'), got {window!r}", param="completion_window")
    return seconds


def ok_line(line_id: str, custom_id: str, request_id: str, body: bytes) -> BatchOutputLine:
    """An output-file line: the answer's 200 body."""
    return BatchOutputLine(id=line_id, custom_id=custom_id,
                           response=BatchResponse(status_code=200, request_id=request_id, body=msgspec.Raw(body)))


def failed_line(line_id: str, custom_id: str, request_id: str, status: int, body: bytes) -> BatchOutputLine:
    """An error-file line of a request that got an error answer (its status and OpenAI error body)."""
    return BatchOutputLine(id=line_id, custom_id=custom_id,
                           response=BatchResponse(status_code=status, request_id=request_id, body=msgspec.Raw(body)))


def skipped_line(line_id: str, custom_id: str, code: str, message: str) -> BatchOutputLine:
    """An error-file line of a request that never ran to its end: ``batch_cancelled`` or ``batch_expired``."""
    return BatchOutputLine(id=line_id, custom_id=custom_id, error=BatchError(code=code, message=message))


def jsonl(lines: Iterable[BatchOutputLine]) -> bytes:
    """A JSONL file of output lines."""
    return b"".join(_encode(line) + b"\n" for line in lines)


def batch_object(state: BatchState, counts: tuple[int, int] | None = None) -> dict:
    """OpenAI's batch object; ``counts`` (completed, failed) are live ones, else the state's final ones."""
    completed, failed = counts if counts is not None else (state.completed, state.failed)
    errors = None
    if state.errors:
        errors = {"object": "list", "data": [msgspec.structs.asdict(e) for e in state.errors]}
    return {
        "id": state.id, "object": "batch", "endpoint": state.endpoint, "errors": errors,
        "input_file_id": state.input_file_id, "completion_window": state.completion_window,
        "status": state.status, "output_file_id": state.output_file_id, "error_file_id": state.error_file_id,
        "created_at": state.created_at, "in_progress_at": state.in_progress_at, "expires_at": state.expires_at,
        "finalizing_at": state.finalizing_at, "completed_at": state.completed_at, "failed_at": state.failed_at,
        "expired_at": state.expired_at, "cancelling_at": state.cancelling_at, "cancelled_at": state.cancelled_at,
        "request_counts": {"total": state.total, "completed": completed, "failed": failed},
        "metadata": state.metadata,
    }
