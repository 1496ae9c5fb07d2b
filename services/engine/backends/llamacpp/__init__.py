"""The llama.cpp backend: a GGUF model through ``llama-cpp-python``'s C API.

- ``engine``: ``LlamaCppEngine``, the ``EngineBackend``.
- ``model``: the GGUF model and context through the ctypes bindings.
- ``sampling``: per-sequence samplers (greedy and temperature/top-p in numpy, else llama.cpp's chain).
- ``batching``: continuous batching in the model thread, one ``llama_decode`` per adapter in use.
- ``decode_threads``: all CPU threads per decode while they get the CPUs, one while the host starves them.
- ``adapter_slots``: the GGUF LoRA adapters loaded into the model (LRU).
- ``lora_convert``: PEFT LoRA adapters converted to GGUF LoRA files.
"""

import os

# llama.cpp's CPU backend runs each graph in an OpenMP team that meets at a barrier after every op
# (about 750 per token for the default model). Waiting there by spinning is what makes two threads
# pay off (a futex sleep and wake per op costs more than the op), but spinning forever
# ("OMP_WAIT_POLICY=ACTIVE") starves every other process between decodes on a busy host. A bounded
# spin is the middle; where even that collapses (an oversubscribed host), the model thread drops
# to one thread, which has no barrier (``decode_threads``). Must be set before
# libgomp loads with llama_cpp. libgomp keeps one team per thread that starts a parallel region and
# drops this spin to ~100 as soon as its threads outnumber the CPUs, so every decode must come from
# one thread (the model thread; see ``model.GgufModel.warm_up``), or the setting silently does nothing.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
