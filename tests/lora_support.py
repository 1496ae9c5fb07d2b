"""Test PEFT adapters with non-trivial weights on the default model (outputs differ from the base), and the
greedy requests the adapter tests send."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import torch

from schemas import ChatMessage, InferenceRequest, SamplingParams
from services.engine.backend import Chunk, Finished


def make_adapter(base_dir: Path, out: Path, method: str, seed: int) -> Path:
    """Save a ``method`` adapter (lora, dora, ia3, loha, prefix) with random non-identity weights into ``out``."""
    from peft import (IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    if method in ("lora", "dora"):
        config = LoraConfig(r=8, lora_alpha=64, target_modules=targets, init_lora_weights=False,
                            use_dora=method == "dora", task_type=TaskType.CAUSAL_LM)
    elif method == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           init_ia3_weights=False, task_type=TaskType.CAUSAL_LM)
    elif method == "loha":
        config = LoHaConfig(r=8, alpha=64, target_modules=targets, init_weights=False, task_type=TaskType.CAUSAL_LM)
    elif method == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM)
    else:
        raise ValueError(method)
    peft_model = get_peft_model(model, config)
    if method == "ia3":  # init_ia3_weights=False draws from N(1, 0.02)-ish; push further from identity
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name:
                    p.mul_(torch.empty_like(p).uniform_(0.2, 1.8))
    if method == "loha":  # the random init barely moves the logits; a 2.5x larger factor moves them 40x
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "hada_" in name:
                    p.mul_(2.5)
    peft_model.save_pretrained(out)
    return out



def make_misfit_lora(base_dir: Path, out: Path, seed: int = 8) -> Path:
    """A LoRA whose A matrices are 3 columns wide: made for a model with other layer sizes than the default."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, out, "lora", seed)
    weights = {k: v[:, :3].contiguous() if "lora_A" in k else v
               for k, v in load_file(out / "adapter_model.safetensors").items()}
    save_file(weights, out / "adapter_model.safetensors")
    return out

PROMPT = "Tell me a short story about a lighthouse."


def chat(adapter: str | None = None, content: str = PROMPT, max_tokens: int = 16) -> InferenceRequest:
    """A greedy chat request for engine ``m``, with ``adapter`` (None: the base model)."""
    return InferenceRequest(id=f"t-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", adapter=adapter,
                            messages=[ChatMessage(role="user", content=content)],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def token_ids(engine, req: InferenceRequest, first: asyncio.Event | None = None) -> list[int]:
    """The token ids ``engine`` generates for ``req`` (which must finish); ``first`` is set at its first chunk."""
    ids, fin = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            ids.extend(ev.token_ids)
            if first is not None:
                first.set()
        else:
            fin = ev
    assert isinstance(fin, Finished)
    return ids
