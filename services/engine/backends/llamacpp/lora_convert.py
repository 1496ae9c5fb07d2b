"""PEFT LoRA adapters as GGUF LoRA files, which is the only form llama.cpp applies (``llama_adapter_lora_init``).

llama.cpp computes ``W x + scale * B (A x)`` for every base tensor ``blk.N.<name>.weight`` that
has ``.lora_a`` / ``.lora_b`` partners in the adapter GGUF, with ``scale = alpha / rank`` from
``adapter.lora.alpha`` (or 1 when alpha is 0). llama.cpp's own ``convert_lora_to_gguf.py``
needs its ``convert_hf_to_gguf.py`` and the base model's Hugging Face directory, neither of
which ships with ``llama-cpp-python``; this module does the same conversion for the cases
that matter here, reading only the adapter and the base GGUF's header:

* tensor names come from ``gguf``'s own name map for the base's architecture
  (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``);
* peft's scaling (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, per-module ``alpha_pattern``)
  is folded into B and alpha is written as 0, so every module gets exactly peft's scale;
* for the ``llama`` architecture, the HF->GGUF conversion permuted the rows of ``q`` and ``k``
  (rotary layout); ``W = B A`` permutes with B's rows, so B gets the same permutation;
* every shape is checked against the base GGUF before llama.cpp sees it (llama.cpp would
  refuse the file, but with a message only in its log);
* A and B are stored as float16, as llama.cpp's converter does by default. Measured here,
  float32 LoRA tensors make llama.cpp's CPU matmul give a one-row decode different logits
  (up to 0.4) from the same row decoded beside others, which breaks batch invariance;
  float16 ones give identical logits either way, and agree better with peft.

Anything else (DoRA, bias terms, ``modules_to_save``, embedding or fused-projection targets,
other PEFT methods) is refused with ``unsupported``: llama.cpp has no way to apply it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.errors import BusError, ErrorCode
from services.engine.lora.sources import ADAPTER_CONFIG
from services.engine.lora.shapes import ADAPTER_WEIGHTS, PEFT_PREFIX

# Architectures whose GGUF conversion permutes the q/k rows (convert_hf_to_gguf.py's LlamaModel.permute).
_PERMUTED_QK = {"llama"}
# Architectures whose q/k rows are stored as in the HF checkpoint.
_PLAIN = {"qwen2", "qwen3", "gemma", "gemma2"}
# Trainer methods (``schemas.training.METHODS``) whose saved adapter is a plain LoRA (PiSSA is saved converted).
LORA_METHODS = ("lora", "qlora", "pissa")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass(frozen=True, slots=True)
class BaseHeader:
    """What the conversion needs from the base GGUF: architecture, head counts, tensor shapes (ne order)."""

    arch: str
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]


def read_base_header(gguf_path: Path) -> BaseHeader:
    """Read the base model's architecture, head counts and tensor shapes (the header only)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.parts[f.data[0]]

    arch = bytes(field("general.architecture")).decode()
    n_head = int(field(f"{arch}.attention.head_count")[0])
    kv = field(f"{arch}.attention.head_count_kv")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return BaseHeader(arch, n_head, int(kv[0]) if kv is not None else n_head, shapes)


def _unsupported(adapter: str, why: str) -> BusError:
    return BusError(ErrorCode.UNSUPPORTED, f"adapter {adapter!r} cannot be served by llama.cpp: {why}",
                    param="adapter")


def _broken(adapter: str, why: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} does not fit this model: {why}",
                    param="adapter")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``alpha_pattern`` lookup: the first key matching the module name as a suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return float(default)


def check_config(config: dict, adapter: str) -> None:
    """Refuse what llama.cpp cannot apply, before reading any weight."""
    if config.get("peft_type") != "LORA":
        raise _unsupported(adapter, f"it is a {config.get('peft_type')} adapter; llama.cpp applies only LoRA "
                                    "(use the transformers engine for other PEFT methods)")
    if config.get("use_dora"):
        raise _unsupported(adapter, "DoRA's magnitude vectors have no GGUF form (use the transformers engine)")
    if config.get("bias", "none") != "none":
        raise _unsupported(adapter, f"bias={config['bias']!r}: GGUF LoRA has no bias terms")
    if config.get("modules_to_save"):
        raise _unsupported(adapter, f"it saves whole modules {config['modules_to_save']}, which GGUF LoRA "
                                    "cannot replace")
    if config.get("fan_in_fan_out"):
        raise _unsupported(adapter, "fan_in_fan_out (Conv1D layers) is not a llama.cpp layout")
    if config.get("target_parameters"):
        raise _unsupported(adapter, "LoRA on raw parameters (target_parameters) has no GGUF form")


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rotary permutation of a q/k projection's output rows."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_tensors(adapter_dir: Path, adapter: str, base: BaseHeader) -> dict[str, np.ndarray]:
    """``{"blk.0.attn_q.weight.lora_a": A, ...}`` in float16, scaled and permuted as the module docstring says."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    check_config(config, adapter)
    if base.arch not in _PERMUTED_QK | _PLAIN:
        raise _unsupported(adapter, f"LoRA conversion for the {base.arch!r} architecture is not supported "
                                    f"(supported: {', '.join(sorted(_PERMUTED_QK | _PLAIN))})")
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise _unsupported(adapter, f"no {ADAPTER_WEIGHTS} (a .bin adapter: save it with safetensors)")
    n_blocks = 1 + max((int(name.split(".")[1]) for name in base.shapes if name.startswith("blk.")), default=0)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == base.arch)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise _unsupported(adapter, f"tensor {key!r} is not a LoRA A/B matrix")
        if value.ndim != 2:
            raise _broken(adapter, f"{key} has shape {list(value.shape)}, expected a matrix")
        pairs.setdefault(match["module"], {})[match["part"]] = value.astype(np.float32)
    rank_scaled = config.get("use_rslora", False)
    tensors: dict[str, np.ndarray] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _broken(adapter, f"{module} has lora_{''.join(ab)} without its partner")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or target not in base.shapes:
            raise _unsupported(adapter, f"it adapts {module!r}, which has no llama.cpp tensor to apply it to")
        if target.startswith(("token_embd.", "output.")):
            raise _unsupported(adapter, f"it adapts {module!r} (embeddings / output head)")
        a, b = ab["A"], ab["B"]
        n_in, n_out = base.shapes[target][0], base.shapes[target][1]
        rank = a.shape[0]
        if a.shape[1] != n_in or b.shape[0] != n_out or b.shape[1] != rank:
            raise _broken(adapter, f"{module} has A {list(a.shape)} and B {list(b.shape)}; the base tensor "
                                   f"{target} maps {n_in} -> {n_out}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        b = b * np.float32(alpha / (math.sqrt(rank) if rank_scaled else rank))
        if base.arch in _PERMUTED_QK and target.split(".")[-2] in ("attn_q", "attn_k"):
            b = _permute(b, base.n_head if target.split(".")[-2] == "attn_q" else base.n_head_kv)
        tensors[f"{target}.lora_a"] = np.ascontiguousarray(a, dtype=np.float16)
        tensors[f"{target}.lora_b"] = np.ascontiguousarray(b, dtype=np.float16)
    if not tensors:
        raise _broken(adapter, "it holds no LoRA weights")
    return tensors


def write_lora_gguf(tensors: dict[str, np.ndarray], arch: str, out: Path) -> None:
    """Write a GGUF LoRA adapter (``general.type=adapter``, alpha 0: the scale is already in B) atomically."""
    import gguf

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def fingerprint(adapter_dir: Path, base_gguf: Path) -> str:
    """Changes whenever the adapter's config or weights, or the base GGUF, change."""
    h = hashlib.sha256()
    for path in (adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS, base_gguf):
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def converted_adapter(adapter_dir: Path, adapter: str, base_gguf: Path, base: BaseHeader, cache_dir: Path) -> Path:
    """The GGUF form of the peft adapter in ``adapter_dir``, converted once per adapter and base (blocking)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", adapter)
    out = cache_dir / f"{slug}-{fingerprint(adapter_dir, base_gguf)}.gguf"
    if not out.is_file():
        write_lora_gguf(lora_tensors(adapter_dir, adapter, base), base.arch, out)
    return out
