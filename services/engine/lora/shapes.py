"""Does a LoRA adapter fit the base model? Its A/B matrices against the base weights' shapes, headers only.

vLLM copies LoRA weights into preallocated buffers by slicing, so an adapter made for another
model (narrower layers) loads without error and silently produces garbage. Checking the shapes
recorded in the safetensors headers (no tensor is read) turns that into a typed error for the
one request instead.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from schemas.errors import BusError, ErrorCode

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """``{"model.layers.0.self_attn.q_proj.weight": [out, in], ...}`` from every safetensors file of a model."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def check_lora_shapes(adapter_dir: Path, adapter: str, base: dict[str, list[int]]) -> None:
    """Every ``lora_A`` is ``[r, in]`` and every ``lora_B`` is ``[out, r]`` of the base layer it adapts."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        return  # a .bin adapter: vLLM checks what it can
    modules = {key.rsplit(".", 1)[0] for key in base}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name = key.removeprefix(PEFT_PREFIX)
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not name.endswith(part):
                    continue
                module = name.removesuffix(part)
                if module == "lm_head" and "lm_head" not in modules:
                    module = "model.embed_tokens"  # tied embeddings
                if module not in modules:
                    raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} does not fit this model: it "
                                                              f"adapts {module!r}, which the model lacks",
                                   param="adapter")
                expected = base.get(module + ".weight")
                if expected is None:
                    continue  # a quantized layer (qweight...): its packed shape says nothing here
                shape = list(f.get_slice(key).get_shape())
                if len(shape) != 2 or len(expected) != 2 or shape[dim] != expected[dim]:
                    raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} does not fit this model: {key} "
                                                              f"has shape {shape}, the base layer {module} has "
                                                              f"{expected}", param="adapter")
