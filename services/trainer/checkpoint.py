"""Training checkpoints: everything that decides the next optimizer step, written to and read from a directory.

Layout of a checkpoint directory::

    trainer_state.json     step, epoch, position in the epoch, tokens, last loss
    trainable.safetensors  every trainable parameter, by name (restored exactly on resume)
    adapter/               peft models only: the adapter as ``save_result`` writes it (servable)
    optimizer.pt           AdamW state
    scheduler.pt           learning-rate schedule state
    rng.pt                 torch CPU (and CUDA) RNG states: dropout continues where it stopped
    adalora.pt             AdaLoRA only: importance scores and the rank pattern

A checkpoint is resumed into a model built the same way (same method, settings and seed).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

from services.trainer.methods import save_result

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
ADAPTER_DIR = "adapter"


class CheckpointError(Exception):
    """A checkpoint that is incomplete or does not fit the model it is resumed into."""


@dataclass
class Position:
    """Where a run is: optimizer steps done, the current epoch and its next micro-batch."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens: int = 0
    loss: float | None = None


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, position: Position) -> Path:
    """Write a checkpoint of the run at ``position`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    trainable = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, directory / WEIGHTS_FILE)
    if isinstance(model, peft.PeftModel):
        save_result(model, directory / ADAPTER_DIR)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    torch.save(_rng_state(), directory / "rng.pt")
    if (allocator := _rank_allocator(model)) is not None:
        torch.save(_adalora_state(model, allocator), directory / "adalora.pt")
    (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(position)))
    return directory


def restore(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> Position:
    """Load a checkpoint into a freshly built run; returns the position to continue from."""
    try:
        position = Position(**json.loads((directory / STATE_FILE).read_text()))
        _load_trainable(model, load_file(directory / WEIGHTS_FILE))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        rng = torch.load(directory / "rng.pt", weights_only=True)
        if (allocator := _rank_allocator(model)) is not None:
            _load_adalora(model, allocator, torch.load(directory / "adalora.pt", weights_only=True))
    except FileNotFoundError as exc:
        raise CheckpointError(f"incomplete checkpoint {directory}: {exc.filename} is missing") from exc
    except (ValueError, KeyError, TypeError) as exc:  # optimizer/param mismatch, malformed state
        raise CheckpointError(f"checkpoint {directory} does not fit this model: {exc}") from exc
    _set_rng_state(rng)
    return position


def _load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != weights.keys():
        missing = sorted(params.keys() - weights.keys())[:3]
        extra = sorted(weights.keys() - params.keys())[:3]
        raise KeyError(f"trainable parameters differ (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_allocator(model: torch.nn.Module):
    return getattr(getattr(model, "base_model", None), "rankallocator", None)


def _adalora_state(model: torch.nn.Module, allocator) -> dict:
    config = model.peft_config[model.active_adapter]
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": config.rank_pattern}


def _load_adalora(model: torch.nn.Module, allocator, state: dict) -> None:
    device = next(model.parameters()).device
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {name: t.to(device) for name, t in state[key].items()})
    model.peft_config[model.active_adapter].rank_pattern = state["rank_pattern"]
