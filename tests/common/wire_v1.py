"""What the frozen v1 wire tests share: a case (frozen bytes, how a service decodes them, the value
they stand for) and the comparison of a decoded message with the field values frozen for it.

The cases themselves live in ``test_wire_v1.py`` and ``test_wire_v1_training.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass(frozen=True)
class WireCase:
    """Bytes a v1 peer sent, the decoder the receiving service uses, and what they must decode to.

    ``expected`` is a Struct for a message with every field set (compared whole, and encoded back
    to ``wire``), or a dict of every field's value for a message that sets only the required
    ones (so the defaults a v1 sender relied on are frozen too).
    """

    name: str
    decode: Callable[[bytes], Any]
    wire: bytes
    expected: Any


def decoder(kind: type) -> Callable[[bytes], Any]:
    """The JSON decoder of ``kind``, built once, as the services build theirs."""
    return msgspec.json.Decoder(kind).decode


def frozen_fields(value: Any, frozen: Any) -> Any:
    """``value`` with Structs turned into dicts of only the fields ``frozen`` names (at every depth).

    Fields added later with a default are left out, so adding one never fails a frozen case; a
    frozen field that no longer exists raises ``AttributeError``.
    """
    if isinstance(value, msgspec.Struct) and isinstance(frozen, dict):
        return {name: frozen_fields(getattr(value, name), frozen[name]) for name in frozen}
    if isinstance(value, list) and isinstance(frozen, list) and len(value) == len(frozen):
        return [frozen_fields(v, f) for v, f in zip(value, frozen)]
    return value


def with_unknown_field(wire: bytes) -> bytes:
    """``wire`` with a field no v1 struct has, as a newer peer would add it."""
    assert wire.endswith(b"}")
    return wire[:-1] + b',"added_by_a_newer_peer":{"x":[1,"y"]}}'


def struct_types(value: Any) -> set[type]:
    """Every Struct type inside ``value`` (itself included)."""
    found: set[type] = set()
    if isinstance(value, msgspec.Struct):
        found.add(type(value))
        for name in value.__struct_fields__:
            found |= struct_types(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found |= struct_types(item)
    elif isinstance(value, dict):
        for item in value.values():
            found |= struct_types(item)
    return found
