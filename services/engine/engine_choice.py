"""``--engine auto``: which engine fits this machine and this model.

``choose_engine`` is a pure function of a ``PlatformProbe``; ``probe_platform`` is the only part
that looks at the machine (devices, importable packages, the model path). The rules, first
usable engine wins:

- CUDA GPU: vLLM, else transformers;
- Ascend NPU (torch_npu): MindIE, else vLLM (vllm-ascend), else transformers;
- Apple silicon: MLX, else llama.cpp, else transformers;
- CPU only: llama.cpp, else vLLM (its CPU build), else transformers.

An engine is usable when its package imports and it loads the model's format: a ``.gguf`` file
loads only in llama.cpp (on any platform), a model directory in anything but llama.cpp.
TensorRT-LLM is never chosen automatically: it is asked for by name.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Engine names, as registered in ``services.engine.backends.BACKENDS``.
TRANSFORMERS = "transformers"
VLLM = "vllm"
LLAMA_CPP = "llama.cpp"
MINDIE = "mindie"
MLX = "mlx"

GGUF = "gguf"
DIRECTORY = "directory"

#: The Python package that must import for each engine (transformers is a dependency of the project).
ENGINE_PACKAGES = {VLLM: "vllm", LLAMA_CPP: "llama_cpp", MINDIE: "mindie_llm", MLX: "mlx_lm",
                   "tensorrt-llm": "tensorrt_llm"}

_PREFERENCE = {
    "cuda": [VLLM, TRANSFORMERS],
    "ascend": [MINDIE, VLLM, TRANSFORMERS],
    "apple": [MLX, LLAMA_CPP, TRANSFORMERS],
    "cpu": [LLAMA_CPP, VLLM, TRANSFORMERS],
}
_PLATFORM_NAMES = {"cuda": "CUDA GPU", "ascend": "Ascend NPU (torch_npu)", "apple": "Apple silicon",
                   "cpu": "no GPU/NPU (CPU only)"}


class NoEngineFits(RuntimeError):
    """No installed engine can load this model here (a GGUF file without llama.cpp)."""


@dataclass(frozen=True)
class PlatformProbe:
    """What ``--engine auto`` decides on: devices, importable engine packages, the model's format."""

    cuda: bool = False
    ascend: bool = False
    apple_silicon: bool = False
    packages: frozenset[str] = field(default_factory=frozenset)
    model_format: str = DIRECTORY

    @property
    def kind(self) -> str:
        """``cuda``, ``ascend``, ``apple`` or ``cpu`` (in that order when several hold)."""
        if self.cuda:
            return "cuda"
        if self.ascend:
            return "ascend"
        if self.apple_silicon:
            return "apple"
        return "cpu"


def _loads(engine: str, model_format: str) -> bool:
    return (engine == LLAMA_CPP) == (model_format == GGUF)


def _installed(engine: str, probe: PlatformProbe) -> bool:
    return engine == TRANSFORMERS or ENGINE_PACKAGES[engine] in probe.packages


def choose_engine(probe: PlatformProbe) -> tuple[str, str]:
    """The engine to run and a one-line reason (logged, and reported in heartbeats as ``engine_reason``)."""
    where = _PLATFORM_NAMES[probe.kind]
    if probe.model_format == GGUF:
        if _installed(LLAMA_CPP, probe):
            return LLAMA_CPP, f"{where}; the model is a GGUF file, which only llama.cpp loads"
        raise NoEngineFits("the model is a GGUF file, which only the llama.cpp engine loads, and llama_cpp is "
                           "not installed (pip install llama-cpp-python), or give a model directory instead")
    skipped: list[str] = []
    for engine in _PREFERENCE[probe.kind]:
        if not _loads(engine, probe.model_format):
            skipped.append(f"{engine} loads only GGUF files")
        elif not _installed(engine, probe):
            skipped.append(f"{engine} not installed ({ENGINE_PACKAGES[engine]})")
        else:
            why = f"{where}: {engine}" + (f" ({'; '.join(skipped)})" if skipped else "")
            return engine, why
    raise AssertionError("transformers loads every model directory")  # the lists end with transformers


def model_format(model_path: str | Path) -> str:
    """``gguf`` for a ``.gguf`` file, else ``directory``."""
    return GGUF if str(model_path).lower().endswith(".gguf") else DIRECTORY


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ascend_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except RuntimeError:  # no driver / CANN not sourced
        return False


def probe_platform(model_path: str | Path) -> PlatformProbe:
    """Look at this machine: devices, which engine packages import, the model's format."""
    packages = frozenset(pkg for pkg in ENGINE_PACKAGES.values() if importlib.util.find_spec(pkg) is not None)
    return PlatformProbe(
        cuda=_cuda_available(),
        ascend=_ascend_available(),
        apple_silicon=sys.platform == "darwin" and platform.machine() == "arm64",
        packages=packages,
        model_format=model_format(model_path),
    )
