"""Engine configuration, parsed once at start-up."""

from __future__ import annotations

import argparse
import os
import socket

import msgspec

from schemas.names import slug
from services.common import reply_socket
from services.common.bus import NatsOptions, add_nats_arguments, option_problems
from services.common.metrics_http import DEFAULT_METRICS_HOST, METRICS_HOST_HELP
from services.common.model_store import default_state_dir
from services.engine.backends.join_window import DEFAULT_JOIN_WINDOW_MS
from services.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES


class EngineConfig(NatsOptions, forbid_unknown_fields=True, kw_only=True):
    """Everything an engine process needs to know, from flags (with ``CY_*`` env defaults)."""

    engine: str
    model_id: str
    model_path: str = ""
    aliases: list[str] = []
    worker_id: str
    slots: int = 8
    device: str = "auto"
    dtype: str = "auto"
    context_length: int = 0
    threads: int = 0
    no_lora: bool = False
    heartbeat_interval: float = 1.0
    drain_timeout: float = 30.0
    metrics_port: int = 0
    metrics_host: str = DEFAULT_METRICS_HOST
    # Take --metrics-port over once its holder exits (the engine ./cy up's engine switch replaces).
    metrics_port_takeover: bool = False
    # This engine's own model store and adapter cache (never another host's): --state-dir.
    state_dir: str = ""
    sim_token_rate: float = 0.0
    sim_ttft: float = 0.0
    adapter_dirs: list[str] = []
    adapter_cache_dir: str = ""
    max_adapters: int = 8
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    join_window_ms: float = DEFAULT_JOIN_WINDOW_MS
    pin_threads: str = "auto"
    # ``--engine auto``: why this engine was chosen (heartbeat ``engine_reason``), set after parsing.
    engine_reason: str = ""
    mindie_url: str = "http://127.0.0.1:1025"
    max_models: int = 2
    memory_budget: int = 0
    # Send a request's events to its edge's reply socket when this host has it (services/common/reply_socket.py).
    reply_socket: bool = True
    reply_socket_dir: str = ""
    # transformers and llama.cpp: the model thread writes token events to the reply socket itself.
    thread_writes: bool = True


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    """Build the config from the command line."""
    p = argparse.ArgumentParser(prog="python -m services.engine",
                                description="CY-LLM engine: serves a model behind the common backend interface.")
    add_nats_arguments(p)
    p.add_argument("--engine", default="transformers",
                   help="auto | transformers | vllm | llamacpp | tensorrt-llm | mindie | mlx | simulated (auto: "
                        "chosen for this machine and model, see docs/engines.md; simulated: tests and benchmarks only)")
    p.add_argument("--model-id", required=True, help="the name clients use in 'model'")
    p.add_argument("--model-path", default="",
                   help="local model directory (transformers) or .gguf file (llamacpp; default model: its GGUF); "
                        "none: --model-id is looked up in the model registry and its weights fetched from the "
                        "object store into --state-dir")
    p.add_argument("--state-dir", default=os.environ.get("CY_STATE_DIR", str(default_state_dir())),
                   help="this engine's own model store (models/) and adapter cache (adapters/) "
                        "(default: $CY_STATE_DIR or .cy in the repository)")
    p.add_argument("--alias", action="append", default=[], dest="aliases", help="another name for the model (repeatable)")
    p.add_argument("--worker-id", default="", help="unique worker id (default: <host>-<pid>)")
    p.add_argument("--slots", type=int, default=8, help="requests generated concurrently (batch size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--context-length", type=int, default=0, help="override the model's maximum context")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for generation (llama.cpp: its thread team; transformers: torch's intra-op "
                        "threads; vLLM on CPU: the first N CPUs, unless VLLM_CPU_OMP_THREADS_BIND is set); "
                        "0 = the engine's default")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight work on SIGTERM")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics (/metrics) and health (/healthz) on this port (0 = off)")
    p.add_argument("--metrics-host", default=DEFAULT_METRICS_HOST, help=METRICS_HOST_HELP)
    p.add_argument("--metrics-port-takeover", action="store_true",
                   help="if --metrics-port is in use, serve anyway and bind it once it is free (instead of failing): "
                        "the engine ./cy up switches to takes over the port of the engine it replaces")
    p.add_argument("--sim-token-rate", type=float, default=0.0, help="simulated engine: tokens/s per request (0 = max)")
    p.add_argument("--sim-ttft", type=float, default=0.0, help="simulated engine: seconds before the first token")
    p.add_argument("--adapter-dir", action="append", default=[], dest="adapter_dirs",
                   help="directory whose subdirectories <adapter id>/ hold PEFT adapters (repeatable)")
    p.add_argument("--adapter-cache-dir", default="",
                   help="where adapters from the object store are unpacked, and where the llama.cpp engine keeps "
                        "their GGUF conversions (gguf/) (default: <--state-dir>/adapters)")
    p.add_argument("--mindie-url", default=os.environ.get("CY_MINDIE_URL", "http://127.0.0.1:1025"),
                   help="mindie engine: address of the MindIE Server it streams from")
    p.add_argument("--no-lora", action="store_true",
                   help="vLLM: start without LoRA support (on CPU 2-3.5x the throughput; requests naming an "
                        "adapter are then refused with 'unsupported')")
    p.add_argument("--max-adapters", type=int, default=8,
                   help="PEFT adapters kept loaded at once; the least recently used idle one is evicted")
    p.add_argument("--prefix-cache-bytes", type=int, default=DEFAULT_PREFIX_CACHE_BYTES,
                   help="transformers and llama.cpp: bytes of host memory for prompt KV kept so a prompt starting "
                        "with one prefilled lately (system prompt, earlier turns, the chat template's header; same "
                        "model and adapter) prefills only the rest; least recently used first out; 0 = off "
                        "(default: 256 MiB)")
    p.add_argument("--join-window-ms", type=float, default=DEFAULT_JOIN_WINDOW_MS,
                   help="transformers and llama.cpp: after a step that finished requests while others run on, "
                        "wait up to this long for their replacements to start with the next step, and only while "
                        "finished requests are seen to be replaced that fast (clients that send the next request "
                        "as the last one ends); at most a quarter of a step; 0 = never wait (default: %(default)s)")
    p.add_argument("--pin-threads", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp on CPU: bind the model thread and each of llama.cpp's OpenMP threads to a CPU of "
                        "its own, so the kernel never stacks two of them on one CPU while they meet at a barrier "
                        "after every op; auto = only where the threads fill the CPUs this process may use "
                        "(default: %(default)s)")
    p.add_argument("--max-models", type=int, default=2,
                   help="models kept loaded at once; loading one more unloads the least recently used idle one")
    p.add_argument("--memory-budget", type=int, default=0,
                   help="bytes of model memory (RSS on CPU, CUDA allocations on GPU) loads may use; 0 = no budget")
    g = reply_socket.add_arguments(p, "publish every token event to the request's NATS reply subject, even when "
                                  "its edge's reply socket is on this host")
    g.add_argument("--no-thread-writes", dest="thread_writes", action="store_false",
                   help="transformers and llama.cpp: write token events to an edge's reply socket from the event "
                        "loop, not straight from the model thread as each step ends (which spares the loop a "
                        "wake-up per token)")
    args = p.parse_args(argv)
    if not args.worker_id:
        args.worker_id = slug(f"{socket.gethostname()}-{os.getpid()}")
    if args.slots < 1:
        p.error("--slots must be at least 1")
    if args.max_models < 1:
        p.error("--max-models must be at least 1")
    if args.memory_budget < 0:
        p.error("--memory-budget must be 0 (off) or a number of bytes")
    if args.no_lora and args.engine not in ("vllm", "auto"):
        p.error("--no-lora is a vLLM setting (the other engines pay nothing for adapter support)")
    if args.pin_threads != "auto" and args.engine not in ("llamacpp", "auto"):
        p.error("--pin-threads is a llama.cpp setting (the other engines leave their threads to their library)")
    if args.threads < 0:
        p.error("--threads must be 0 (the engine's default) or a number of threads")
    if args.join_window_ms < 0:
        p.error("--join-window-ms must be 0 (off) or a number of milliseconds")
    if args.prefix_cache_bytes < 0:
        p.error("--prefix-cache-bytes must be 0 (off) or a number of bytes")
    if args.max_adapters < 1:
        p.error("--max-adapters must be at least 1")
    if args.metrics_port_takeover and not args.metrics_port:
        p.error("--metrics-port-takeover needs --metrics-port")
    config = msgspec.convert(vars(args), EngineConfig)
    if problems := option_problems(config):
        p.error("; ".join(problems))
    return config
