"""The synchronous half of a job, run in a worker thread: data, model, training loop, result.

It turns the job's settings into the dataset, method and loop calls, and every failure a user
can fix (a bad dataset, an unknown method or option) into a ``JobFailed`` with its code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from schemas.training import JobError, TrainingJob
from services.trainer import datasets, loop, methods
from services.trainer.datasets import DatasetError
from services.trainer.loop import StepMetrics, TrainingRun
from services.trainer.methods import MethodError

StepReport = StepMetrics


class JobFailed(Exception):
    """The job cannot run as submitted; ``error`` says why (code, message, the parameter at fault)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = JobError(code=code, message=message, param=param)


@dataclass(frozen=True)
class DatasetRef:
    """A dataset file on this machine, the name it was uploaded as, and the job field that named it."""

    path: Path
    filename: str
    param: str


@dataclass(frozen=True)
class TrainingOutcome:
    """How training ended."""

    cancelled: bool
    steps: int
    tokens: int
    loss: float | None
    valid_loss: float | None = None


def local_dataset(ref: str, allowed_dirs: Sequence[Path], param: str) -> DatasetRef:
    """A dataset named by path: only inside the trainer's allowed directories."""
    try:
        path = datasets.resolve_path(ref, allowed_dirs)
    except DatasetError as exc:
        raise JobFailed(exc.code, str(exc), param) from None
    return DatasetRef(path=path, filename=path.name, param=param)


def result_id(job: TrainingJob) -> str:
    """The id of the job's result: ``<suffix>-<job id tail>`` (a valid adapter id and object name)."""
    tail = job.id.removeprefix("ftjob-")[-12:]
    suffix = re.sub(r"[^a-z0-9_-]+", "-", (job.suffix or "ft").lower()).strip("-") or "ft"
    return f"{suffix[:40]}-{tail}"


def pick_device(requested: str) -> str:
    """``auto``: CUDA when present, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@dataclass
class Prepared:
    """Everything a job needs to train, built and validated."""

    job: TrainingJob
    model: torch.nn.Module
    run: TrainingRun
    valid: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    context_length: int = 0

    @property
    def method(self) -> str:
        """The job's PEFT method (``full`` for full fine-tuning)."""
        return self.job.peft.method

    @property
    def total_steps(self) -> int:
        """Optimizer steps the whole job takes."""
        return self.run.total_steps

    @property
    def total_epochs(self) -> int:
        """Epochs the whole job covers (rounded up when ``max_steps`` cuts it)."""
        per_epoch = loop.steps_per_epoch(len(self.run.examples), self.job.hyperparameters)
        return max(1, -(-self.run.total_steps // per_epoch))

    def train(self, on_step: Callable[[StepReport], None], should_stop: Callable[[], bool],
              on_checkpoint: Callable[[int, Path, float | None], None], resume: Path | None) -> TrainingOutcome:
        """Run (or resume) the optimizer steps; the callbacks see every step and checkpoint."""
        result = self.run.run(on_step, should_stop,
                              lambda step, directory: on_checkpoint(step, directory, self.run.position.loss),
                              resume_from=resume)
        cancelled = result.status == loop.CANCELLED
        valid_loss = None if cancelled or not self.valid else self.evaluate()
        return TrainingOutcome(cancelled=cancelled, steps=result.steps, tokens=result.tokens, loss=result.loss,
                               valid_loss=valid_loss)

    def evaluate(self) -> float:
        """Mean loss over the validation examples."""
        return loop.evaluate(self.model, self.run.pad_id, self.valid, self.job.hyperparameters)

    def save(self, out: Path) -> None:
        """Write the result (adapter or full model) to ``out``."""
        methods.save_result(self.model, out)


def prepare(job: TrainingJob, base_path: Path, train: DatasetRef, valid: DatasetRef | None, device: str,
            work_dir: Path) -> Prepared:
    """Load and validate the data, build the model for the job's method, set up the loop."""
    hp = job.hyperparameters
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    examples, info = _examples(train, tokenizer, job)
    summary = info.as_dict()
    valid_examples: list = []
    if valid is not None:
        valid_examples, valid_info = _examples(valid, tokenizer, job)
        summary["validation"] = valid_info.as_dict()
    total = loop.total_steps(len(examples), hp)
    try:
        model, method_info = methods.build_model(base_path, job.peft, total_steps=total, device=pick_device(device),
                                                 seed=job.seed)
    except MethodError as exc:
        raise JobFailed(exc.code, str(exc), "method") from None
    summary["trainable_parameters"] = method_info.trainable_params
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = TrainingRun(model, pad_id, list(examples), hp, job.seed, work_dir=work_dir / "checkpoints")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return Prepared(job=job, model=model, run=run, valid=list(valid_examples), summary=summary,
                    context_length=context)


def _examples(ref: DatasetRef, tokenizer, job: TrainingJob):
    try:
        return datasets.prepare(ref.path, tokenizer, job.hyperparameters.max_seq_length, job.dataset_format,
                                filename_hint=ref.filename)
    except DatasetError as exc:
        raise JobFailed(exc.code, str(exc), ref.param) from None
