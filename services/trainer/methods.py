"""Adaptation methods: build a trainable model for a ``PeftSettings``, save the result, load it back.

One table maps each name in ``schemas.training.METHODS`` to how its peft config is made from the
settings. ``settings.options`` may set any other field of that config; unknown keywords, unknown
methods and methods this machine cannot run fail with a ``MethodError`` whose ``code`` the
service turns into the job's error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from schemas.training import METHODS, PeftSettings

UNSUPPORTED = "unsupported_method"
INVALID_CONFIG = "invalid_method_config"
UNAVAILABLE = "method_unavailable"

# Llama-style attention and MLP projections: the default targets of the LoRA family.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
# peft's own default for IA3 on Llama: scale keys, values and the MLP's input to down_proj.
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_VIRTUAL_TOKENS = 8
# Config fields the trainer owns; an option naming one is rejected rather than silently ignored.
_MANAGED_FIELDS = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version",
                             "base_model_name_or_path", "revision", "inference_mode", "total_step"})
# Names that appear in older docs but are not peft methods.
_NOT_METHODS = {
    "adaliprompt": "'adaliprompt' is not a PEFT method in peft; use 'adalora' (adaptive-rank LoRA) "
                   "or 'prompt_tuning' (soft prompts)",
    "hyenadna": "'hyenadna' is not a PEFT method: HyenaDNA is a DNA model architecture, not an "
                "adaptation method; fine-tune such a model with 'lora' or 'full'",
}


class MethodError(Exception):
    """A method that is unknown, misconfigured or cannot run here; ``code`` is one of
    ``unsupported_method``, ``invalid_method_config``, ``method_unavailable``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"MethodError({self.code!r}, {self.message!r})"


@dataclass(frozen=True)
class MethodInfo:
    """What was built: the method, its peft type (None for full fine-tuning) and parameter counts."""

    method: str
    peft_type: str | None
    target_modules: list[str] | None
    trainable_params: int
    total_params: int


@dataclass(frozen=True)
class _Method:
    """How one method's peft config is derived from the settings."""

    config_cls: type
    defaults: Callable[[PeftSettings, int], dict[str, Any]]


def _targets(settings: PeftSettings, default: tuple[str, ...] = LINEAR_MODULES) -> list[str]:
    return list(settings.target_modules) if settings.target_modules else list(default)


def _lora(settings: PeftSettings, _steps: int) -> dict[str, Any]:
    return {"r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": _targets(settings)}


def _dora(settings: PeftSettings, steps: int) -> dict[str, Any]:
    return {**_lora(settings, steps), "use_dora": True}


def _pissa(settings: PeftSettings, steps: int) -> dict[str, Any]:
    # Fast randomized SVD (4 subspace iterations); the build seeds it so a rebuild is identical.
    # PiSSA's authors recommend dropout 0 (the adapter holds the principal components).
    return {**_lora(settings, steps), "lora_dropout": 0.0, "init_lora_weights": "pissa_niter_4"}


def _adalora(settings: PeftSettings, steps: int) -> dict[str, Any]:
    # The paper's shape of schedule: warm up ~10%, prune ranks, keep the final budget the last ~20%.
    # tinit + tfinal < steps for every steps >= 1, so even a 2-step job allocates ranks.
    return {"init_r": settings.r + max(1, settings.r // 2), "target_r": settings.r,
            "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": _targets(settings), "total_step": steps,
            "tinit": steps // 10, "tfinal": steps // 5, "deltaT": 1}


def _ia3(settings: PeftSettings, _steps: int) -> dict[str, Any]:
    targets = _targets(settings, IA3_TARGETS)
    return {"target_modules": targets, "feedforward_modules": [m for m in targets if m in MLP_MODULES]}


def _lycoris(settings: PeftSettings, _steps: int) -> dict[str, Any]:
    return {"r": settings.r, "alpha": settings.alpha, "target_modules": _targets(settings)}


def _vera(settings: PeftSettings, _steps: int) -> dict[str, Any]:
    # peft sizes VeRA's shared projections to the largest targeted layer, so mixed shapes work.
    return {"r": settings.r, "vera_dropout": settings.dropout, "target_modules": _targets(settings)}


def _fourierft(settings: PeftSettings, _steps: int) -> dict[str, Any]:
    return {"target_modules": _targets(settings)}


def _virtual_tokens(_settings: PeftSettings, _steps: int) -> dict[str, Any]:
    return {"num_virtual_tokens": DEFAULT_VIRTUAL_TOKENS}


_METHODS: dict[str, _Method] = {
    "lora": _Method(peft.LoraConfig, _lora),
    "dora": _Method(peft.LoraConfig, _dora),
    "pissa": _Method(peft.LoraConfig, _pissa),
    "adalora": _Method(peft.AdaLoraConfig, _adalora),
    "ia3": _Method(peft.IA3Config, _ia3),
    "loha": _Method(peft.LoHaConfig, _lycoris),
    "lokr": _Method(peft.LoKrConfig, _lycoris),
    "vera": _Method(peft.VeraConfig, _vera),
    "fourierft": _Method(peft.FourierFTConfig, _fourierft),
    "prompt_tuning": _Method(peft.PromptTuningConfig, _virtual_tokens),
    "prefix_tuning": _Method(peft.PrefixTuningConfig, _virtual_tokens),
    "qlora": _Method(peft.LoraConfig, _lora),
}


def peft_config(settings: PeftSettings, *, total_steps: int, base_path: str | Path = "") -> peft.PeftConfig:
    """The peft config for ``settings`` (pure: no model is loaded). Raises ``MethodError``."""
    method = check_method(settings.method)
    if method == "full":
        raise MethodError(INVALID_CONFIG, "full fine-tuning has no peft config")
    spec = _METHODS[method]
    _check_options(method, spec.config_cls, settings.options)
    kwargs = {**spec.defaults(settings, total_steps), **settings.options}
    if method == "prompt_tuning" and kwargs.get("prompt_tuning_init_text"):
        kwargs.setdefault("prompt_tuning_init", peft.PromptTuningInit.TEXT)
        kwargs.setdefault("tokenizer_name_or_path", str(base_path))
    try:
        return spec.config_cls(task_type=peft.TaskType.CAUSAL_LM, **kwargs)
    except (ValueError, TypeError) as exc:
        raise MethodError(INVALID_CONFIG, f"{method}: {exc}") from exc


def check_method(name: str) -> str:
    """``name`` normalized, if it is a method the trainer knows; else ``MethodError``."""
    method = name.strip().lower()
    if method in _NOT_METHODS:
        raise MethodError(UNSUPPORTED, _NOT_METHODS[method])
    if method not in METHODS:
        raise MethodError(UNSUPPORTED, f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return method


def _check_options(method: str, config_cls: type, options: dict) -> None:
    fields = {f.name for f in dataclasses.fields(config_cls)} - _MANAGED_FIELDS
    for key in options:
        if key not in fields:
            raise MethodError(INVALID_CONFIG, f"unknown option {key!r} for method {method!r}; "
                                              f"accepted: {', '.join(sorted(fields))}")


def qlora_unavailable_reason(device: str) -> str | None:
    """Why QLoRA cannot run on ``device`` here, or None when it can."""
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return "qlora needs a CUDA GPU (4-bit bitsandbytes kernels); on this machine use 'lora'"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "qlora needs the 'bitsandbytes' package, which is not installed; install it or use 'lora'"
    return None


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU that has it, float32 otherwise (CPU half precision is slow and lossy)."""
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_model(base_path: str | Path, settings: PeftSettings, *, total_steps: int, device: str = "cpu",
                dtype: torch.dtype | None = None, seed: int = 0) -> tuple[torch.nn.Module, MethodInfo]:
    """Load the base model and make it trainable with ``settings.method``.

    Random adapter initialisation is seeded with ``seed`` (without touching the global RNG), so
    building twice gives the same model: a resumed job rebuilds it and loads its checkpoint.
    """
    method = check_method(settings.method)
    config = None if method == "full" else peft_config(settings, total_steps=total_steps, base_path=base_path)
    if method == "full" and settings.options:
        raise MethodError(INVALID_CONFIG, f"unknown option {next(iter(settings.options))!r} for method 'full'; "
                                          "full fine-tuning takes no options")
    if method == "qlora" and (reason := qlora_unavailable_reason(device)):
        raise MethodError(UNAVAILABLE, reason)
    # Full fine-tuning keeps fp32 weights: AdamW updates vanish in bf16 (the loop has no master copy).
    dtype = dtype or (torch.float32 if method == "full" else default_dtype(device))
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        if method == "qlora":
            model = _load_4bit(base_path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        if config is not None:
            model = _wrap(model, config, method)
        else:
            model.requires_grad_(True)
    return model, _info(model, method)


def _rng_devices(device: str) -> list[int]:
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def _load_4bit(base_path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": torch.cuda.current_device()})
    return peft.prepare_model_for_kbit_training(model)


def _wrap(model: torch.nn.Module, config: peft.PeftConfig, method: str) -> peft.PeftModel:
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise MethodError(INVALID_CONFIG, f"{method}: {exc}") from exc
    if method == "pissa":
        # Kept to convert the trained PiSSA adapter into a plain LoRA for the unmodified base.
        wrapped.cy_initial_adapter = {k: v.detach().clone()
                                      for k, v in peft.get_peft_model_state_dict(wrapped).items()}
    return wrapped


def _info(model: torch.nn.Module, method: str) -> MethodInfo:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if isinstance(model, peft.PeftModel):
        config = model.peft_config[model.active_adapter]
        targets = getattr(config, "target_modules", None)
        return MethodInfo(method, str(config.peft_type.value), sorted(targets) if targets else None,
                          trainable, total)
    return MethodInfo(method, None, None, trainable, total)


def save_result(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the trained result: a peft adapter (``adapter_config.json`` + weights) or the whole model.

    A PiSSA adapter is converted to an ordinary LoRA (of twice the rank) that applies to the
    unmodified base model, so serving needs no PiSSA-specific step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    initial = getattr(model, "cy_initial_adapter", None)
    if isinstance(model, peft.PeftModel) and initial is not None:
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = Path(tmp) / "initial"
            init_dir.mkdir()
            save_file({k: v.contiguous() for k, v in initial.items()}, init_dir / "adapter_model.safetensors")
            model.save_pretrained(out, path_initial_model_for_weight_conversion=str(init_dir))
    elif isinstance(model, peft.PeftModel):
        model.save_pretrained(out)
    else:
        _clear_quantization(model)
        model.save_pretrained(out)
    return out


def _clear_quantization(model: torch.nn.Module) -> None:
    # A base loaded from GGUF carries its (de-)quantizer; saving would tag fp32 weights as quantized.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_for_inference(base_path: str | Path, result_dir: str | Path, *, device: str = "cpu",
                       dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The trained model for generation: base + adapter from ``result_dir``, or the saved full model."""
    result = Path(result_dir)
    dtype = dtype or default_dtype(device)
    if (result / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        model = peft.PeftModel.from_pretrained(base, result)
    else:
        model = AutoModelForCausalLM.from_pretrained(result, dtype=dtype).to(device)
    return model.eval()
