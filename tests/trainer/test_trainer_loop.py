"""The training loop: step math, batching, cancel within one step, accumulation, exact resume from a checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from schemas.training import Hyperparameters, PeftSettings
from services.trainer.checkpoint import CheckpointError
from services.trainer.loop import (IGNORE_INDEX, StepMetrics, TrainingRun, collate, epoch_order, evaluate,
                                   memory_bytes, steps_per_epoch, total_steps)
from services.trainer.methods import build_model

pytestmark = pytest.mark.slow

SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Two plus two is four.",
             "Rivers flow down to the sea.", "Bread is made from flour and water.", "Snow is cold."]
SEED = 7


@dataclass
class Example:
    """A tokenized example, as the dataset module yields them."""

    input_ids: list[int]
    labels: list[int]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    """The default model's tokenizer."""
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    """Sentences of different lengths; the first two tokens are prompt (not trained)."""
    rows = [tokenizer(s)["input_ids"] for s in SENTENCES]
    return [Example(ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]) for ids in rows]


class Recorder:
    """Collects what a run reports; ``stop_after`` makes ``should_stop`` say yes after that many steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[StepMetrics] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.stop_after = stop_after

    def on_step(self, metrics: StepMetrics) -> None:
        self.steps.append(metrics)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def on_checkpoint(self, step: int, directory: Path) -> None:
        self.checkpoints.append((step, directory))

    def run(self, run: TrainingRun, resume_from: Path | None = None):
        return run.run(self.on_step, self.should_stop, self.on_checkpoint, resume_from=resume_from)


def _lora(model_dir: Path, total: int, dropout: float = 0.1, method: str = "lora"):
    model, _ = build_model(model_dir, PeftSettings(method=method, r=4, dropout=dropout), total_steps=total,
                           seed=SEED)
    return model


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_total_steps_from_epochs_batches_and_accumulation():
    hp = Hyperparameters(n_epochs=3, batch_size=4, gradient_accumulation_steps=2)
    assert steps_per_epoch(10, hp) == 2  # 3 micro-batches: one full step, one short step
    assert total_steps(10, hp) == 6
    assert total_steps(16, hp) == 6 and total_steps(17, hp) == 9
    assert total_steps(10, Hyperparameters(max_steps=5, n_epochs=100)) == 5
    assert total_steps(1, Hyperparameters(n_epochs=1)) == 1


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert sorted(epoch_order(50, 1, 0)) == list(range(50))
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    assert epoch_order(50, 1, 0) != epoch_order(50, 2, 0)


def test_collate_pads_right_masks_and_truncates():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0, max_length=2)
    assert batch["input_ids"].tolist() == [[5, 6], [8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [[-100, 6], [8, -100]]


@pytest.mark.parametrize("method", ["lora", "adalora", "pissa"])
def test_resume_continues_with_the_same_losses(method, default_model_dir, tokenizer, examples, tmp_path):
    # 6 examples, batch 2: 3 steps per epoch, so steps 3-4 cross an epoch boundary; warmup and
    # dropout make the schedule and RNG state matter.
    hp = Hyperparameters(batch_size=2, max_steps=4, save_steps=2, learning_rate=5e-3, warmup_ratio=0.25,
                         weight_decay=0.01, max_seq_length=32)
    pad = tokenizer.pad_token_id
    whole = Recorder()
    run = TrainingRun(_lora(default_model_dir, 4, method=method), pad, examples, hp, SEED, work_dir=tmp_path / "a")
    result = whole.run(run)
    assert result.status == "succeeded" and [m.step for m in whole.steps] == [1, 2, 3, 4]
    assert [s for s, _ in whole.checkpoints] == [2, 4]
    assert whole.steps[2].epoch == 1.0 and whole.steps[3].epoch == pytest.approx(4 / 3)

    first = Recorder(stop_after=2)  # the job is stopped after step 2 (a crash or a cancel)
    first.run(TrainingRun(_lora(default_model_dir, 4, method=method), pad, examples, hp, SEED, work_dir=tmp_path / "b"))
    (step, directory), = first.checkpoints
    assert step == 2 and {"trainer_state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt",
                          "rng.pt", "adapter"} <= {p.name for p in directory.iterdir()}
    assert (directory / "adapter" / "adapter_config.json").exists()

    resumed = Recorder()
    model = _lora(default_model_dir, 4, method=method)
    result = resumed.run(TrainingRun(model, pad, examples, hp, SEED, work_dir=tmp_path / "c"), resume_from=directory)
    assert [m.step for m in resumed.steps] == [3, 4]
    torch.testing.assert_close([m.loss for m in resumed.steps], [m.loss for m in whole.steps[2:]],
                               atol=1e-5, rtol=0)
    assert [m.learning_rate for m in resumed.steps] == pytest.approx([m.learning_rate for m in whole.steps[2:]])
    assert resumed.steps[-1].tokens == whole.steps[-1].tokens == result.tokens
    assert result.status == "succeeded" and result.steps == 4 and [s for s, _ in resumed.checkpoints] == [4]


def test_cancel_takes_effect_before_the_next_step(default_model_dir, tokenizer, examples, tmp_path):
    hp = Hyperparameters(batch_size=2, max_steps=3, max_seq_length=32)
    recorder = Recorder(stop_after=1)
    run = TrainingRun(_lora(default_model_dir, 3), tokenizer.pad_token_id, examples, hp, SEED, work_dir=tmp_path)
    result = recorder.run(run)
    assert result.status == "cancelled" and result.steps == 1
    assert len(recorder.steps) == 1 and recorder.checkpoints == []
    assert result.loss == recorder.steps[0].loss and math.isfinite(result.loss)


def test_gradient_accumulation_matches_the_larger_batch(default_model_dir, tokenizer, tmp_path):
    # Equal lengths, no dropout: two accumulated micro-batches of 1 give the gradient of one batch of 2.
    ids = [tokenizer("One two three four five")["input_ids"], tokenizer("Six seven eight nine ten")["input_ids"]]
    assert len(ids[0]) == len(ids[1])
    data = [Example(i, list(i)) for i in ids]
    runs = []
    for batch, accumulate in ((2, 1), (1, 2)):
        hp = Hyperparameters(batch_size=batch, gradient_accumulation_steps=accumulate, n_epochs=1)
        recorder = Recorder()
        run = TrainingRun(_lora(default_model_dir, 1, dropout=0.0), tokenizer.pad_token_id, data, hp, SEED,
                          work_dir=tmp_path / str(batch))
        grads: list[torch.Tensor] = []
        run.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(
            p.grad.clone() for group in opt.param_groups for p in group["params"]))
        assert run.total_steps == 1 and recorder.run(run).steps == 1
        runs.append((recorder.steps[0], grads))
    (big, big_grads), (accumulated, acc_grads) = runs
    assert big.tokens == accumulated.tokens == 2 * (len(ids[0]) - 1)  # the first token is never a target
    assert big.loss == pytest.approx(accumulated.loss, abs=1e-5)
    assert len(big_grads) == len(acc_grads) > 0
    for acc, full in zip(acc_grads, big_grads):
        torch.testing.assert_close(acc, full, atol=1e-6, rtol=1e-4)


def test_resume_into_a_different_model_fails_clearly(default_model_dir, tokenizer, examples, tmp_path):
    hp = Hyperparameters(batch_size=2, max_steps=1, max_seq_length=16)
    first = Recorder()
    first.run(TrainingRun(_lora(default_model_dir, 1), tokenizer.pad_token_id, examples, hp, SEED,
                          work_dir=tmp_path / "a"))
    other, _ = build_model(default_model_dir, PeftSettings(method="ia3"), total_steps=1)
    run = TrainingRun(other, tokenizer.pad_token_id, examples, hp, SEED, work_dir=tmp_path / "b")
    with pytest.raises(CheckpointError, match="does not fit"):
        Recorder().run(run, resume_from=first.checkpoints[0][1])


def test_a_raising_callback_aborts_the_run(default_model_dir, tokenizer, examples, tmp_path):
    hp = Hyperparameters(batch_size=2, max_steps=3, max_seq_length=16)
    run = TrainingRun(_lora(default_model_dir, 3), tokenizer.pad_token_id, examples, hp, SEED, work_dir=tmp_path)

    def on_step(metrics: StepMetrics) -> None:
        raise RuntimeError(f"publish failed at step {metrics.step}")

    with pytest.raises(RuntimeError, match="step 1"):
        run.run(on_step, lambda: False, lambda step, d: None)
    assert run.position.step == 1


def test_evaluate_is_the_token_weighted_validation_loss(default_model_dir, tokenizer, examples):
    model = _lora(default_model_dir, 1)
    model.train()
    hp = Hyperparameters(batch_size=4, max_seq_length=32)
    loss = evaluate(model, tokenizer.pad_token_id, examples, hp)
    assert model.training, "evaluate must leave the model as it found it"
    single = Hyperparameters(batch_size=1, max_seq_length=32)
    # Batching and padding do not change it, and it is deterministic (no dropout).
    assert evaluate(model, tokenizer.pad_token_id, examples, single) == pytest.approx(loss, abs=1e-4)
    model.eval()
    with torch.no_grad():
        first = model(**collate(examples[:1], tokenizer.pad_token_id, 32)).loss.item()
    assert evaluate(model, tokenizer.pad_token_id, examples[:1], single) == pytest.approx(first, abs=1e-6)


def test_memory_bytes_reports_resident_memory():
    assert memory_bytes("cpu") > 50 * 1024 * 1024
