"""Fine-tuning messages: the job submitted to ``llm.v1.train.submit``, its state in KV
``llm_train_jobs`` and the events on ``llm.v1.train.job.<id>.event``.

Protocol (every producer follows it; the edge is one producer, ``nats pub`` another):

1. Publish ``TrainingJob`` (JSON) to ``names.TRAIN_SUBMIT`` with header ``Nats-Msg-Id`` = job id.
   The edge also creates the ``JobState`` (status ``queued``) first; a NATS-native producer may
   skip that and the trainer creates it.
2. A trainer takes the job from the durable consumer ``trainers``: status ``validating_files``,
   then ``running``, then ``succeeded`` / ``failed`` / ``cancelled``. Every change is a new
   ``JobState`` revision in the KV bucket and a ``TrainEvent`` on the job's event subject.
3. Cancel: set the state's status to ``cancelled`` (compare-and-set on the KV revision) and
   publish ``TrainCancel`` on ``names.TRAIN_CANCEL``. A running trainer stops within one
   optimizer step; a queued job is dropped when a trainer picks it up.
4. The result: a PEFT adapter saved as a tar in the object store (``artifacts.adapter_object``)
   and registered in KV ``llm_models``; it is served as model ``fine_tuned_model`` =
   ``<base>:<adapter>``.
"""

from __future__ import annotations

import msgspec

# OpenAI's job statuses, in order.
VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# PEFT methods the trainer knows (``full`` is full fine-tuning, ``qlora`` LoRA on a 4-bit base).
METHODS = ("lora", "dora", "pissa", "adalora", "ia3", "loha", "lokr", "vera", "fourierft",
           "prompt_tuning", "prefix_tuning", "full", "qlora")

# Dataset formats the trainer reads; ``auto`` detects from the file name and content.
DATASET_FORMATS = ("auto", "json", "jsonl", "alpaca", "sharegpt", "openai", "hf_disk", "csv", "parquet")


class PeftSettings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The adaptation method and its settings.

    ``r``/``alpha``/``dropout``/``target_modules`` apply to the LoRA family; ``options`` carries
    any other keyword of the method's peft config (e.g. ``num_virtual_tokens`` for prompt tuning).
    ``target_modules`` None means the method's default for the model.
    """

    method: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    options: dict = {}


class Hyperparameters(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Training hyperparameters (the native API's names; OpenAI's map onto them)."""

    n_epochs: int = 3
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_seq_length: int = 512
    save_steps: int = 50  # checkpoint every N optimizer steps (and at the end)
    logging_steps: int = 1  # a metrics event every N optimizer steps
    max_steps: int = 0  # 0: n_epochs over the data decides


class TrainingJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A fine-tuning job, published to ``llm.v1.train.submit`` (``Nats-Msg-Id`` = ``id``).

    ``training_file`` is an uploaded file id (``file-...``, stored in the object store) or a
    path under the trainer's allowed data directories.
    """

    id: str
    model: str
    training_file: str
    validation_file: str | None = None
    dataset_format: str = "auto"
    peft: PeftSettings = msgspec.field(default_factory=PeftSettings)
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)
    suffix: str | None = None
    seed: int = 42
    metadata: dict[str, str] | None = None
    created_at: int = 0
    owner: str | None = None  # API key id or JWT subject that created the job
    # A user-supplied training script (admin scope only; trainers run it only with --allow-scripts):
    # a path under the trainer's data directories, run in a subprocess with time and memory limits.
    script: str | None = None
    script_args: list[str] = []


class JobError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why a job failed (OpenAI's ``error`` object)."""

    code: str
    message: str
    param: str | None = None


class Progress(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a running job is (the native status endpoint shows all of it)."""

    epoch: float = 0.0
    total_epochs: int = 0
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    memory_bytes: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    tokens: int = 0


class Checkpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A saved checkpoint (OpenAI's ``fine_tuning.job.checkpoint``, plus where it is stored)."""

    id: str
    step: int
    created_at: int
    object_name: str
    train_loss: float | None = None


class JobState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job's state: value of key ``<job id>`` in KV ``llm_train_jobs``."""

    job: TrainingJob
    status: str = QUEUED
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: JobError | None = None
    progress: Progress = msgspec.field(default_factory=Progress)
    checkpoints: list[Checkpoint] = []
    trainer: str | None = None
    attempts: int = 0


class TrainEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event on ``llm.v1.train.job.<id>.event`` (OpenAI's ``fine_tuning.job.event``).

    ``type`` is ``message`` (a status change or note; ``data.status`` names the new status),
    ``metrics`` (``data``: step, total_steps, epoch, train_loss, learning_rate, tokens, eta_s…)
    or ``checkpoint`` (``data``: step, id, object_name).
    """

    id: str
    job_id: str
    created_at: float
    level: str = "info"
    type: str = "message"
    message: str = ""
    data: dict = {}


class TrainCancel(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Broadcast on ``llm.v1.train.cancel``: stop job ``id`` wherever it runs."""

    id: str
    reason: str = "cancelled"
