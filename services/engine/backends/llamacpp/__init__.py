"""The llama.cpp backend: a GGUF model through ``llama-cpp-python``'s C API.

- ``engine``: ``LlamaCppEngine``, the ``EngineBackend``.
- ``model``: the GGUF model and context through the ctypes bindings.
- ``batching``: continuous batching in the model thread, one ``llama_decode`` per adapter in use.
- ``decode_threads``: all CPU threads per decode while they get the CPUs, one while the host starves them.
- ``adapter_slots``: the GGUF LoRA adapters loaded into the model (LRU).
- ``lora_convert``: PEFT LoRA adapters converted to GGUF LoRA files.
"""
