"""Translate fine-tuning HTTP bodies into ``schemas.training.TrainingJob``. Pure: no aiohttp, no I/O.

``parse_openai_job`` (``POST /v1/fine_tuning/jobs``) and ``parse_native_job``
(``POST /api/v1/training/start``) decode and validate a raw body, raising ``BusError``
(``invalid_request`` or ``unsupported``, with the offending field as ``param``). What needs the bus
(the model is known, the uploaded files exist, the job id is free) the edge checks afterwards,
with the names ``ParsedJob`` gives it for its error messages.

OpenAI's ``learning_rate_multiplier`` scales ``BASE_LEARNING_RATE``; ``"auto"`` (or an omitted
value) is the ``schemas.training.Hyperparameters`` default.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import msgspec

from schemas.errors import BusError, ErrorCode
from schemas.training import DATASET_FORMATS, METHODS, Hyperparameters, PeftSettings, TrainingJob
from services.edge.openai.translate import _decode
from services.edge.training.types import (
    ExtraHyperparameters,
    FineTuningJobBody,
    NativeHyperparameters,
    NativeStartBody,
    OpenAIHyperparameters,
    PeftBody,
)

BASE_LEARNING_RATE = Hyperparameters().learning_rate
SUFFIX_RE = re.compile(r"^[a-z0-9_-]{1,64}\Z")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
FILE_ID_RE = re.compile(r"^file-[A-Za-z0-9_-]{1,64}\Z")
MAX_METADATA_KEYS = 16
JOB_ID_PREFIX = "ftjob-"
FILE_ID_PREFIX = "file-"
# Inside these objects keys are the user's own (peft options, metadata): never renamed.
_OPAQUE_KEYS = frozenset({"options", "metadata"})

_openai_decoder = msgspec.json.Decoder(FineTuningJobBody)
_native_decoder = msgspec.json.Decoder(NativeStartBody)
_any_decoder = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


@dataclass(frozen=True, slots=True)
class ParsedJob:
    """A validated job and the request's own names for what the edge still checks on the bus.

    ``uploaded`` lists (file id, param) pairs that must exist in the object store.
    """

    job: TrainingJob
    model_param: str
    uploaded: list[tuple[str, str]] = field(default_factory=list)


def _sortable_hex() -> str:
    """Milliseconds since the epoch then randomness: ids sort by creation (lists are newest first)."""
    return f"{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:12]}"


def new_job_id() -> str:
    """A fresh job id (``ftjob-<hex>``), a valid subject token and KV key, sorting by creation time."""
    return f"{JOB_ID_PREFIX}{_sortable_hex()}"


def new_file_id() -> str:
    """A fresh uploaded-file id (``file-<hex>``), sorting by creation time."""
    return f"{FILE_ID_PREFIX}{_sortable_hex()}"


def _invalid(message: str, param: str | None) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _check_range(value: float | None, name: str, low: float, high: float, *, high_open: bool = False,
                 low_open: bool = False) -> None:
    if value is None:
        return
    if value < low or value > high or (high_open and value == high) or (low_open and value == low):
        raise _invalid(f"'{name}' must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, "
                       f"got {value!r}", name)


def _check_method(method: str, param: str) -> str:
    if method not in METHODS:
        raise _invalid(f"unknown fine-tuning method '{method}'; choose one of: {', '.join(METHODS)}", param)
    return method


def _peft(body: PeftBody | None, method: str | None, prefix: str, method_param: str) -> PeftSettings:
    """Build ``PeftSettings`` from a ``peft``/``lora`` block; unset fields keep the defaults."""
    out = PeftSettings()
    body = body or PeftBody()
    if method is not None and body.method is not None and method != body.method:
        raise _invalid(f"'{method_param}' is '{method}' but '{prefix}.method' is '{body.method}'", method_param)
    chosen = method if method is not None else body.method
    if chosen is not None:
        out.method = _check_method(chosen, method_param if method is not None else f"{prefix}.method")
    _check_range(body.dropout, f"{prefix}.dropout", 0.0, 1.0, high_open=True)
    if body.target_modules is not None:
        if not body.target_modules or any(not m for m in body.target_modules):
            raise _invalid(f"'{prefix}.target_modules' must be a non-empty list of module names",
                           f"{prefix}.target_modules")
        out.target_modules = list(body.target_modules)
    for name in ("r", "alpha", "dropout"):
        value = getattr(body, name)
        if value is not None:
            setattr(out, name, value)
    if body.options is not None:
        out.options = dict(body.options)
    return out


def _extra(hp: Hyperparameters, extra: ExtraHyperparameters | NativeHyperparameters, prefix: str) -> None:
    """Copy the trainer-only settings both APIs share onto ``hp``, checking their ranges."""
    _check_range(extra.warmup_ratio, f"{prefix}.warmup_ratio", 0.0, 1.0, high_open=True)
    _check_range(extra.weight_decay, f"{prefix}.weight_decay", 0.0, 10.0)
    for name in ("gradient_accumulation_steps", "warmup_ratio", "weight_decay", "max_seq_length", "save_steps",
                 "logging_steps", "max_steps"):
        value = getattr(extra, name)
        if value is not None:
            setattr(hp, name, value)


def _openai_hyperparameters(body: FineTuningJobBody) -> tuple[OpenAIHyperparameters, str]:
    """The hyperparameters block and its param path: ``method.supervised.hyperparameters`` or the top level."""
    method = body.method
    if method is not None and method.type != "supervised":
        if method.type in ("dpo", "reinforcement"):
            raise BusError(ErrorCode.UNSUPPORTED, f"fine-tuning method type '{method.type}' is not supported; "
                           "use 'supervised' (choose the adaptation with the 'peft' extension)", param="method.type")
        raise _invalid(f"'method.type' must be 'supervised', got '{method.type}'", "method.type")
    nested = method.supervised.hyperparameters if method is not None and method.supervised is not None else None
    if nested is not None and body.hyperparameters is not None:
        raise _invalid("give hyperparameters either in 'method.supervised.hyperparameters' or at the top level, "
                       "not both", "hyperparameters")
    if nested is not None:
        return nested, "method.supervised.hyperparameters"
    return body.hyperparameters or OpenAIHyperparameters(), "hyperparameters"


def _resolve_openai(hp_body: OpenAIHyperparameters, prefix: str) -> Hyperparameters:
    hp = Hyperparameters()
    if hp_body.n_epochs not in (None, "auto"):
        hp.n_epochs = hp_body.n_epochs
    if hp_body.batch_size not in (None, "auto"):
        hp.batch_size = hp_body.batch_size
    multiplier = hp_body.learning_rate_multiplier
    if multiplier not in (None, "auto"):
        _check_range(multiplier, f"{prefix}.learning_rate_multiplier", 0.0, 1000.0, low_open=True)
        hp.learning_rate = BASE_LEARNING_RATE * multiplier
    return hp


def _common(*, model: str | None, model_param: str, suffix: str | None, metadata: dict[str, str] | None,
            dataset_format: str | None, format_param: str) -> None:
    if not model:
        raise _invalid(f"'{model_param}' is required", model_param)
    if suffix is not None and not SUFFIX_RE.match(suffix):
        raise _invalid(f"'suffix' must be 1-64 characters of a-z, 0-9, '-' and '_', got {suffix!r}", "suffix")
    if metadata is not None:
        if len(metadata) > MAX_METADATA_KEYS:
            raise _invalid(f"'metadata' may hold at most {MAX_METADATA_KEYS} keys, got {len(metadata)}", "metadata")
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise _invalid(f"metadata keys may be at most 64 and values 512 characters long (key {key[:64]!r})",
                               "metadata")
    if dataset_format is not None and dataset_format not in DATASET_FORMATS:
        raise _invalid(f"unknown dataset format '{dataset_format}'; choose one of: {', '.join(DATASET_FORMATS)}",
                       format_param)


def _seed(seed: int | None) -> dict[str, int]:
    """The ``seed`` keyword when one was given (else the job's default seed applies)."""
    return {} if seed is None else {"seed": seed}


def _uploaded(file_id: str | None, param: str) -> list[tuple[str, str]]:
    """``[(file_id, param)]`` when ``file_id`` names an uploaded file (the rest are trainer paths)."""
    return [(file_id, param)] if file_id and file_id.startswith(FILE_ID_PREFIX) else []


def parse_openai_job(raw: bytes, *, job_id: str, created_at: int, owner: str | None) -> ParsedJob:
    """Decode and validate an OpenAI ``POST /v1/fine_tuning/jobs`` body into a job (status still to create)."""
    body: FineTuningJobBody = _decode(_openai_decoder, raw)
    _common(model=body.model, model_param="model", suffix=body.suffix, metadata=body.metadata,
            dataset_format=body.dataset_format, format_param="dataset_format")
    for param in ("training_file", "validation_file"):
        value = getattr(body, param)
        if value is not None and not FILE_ID_RE.match(value):
            raise _invalid(f"'{param}' must be the id of an uploaded file (file-...), got {value!r}", param)
    hp_body, prefix = _openai_hyperparameters(body)
    hp = _resolve_openai(hp_body, prefix)
    if body.extra_hyperparameters is not None:
        _extra(hp, body.extra_hyperparameters, "extra_hyperparameters")
    job = TrainingJob(id=job_id, model=body.model, training_file=body.training_file,
                      validation_file=body.validation_file, dataset_format=body.dataset_format or "auto",
                      peft=_peft(body.peft, None, "peft", "peft.method"), hyperparameters=hp, suffix=body.suffix,
                      metadata=body.metadata, created_at=created_at, owner=owner, **_seed(body.seed))
    files = _uploaded(body.training_file, "training_file") + _uploaded(body.validation_file, "validation_file")
    return ParsedJob(job=job, model_param="model", uploaded=files)


def snake_keys(value: object, *, path: str = "") -> object:
    """``value`` with every object key in snake_case (``baseModel`` -> ``base_model``), recursively.

    Keys inside ``options`` and ``metadata`` are the user's and stay as they are. Both spellings
    of one key in the same object is an error.
    """
    if isinstance(value, list):
        return [snake_keys(v, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out: dict = {}
    for key, item in value.items():
        name = _CAMEL.sub(r"_\1", key).lower() if isinstance(key, str) else key
        if name in out:
            where = f"{path}.{name}" if path else name
            raise _invalid(f"'{where}' is given twice (camelCase and snake_case); give it once", where)
        out[name] = item if name in _OPAQUE_KEYS else snake_keys(item, path=f"{path}.{name}" if path else name)
    return out


def _native_hyperparameters(body: NativeHyperparameters | None) -> Hyperparameters:
    hp = Hyperparameters()
    if body is None:
        return hp
    if body.epochs is not None:
        hp.n_epochs = body.epochs
    if body.per_device_batch_size is not None:
        hp.batch_size = body.per_device_batch_size
    if body.learning_rate is not None:
        _check_range(body.learning_rate, "hyperparameters.learning_rate", 0.0, 1.0, low_open=True)
        hp.learning_rate = body.learning_rate
    _extra(hp, body, "hyperparameters")
    return hp


def _native_dataset(body: NativeStartBody) -> tuple[str, str]:
    """The training file (an uploaded file id or a trainer path) and the param that named it."""
    given = [(name, value) for name, value in (("file_id", body.file_id), ("dataset_path", body.dataset_path),
                                               ("dataset", body.dataset)) if value]
    if len(given) != 1:
        raise _invalid("give exactly one of 'fileId' (an uploaded file), 'datasetPath' (a path on the trainer) "
                       f"or 'dataset'; got {len(given)}", "datasetPath")
    name, value = given[0]
    if name == "file_id" and not FILE_ID_RE.match(value):
        raise _invalid(f"'fileId' must be the id of an uploaded file (file-...), got {value!r}", "fileId")
    return value, {"file_id": "fileId", "dataset_path": "datasetPath", "dataset": "dataset"}[name]


def parse_native_job(raw: bytes, *, created_at: int, owner: str | None) -> ParsedJob:
    """Decode and validate a native ``POST /api/v1/training/start`` body (camelCase or snake_case)."""
    tree = snake_keys(_decode(_any_decoder, raw))
    if not isinstance(tree, dict):
        raise _invalid("the request body must be a JSON object", None)
    body: NativeStartBody = _decode(_native_decoder, _encode(tree))
    if body.base_model and body.model and body.base_model != body.model:
        raise _invalid("give 'baseModel' or 'model', not two different models", "baseModel")
    model = body.base_model or body.model
    _common(model=model, model_param="baseModel", suffix=body.suffix, metadata=body.metadata,
            dataset_format=body.dataset_format, format_param="datasetFormat")
    if body.job_id is not None and not JOB_ID_RE.match(body.job_id):
        raise _invalid(f"'jobId' must be 1-64 letters, digits, '-' or '_', got {body.job_id!r}", "jobId")
    training_file, file_param = _native_dataset(body)
    job = TrainingJob(id=body.job_id or new_job_id(), model=model, training_file=training_file,
                      validation_file=body.validation_file, dataset_format=body.dataset_format or "auto",
                      peft=_peft(body.lora, body.method, "lora", "method"),
                      hyperparameters=_native_hyperparameters(body.hyperparameters), suffix=body.suffix,
                      metadata=body.metadata, created_at=created_at, owner=owner, script=body.script,
                      script_args=body.script_args or [], **_seed(body.seed))
    files = _uploaded(training_file, file_param) if file_param != "datasetPath" else []  # a path is the trainer's
    files += _uploaded(body.validation_file, "validationFile")
    return ParsedJob(job=job, model_param="baseModel", uploaded=files)
