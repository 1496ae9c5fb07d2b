"""The fine-tuning HTTP request bodies the edge accepts, as msgspec Structs.

Only the wire shape lives here; ranges and cross-field rules are checked in
``training_translate``. Unknown fields are ignored (OpenAI clients send ``integrations`` and
other fields the platform does not use).

OpenAI's ``POST /v1/fine_tuning/jobs`` body, plus three platform extensions (the official SDK
sends them through ``extra_body``):

- ``peft``: ``{"method", "r", "alpha", "dropout", "target_modules", "options"}`` — the adaptation
  method (one of ``schemas.training.METHODS``) and its settings;
- ``extra_hyperparameters``: ``{"gradient_accumulation_steps", "warmup_ratio", "weight_decay",
  "max_seq_length", "save_steps", "logging_steps", "max_steps"}`` — the trainer's settings OpenAI
  has no names for;
- ``dataset_format``: one of ``schemas.training.DATASET_FORMATS`` (default ``auto``).

The native ``POST /api/v1/training/start`` body is accepted in camelCase or snake_case; keys are
normalised to snake_case before it is decoded into ``NativeStartBody``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Auto = Literal["auto"]


class OpenAIHyperparameters(msgspec.Struct, kw_only=True):
    """OpenAI's hyperparameters: each ``"auto"`` (the platform default) or a number."""

    n_epochs: Auto | PositiveInt | None = None
    batch_size: Auto | PositiveInt | None = None
    learning_rate_multiplier: Auto | float | None = None


class SupervisedBody(msgspec.Struct, kw_only=True):
    """``method.supervised``."""

    hyperparameters: OpenAIHyperparameters | None = None


class MethodBody(msgspec.Struct, kw_only=True):
    """``method``: only ``supervised`` is trained; ``dpo`` / ``reinforcement`` are refused."""

    type: str
    supervised: SupervisedBody | None = None
    dpo: dict | None = None
    reinforcement: dict | None = None


class PeftBody(msgspec.Struct, kw_only=True):
    """The ``peft`` extension (and the native API's ``lora`` block)."""

    method: str | None = None
    r: PositiveInt | None = None
    alpha: PositiveInt | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    options: dict | None = None


class ExtraHyperparameters(msgspec.Struct, kw_only=True):
    """The ``extra_hyperparameters`` extension: trainer settings OpenAI has no names for."""

    gradient_accumulation_steps: PositiveInt | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_seq_length: PositiveInt | None = None
    save_steps: PositiveInt | None = None
    logging_steps: PositiveInt | None = None
    max_steps: NonNegativeInt | None = None


class FineTuningJobBody(msgspec.Struct, kw_only=True):
    """``POST /v1/fine_tuning/jobs``."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: OpenAIHyperparameters | None = None  # deprecated by OpenAI in favour of ``method``
    method: MethodBody | None = None
    suffix: str | None = None
    seed: Seed | None = None
    metadata: dict[str, str] | None = None
    # platform extensions
    peft: PeftBody | None = None
    extra_hyperparameters: ExtraHyperparameters | None = None
    dataset_format: str | None = None


class NativeHyperparameters(msgspec.Struct, kw_only=True):
    """The native API's ``hyperparameters`` (after camelCase -> snake_case)."""

    epochs: PositiveInt | None = None
    per_device_batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    learning_rate: float | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_seq_length: PositiveInt | None = None
    save_steps: PositiveInt | None = None
    logging_steps: PositiveInt | None = None
    max_steps: NonNegativeInt | None = None


class NativeStartBody(msgspec.Struct, kw_only=True):
    """``POST /api/v1/training/start`` (after camelCase -> snake_case).

    The dataset is ``file_id`` (an uploaded file) or ``dataset_path`` (a path on the trainer's
    machine, under its allowed data directories; the trainer checks it).
    """

    job_id: str | None = None
    base_model: str | None = None
    model: str | None = None
    dataset_path: str | None = None
    file_id: str | None = None
    dataset: str | None = None  # the seed documents' name: a file id or a trainer path
    validation_file: str | None = None
    dataset_format: str | None = None
    method: str | None = None
    lora: PeftBody | None = None
    hyperparameters: NativeHyperparameters | None = None
    suffix: str | None = None
    seed: Seed | None = None
    metadata: dict[str, str] | None = None
    # Admin scope only: a training script on the trainer's machine (see docs/training.md).
    script: str | None = None
    script_args: list[str] | None = None
