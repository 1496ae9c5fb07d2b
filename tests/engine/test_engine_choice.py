"""``--engine auto``: every branch of the choice, the model-format rule, and its wiring."""

from __future__ import annotations

import sys

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from services.engine import __main__ as engine_main
from services.engine.backends import BACKENDS
from services.engine.backends.simulated import SimulatedEngine
from services.engine.config import parse_args
from services.engine.engine_choice import (DIRECTORY, GGUF, LLAMA_CPP, MINDIE, MLX, TRANSFORMERS, VLLM, NoEngineFits,
                                           PlatformProbe, choose_engine, model_format, probe_platform)
from services.engine.metrics import EngineMetrics
from services.engine.service import EngineService


def probe(*packages: str, cuda=False, ascend=False, apple=False, fmt=DIRECTORY) -> PlatformProbe:
    return PlatformProbe(cuda=cuda, ascend=ascend, apple_silicon=apple, packages=frozenset(packages),
                         model_format=fmt)


ALL = ("vllm", "llama_cpp", "mindie_llm", "mlx_lm", "tensorrt_llm")


@pytest.mark.parametrize(("p", "engine"), [
    # CUDA: vLLM, else transformers (TensorRT-LLM is never chosen automatically).
    (probe(*ALL, cuda=True), VLLM),
    (probe("tensorrt_llm", "llama_cpp", cuda=True), TRANSFORMERS),
    # Ascend: MindIE, else vLLM (vllm-ascend), else transformers.
    (probe(*ALL, ascend=True), MINDIE),
    (probe("vllm", ascend=True), VLLM),
    (probe(ascend=True), TRANSFORMERS),
    # Apple silicon: MLX, else llama.cpp (GGUF only), else transformers.
    (probe(*ALL, apple=True), MLX),
    (probe("llama_cpp", apple=True, fmt=GGUF), LLAMA_CPP),
    (probe("llama_cpp", "vllm", apple=True), TRANSFORMERS),  # a directory: llama.cpp cannot load it
    (probe(apple=True), TRANSFORMERS),
    # CPU: llama.cpp (GGUF only), else vLLM-CPU, else transformers.
    (probe("llama_cpp", "vllm", fmt=GGUF), LLAMA_CPP),
    (probe("llama_cpp", "vllm"), VLLM),
    (probe("llama_cpp"), TRANSFORMERS),
    (probe(), TRANSFORMERS),
    # A GGUF file goes to llama.cpp on every platform, whatever else is installed.
    (probe(*ALL, cuda=True, fmt=GGUF), LLAMA_CPP),
    (probe(*ALL, ascend=True, fmt=GGUF), LLAMA_CPP),
    (probe(*ALL, apple=True, fmt=GGUF), LLAMA_CPP),
])
def test_choice(p, engine):
    assert choose_engine(p)[0] == engine


def test_cuda_wins_over_other_devices():
    assert choose_engine(probe(*ALL, cuda=True, ascend=True, apple=True))[0] == VLLM


def test_gguf_without_llama_cpp_is_refused_with_the_install_hint():
    with pytest.raises(NoEngineFits, match="pip install llama-cpp-python"):
        choose_engine(probe("vllm", "mlx_lm", cuda=True, fmt=GGUF))


def test_reason_names_the_platform_and_what_was_passed_over():
    _, reason = choose_engine(probe("llama_cpp"))
    assert reason.startswith("no GPU/NPU (CPU only): transformers")
    assert "llama.cpp loads only GGUF files" in reason and "vllm not installed (vllm)" in reason
    _, reason = choose_engine(probe("mindie_llm", ascend=True))
    assert reason == "Ascend NPU (torch_npu): mindie"


def test_every_engine_auto_can_choose_is_registered():
    for engine in (TRANSFORMERS, VLLM, LLAMA_CPP, MINDIE, MLX):
        assert engine in BACKENDS


def test_model_format(tmp_path):
    assert model_format(tmp_path / "qwen.Q4_K_M.gguf") == GGUF
    assert model_format(tmp_path / "MODEL.GGUF") == GGUF
    assert model_format(tmp_path) == DIRECTORY


def test_probe_of_this_machine(tmp_path):
    import torch

    p = probe_platform(tmp_path / "m.gguf")
    assert p.model_format == GGUF
    assert p.cuda == torch.cuda.is_available()
    assert p.apple_silicon == (sys.platform == "darwin")  # this Linux machine: False
    assert p.packages <= frozenset(ALL)


def _args(*extra: str):
    return parse_args(["--model-id", "m", "--worker-id", "w", *extra])


def test_auto_resolves_the_engine_and_keeps_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_main, "probe_platform", lambda path: probe("vllm", cuda=True))
    cfg = engine_main.resolve_auto(_args("--engine", "auto", "--model-path", str(tmp_path)))
    assert cfg.engine == VLLM and cfg.engine_reason == "CUDA GPU: vllm"
    plain = _args("--engine", "transformers")
    assert engine_main.resolve_auto(plain) is plain


def test_auto_with_an_unloadable_model_exits_with_the_reason(monkeypatch):
    monkeypatch.setattr(engine_main, "probe_platform", lambda path: probe(fmt=GGUF))
    with pytest.raises(SystemExit, match="--engine auto: the model is a GGUF file"):
        engine_main.resolve_auto(_args("--engine", "auto", "--model-path", "x.gguf"))


def test_heartbeat_reports_the_engine_reason(tmp_path):
    cfg = msgspec.structs.replace(_args("--engine", "simulated"), engine_reason="no GPU/NPU (CPU only): transformers")
    service = EngineService(cfg, SimulatedEngine(model_id="m"), EngineMetrics(CollectorRegistry()), state_dir=tmp_path)
    assert service.heartbeat().engine_reason == "no GPU/NPU (CPU only): transformers"
