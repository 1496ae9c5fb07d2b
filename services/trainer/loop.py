"""The training loop: optimizer steps over tokenized examples, with cancel, metrics and resumable checkpoints.

No HF ``Trainer``: the service needs to stop between two optimizer steps, report every step and
resume a job on another trainer from its last checkpoint so that the resumed steps compute the
same losses as an uninterrupted run. Data order per epoch comes from the seed alone, and a
checkpoint holds everything else that decides the next step (weights, optimizer, schedule,
position, RNG), see ``checkpoint``.

Everything here is synchronous; the service runs ``TrainingRun.run`` in a thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import torch
from transformers import get_linear_schedule_with_warmup

from schemas.training import CANCELLED, SUCCEEDED, Hyperparameters
from services.trainer import checkpoint
from services.trainer.checkpoint import Position

IGNORE_INDEX = -100  # label of a token that is not trained (transformers' CrossEntropyLoss ignore_index)
MAX_GRAD_NORM = 1.0


class Example(Protocol):
    """One tokenized training example; ``labels`` is ``IGNORE_INDEX`` where nothing is learnt."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step did; ``loss`` is the mean over its micro-batches."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int  # label tokens trained so far (the whole run, resumed steps included)
    step_tokens: int  # label tokens of this step
    step_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class RunResult:
    """How a run ended: ``succeeded`` or ``cancelled``, steps done, the last step's loss and tokens."""

    status: str
    steps: int
    loss: float | None
    tokens: int


def micro_batches_per_epoch(n_examples: int, batch_size: int) -> int:
    """Micro-batches in one pass over the data (the last may be short)."""
    return math.ceil(n_examples / batch_size)


def steps_per_epoch(n_examples: int, hp: Hyperparameters) -> int:
    """Optimizer steps per epoch; an epoch's last step may accumulate fewer micro-batches."""
    return math.ceil(micro_batches_per_epoch(n_examples, hp.batch_size) / hp.gradient_accumulation_steps)


def total_steps(n_examples: int, hp: Hyperparameters) -> int:
    """Optimizer steps of the whole run: ``max_steps`` when set, else ``n_epochs`` epochs."""
    if hp.max_steps > 0:
        return hp.max_steps
    return steps_per_epoch(n_examples, hp) * hp.n_epochs


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch``: a function of the seed and epoch only, so resumable."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def collate(examples: Sequence[Example], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` tensors, truncated to ``max_length``."""
    rows = [(list(e.input_ids[:max_length]), list(e.labels[:max_length])) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def trained_tokens(labels: torch.Tensor) -> int:
    """Label tokens the causal-LM loss is taken over (labels shift by one, so the first never is)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory in use: peak allocated GPU memory on CUDA, the process's resident set on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def evaluate(model: torch.nn.Module, pad_id: int, examples: Sequence[Example], hp: Hyperparameters) -> float:
    """Mean loss per trained label token over ``examples`` (validation), without changing the model."""
    if not examples:
        raise ValueError("no validation examples")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), hp.batch_size):
                batch = collate(examples[start:start + hp.batch_size], pad_id, hp.max_seq_length)
                count = trained_tokens(batch["labels"])
                if count:
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                    total, tokens = total + loss.item() * count, tokens + count
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError("the validation examples have no trained label tokens")
    return total / tokens


def _optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # No weight decay on biases, norms and other vectors (the usual AdamW practice).
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate)


class TrainingRun:
    """One fine-tuning run of ``model`` over ``examples``; ``run`` does the optimizer steps.

    Checkpoints go to ``work_dir/checkpoint-<step>``. ``seed`` fixes the data order and, through
    the RNG state, dropout; build the model with the same seed to make a resume exact.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, examples: Sequence[Example], hp: Hyperparameters,
                 seed: int, *, work_dir: str | Path) -> None:
        if not examples:
            raise ValueError("no training examples")
        if hp.batch_size < 1 or hp.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")
        self.model = model
        self.pad_id = pad_id
        self.examples = list(examples)
        self.hp = hp
        self.seed = seed
        self.work_dir = Path(work_dir)
        self.total_steps = total_steps(len(self.examples), hp)
        self.micro_per_epoch = micro_batches_per_epoch(len(self.examples), hp.batch_size)
        self.device = next(model.parameters()).device
        self.optimizer = _optimizer(model, hp)
        warmup = math.ceil(hp.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.position = Position()
        self._order: tuple[int, list[int]] | None = None

    @property
    def epoch(self) -> float:
        """Epochs done so far, fractional."""
        return self.position.epoch + self.position.micro / self.micro_per_epoch

    def run(self, on_step: Callable[[StepMetrics], None], should_stop: Callable[[], bool],
            on_checkpoint: Callable[[int, Path], None], resume_from: str | Path | None = None) -> RunResult:
        """Train until ``total_steps``; ``should_stop`` is asked before every optimizer step.

        Checkpoints every ``save_steps`` steps and after the last; a callback that raises aborts
        the run with that exception. ``resume_from`` continues after the checkpoint's step.
        """
        if resume_from is not None:
            self.position = checkpoint.restore(Path(resume_from), self.model, self.optimizer, self.scheduler)
        else:
            torch.manual_seed(self.seed)  # dropout masks: the same job trains the same way on any trainer
        self.model.train()
        last_saved = self.position.step
        while self.position.step < self.total_steps:
            if should_stop():
                return self._result(CANCELLED)
            on_step(self._step())
            if self.hp.save_steps > 0 and self.position.step % self.hp.save_steps == 0:
                last_saved = self._checkpoint(on_checkpoint)
        if last_saved != self.position.step:
            self._checkpoint(on_checkpoint)
        return self._result(SUCCEEDED)

    def _step(self) -> StepMetrics:
        started = time.monotonic()
        lr = self.scheduler.get_last_lr()[0]
        batches = self._next_micro_batches()
        losses = []
        tokens_before = self.position.tokens
        for indices in batches:
            batch = collate([self.examples[i] for i in indices], self.pad_id, self.hp.max_seq_length)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = self.model(**batch).loss
            (loss / len(batches)).backward()
            losses.append(loss.item())
            self.position.tokens += trained_tokens(batch["labels"])
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        self.optimizer.step()
        self.position.step += 1
        _update_adalora(self.model, self.position.step)  # reads the gradients: before zero_grad
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position.loss = sum(losses) / len(losses)
        return StepMetrics(step=self.position.step, total_steps=self.total_steps, epoch=self.epoch,
                           loss=self.position.loss, learning_rate=lr, tokens=self.position.tokens,
                           step_tokens=self.position.tokens - tokens_before,
                           step_seconds=time.monotonic() - started, memory_bytes=memory_bytes(self.device))

    def _next_micro_batches(self) -> list[list[int]]:
        """The micro-batches (example indices) of the next optimizer step; advances the position."""
        pos = self.position
        if pos.micro >= self.micro_per_epoch:
            pos.epoch, pos.micro = pos.epoch + 1, 0
        if self._order is None or self._order[0] != pos.epoch:
            self._order = (pos.epoch, epoch_order(len(self.examples), self.seed, pos.epoch))
        order, size = self._order[1], self.hp.batch_size
        end = min(pos.micro + self.hp.gradient_accumulation_steps, self.micro_per_epoch)
        batches = [order[i * size:(i + 1) * size] for i in range(pos.micro, end)]
        pos.micro = end
        return batches

    def _checkpoint(self, on_checkpoint: Callable[[int, Path], None]) -> int:
        step = self.position.step
        directory = self.work_dir / f"checkpoint-{step}"
        checkpoint.save(directory, self.model, self.optimizer, self.scheduler, self.position)
        on_checkpoint(step, directory)
        return step

    def _result(self, status: str) -> RunResult:
        return RunResult(status=status, steps=self.position.step, loss=self.position.loss,
                         tokens=self.position.tokens)


def _update_adalora(model: torch.nn.Module, step: int) -> None:
    # AdaLoRA re-allocates ranks from the importance of the current gradients (peft's documented order:
    # optimizer.step(), update_and_allocate(step), zero_grad()).
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "update_and_allocate") and hasattr(base, "rankallocator"):
        base.update_and_allocate(step)
