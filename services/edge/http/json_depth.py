"""A bound on how deeply a JSON body nests, checked before it is decoded. Pure.

A hostile body of a million ``[`` costs the decoder (and any code walking the result) far more
than its size suggests; real requests nest a handful of levels. Most bodies have fewer
brackets than the limit at all and cost two ``bytes.count`` calls; the rest are scanned over
only their structural bytes (quotes and brackets).
"""

from __future__ import annotations

from schemas.errors import BusError, ErrorCode

# Every byte but quotes and brackets is dropped before scanning.
_DROP = bytes(b for b in range(256) if b not in b'"[]{}')


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not count)."""
    # Escaped backslashes first, then escaped quotes: what is left of a quote delimits a string.
    structural = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DROP)
    depth = deepest = 0
    in_string = False
    for byte in structural:
        if byte == 0x22:
            in_string = not in_string
        elif in_string:
            continue
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_depth(raw: bytes, limit: int) -> None:
    """Raise ``invalid_request`` (400) if ``raw`` nests deeper than ``limit``."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    depth = json_depth(raw)
    if depth > limit:
        raise BusError(ErrorCode.INVALID_REQUEST,
                       f"the request body nests {depth} levels deep; at most {limit} are accepted")
