"""Engine flags that shape how a backend is built (no model is loaded here)."""

from __future__ import annotations

import importlib.util

import pytest

from services.engine.__main__ import build_backend
from services.engine.config import parse_args


def test_no_lora_reaches_the_vllm_backend_and_is_refused_elsewhere(tmp_path, capsys):
    base = ["--model-id", "m", "--model-path", str(tmp_path)]
    pytest.importorskip("vllm", reason="the vLLM engine needs the [vllm] extra")
    assert build_backend(parse_args([*base, "--engine", "vllm", "--no-lora"]))._enable_lora is False
    assert build_backend(parse_args([*base, "--engine", "vllm"]))._enable_lora is True
    with pytest.raises(SystemExit):
        parse_args([*base, "--engine", "transformers", "--no-lora"])
    assert "--no-lora is a vLLM setting" in capsys.readouterr().err


def test_threads_reach_the_transformers_backend(tmp_path):
    backend = build_backend(parse_args(["--model-id", "m", "--model-path", str(tmp_path), "--engine", "transformers",
                                        "--threads", "2"]))
    assert backend._threads == 2


def test_prefix_cache_bytes_reach_the_transformers_and_llamacpp_backends_and_are_documented(tmp_path, capsys):
    base = ["--model-id", "m", "--model-path", str(tmp_path), "--engine", "transformers"]
    assert build_backend(parse_args([*base, "--prefix-cache-bytes", "0"]))._prefix_cache_bytes == 0
    assert build_backend(parse_args(base))._prefix_cache_bytes == 256 * 1024 * 1024
    if importlib.util.find_spec("llama_cpp") is not None:
        gguf = ["--model-id", "m", "--model-path", str(tmp_path / "m.gguf"), "--engine", "llamacpp"]
        assert build_backend(parse_args([*gguf, "--prefix-cache-bytes", "1024"]))._prefix_cache_bytes == 1024
    with pytest.raises(SystemExit):
        parse_args([*base, "--prefix-cache-bytes", "-1"])
    assert "--prefix-cache-bytes must be 0 (off)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--prefix-cache-bytes" in capsys.readouterr().out
