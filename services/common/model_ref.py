"""``<base>:<adapter>`` model names: the one place a requested model name is split into base and adapter.

A fine-tuned model is requested as ``"model": "<base>:<adapter id>"`` (or as the base model
with an explicit ``adapter``). A name that is itself a served model id or alias is never split,
so a base id containing ``:`` keeps working; otherwise the adapter id is what follows the last
``:``. Pure: ``served`` tells whether a name is a served model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from schemas.errors import BusError, ErrorCode

SEPARATOR = ":"
ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def check_adapter_id(adapter: str, param: str = "adapter") -> str:
    """``adapter`` if it is a valid adapter id (letters, digits, ``-``, ``_``, ``.``), else ``invalid_request``."""
    if not ADAPTER_ID_RE.match(adapter) or ".." in adapter:
        raise BusError(ErrorCode.INVALID_REQUEST, f"invalid adapter id {adapter!r} (allowed: letters, digits, "
                                                  "'-', '_' and '.', at most 128 characters)", param=param)
    return adapter


def split_model(name: str, adapter: str | None, served: Callable[[str], bool]) -> tuple[str, str | None]:
    """``(base, adapter)`` for a requested ``model`` name and optional explicit ``adapter`` field.

    An explicit adapter that names another adapter than the model name does is ``invalid_request``.
    """
    named = None
    base = name
    if SEPARATOR in name and not served(name):
        base, named = name.rsplit(SEPARATOR, 1)
        if not base:
            raise BusError(ErrorCode.INVALID_REQUEST, f"model {name!r} names no base model before ':'",
                           param="model")
        check_adapter_id(named, "model")
    if adapter is not None:
        check_adapter_id(adapter)
        if named is not None and named != adapter:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'adapter' is {adapter!r} but 'model' {name!r} names adapter "
                                                      f"{named!r}; give one or make them agree", param="adapter")
    return base, adapter or named


def adapter_model_id(base: str, adapter: str | None) -> str:
    """The name a client uses for ``adapter`` on ``base`` (``base`` itself without an adapter)."""
    return f"{base}{SEPARATOR}{adapter}" if adapter else base
