"""A GGUF model loaded through llama.cpp's C API (``llama-cpp-python``'s ctypes bindings).

Owns the model, its vocabulary and one context whose KV cache holds ``n_seq`` independent
sequences (``kv_unified=False``: one KV stream per sequence id, each ``ctx_per_seq`` cells),
which is what lets one ``llama_decode`` advance several requests at once. Tokenizing,
detokenizing and rendering the chat template read only the vocabulary and metadata and are
safe from any thread; decoding and sampling happen only in the model thread
(``gguf_batching.GgufBatchGenerator``), because a llama.cpp context is not thread-safe.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp import _logger as llama_logger
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from schemas.inference import SamplingParams
from services.engine.backends.llamacpp.sampling import Sampler, new_sampler

log = logging.getLogger(__name__)

# Most prompt tokens (over all sequences) fed to one llama_decode; longer prompts are prefilled in chunks.
PREFILL_TOKEN_BUDGET = 512
# KV cells per sequence when --context-length is not given: the GGUF's training context, capped,
# because llama.cpp allocates the whole KV cache (sequences x cells) up front.
DEFAULT_MAX_CONTEXT = 8192

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            # llama.cpp logs every tensor at load; keep its output for debug logging only.
            llama_logger.set_verbose(log.isEnabledFor(logging.DEBUG))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def find_gguf(path: Path) -> Path:
    """``path`` itself when it is a file, else the one ``*.gguf`` file in the directory ``path``."""
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{path} holds {len(found)} .gguf files; pass --model-path of one of them")
    raise FileNotFoundError(f"no GGUF model at {path}")


def default_threads() -> int:
    """Every CPU this process may use on small hosts (up to 4), else half of them (about the physical cores).

    On this 2-vCPU host 2 threads decode about 1.7x faster than 1 (with the bounded spin above);
    on larger hosts hyper-threads share a core's vector units, so half the logical CPUs is the
    usual llama.cpp choice. ``--threads`` overrides it.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else cpus // 2


@dataclass(frozen=True, slots=True)
class ContextShape:
    """How the context is sized: sequences decoded together and the KV cells each one gets (0: default)."""

    n_seq: int
    ctx_per_seq: int = 0
    threads: int = 0  # 0: default_threads()
    gpu_layers: int = 0
    pin_threads: str = "auto"  # decode threads bound to CPUs: auto | on | off (``decode_threads.ThreadPins``)


class GgufModel:
    """A loaded GGUF model plus a multi-sequence context; see the module docstring for threading."""

    def __init__(self, path: Path, shape: ContextShape) -> None:
        self.path = path
        self.shape = shape
        self._model = None
        self.ctx = None
        self.memory = None
        self.vocab = None
        self.n_vocab = 0
        self.n_ctx_train = 0
        self.ctx_per_seq = 0
        self.threads = 0  # CPU threads of the context (llama_decode may be given fewer)
        self._pieces: dict[int, bytes] = {}
        self.end_ids: frozenset[int] = frozenset()
        self._formatter: Jinja2ChatFormatter | None = None
        self._bare_formatter: Jinja2ChatFormatter | None = None  # no assistant header (``/tokenize`` only)

    # --- lifecycle ---
    def load(self) -> None:
        """Load weights and create the context (blocking; call from a worker thread, then ``warm_up``
        from the model thread)."""
        _init_backend()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.shape.gpu_layers
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path} (not a GGUF model it supports?)")
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        # Asked once a token per sequence in the model thread: a set lookup, not a call into llama.cpp.
        self.end_ids = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        threads = self.threads = self.shape.threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = self.shape.n_seq
        wanted = self.shape.ctx_per_seq or min(self.n_ctx_train or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
        cparams.n_ctx = self.shape.n_seq * wanted
        cparams.n_batch = max(PREFILL_TOKEN_BUDGET, self.shape.n_seq)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One KV stream per sequence, not one unified pool: each sequence's cells then lie exactly as
        # they would if it ran alone, so batching never changes its logits. In a unified pool the
        # cell layout changes floating-point sums enough (logits moved by up to 1.2 here) to flip
        # greedy choices. The price: llama.cpp puts only consecutive sequence ids in one ubatch,
        # which the batch generator keeps cheap (lowest free id first, rows sorted by id).
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {self.path}")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.ctx_per_seq = min(wanted, int(llama_cpp.llama_n_ctx_seq(ctx)))
        template = self.metadata("tokenizer.chat_template")
        if template:
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self.eos_id),
                                                  bos_token=self._token_text(self.bos_id))
            self._bare_formatter = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self.eos_id),
                                                       bos_token=self._token_text(self.bos_id),
                                                       add_generation_prompt=False)

    def warm_up(self) -> None:
        """One throw-away decode, as llama.cpp's own tools do: the first decode builds and allocates
        the compute graph, which would otherwise land on the first request's time to first token.

        Call it from the thread that will decode (the model thread), never from a loader thread:
        a decode from a second thread leaves a second OpenMP team, whose idle threads make libgomp
        count more threads than CPUs and then sleep in the futex at every op barrier instead of
        spinning (measured: ~750 context switches per token, the decode ~1.6x slower).
        """
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        try:
            batch.token[0] = self.bos_id if self.bos_id >= 0 else self.eos_id
            batch.pos[0] = 0
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            batch.n_tokens = 1
            llama_cpp.llama_decode(self.ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Free the context and the model."""
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # --- metadata ---
    def metadata(self, key: str) -> str | None:
        """A string value from the GGUF header, or ``None``."""
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    @property
    def handle(self):
        """The ``llama_model`` pointer (for adapters loaded into it)."""
        return self._model

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence token (-1 if none)."""
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_id(self) -> int:
        """End-of-sequence token (-1 if none)."""
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def is_end_of_generation(self, token: int) -> bool:
        """EOS, EOT and every other token the model ends a turn with."""
        return token in self.end_ids

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    # --- text <-> tokens ---
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the vocabulary asks."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # the buffer was too small; -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise ValueError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; an incomplete UTF-8 character at the end shows as U+FFFD."""
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat: the GGUF's own template (as llama-cpp-python renders it), tokenized;
        ``add_generation_prompt`` false leaves the assistant header off."""
        formatter = self._formatter if add_generation_prompt else self._bare_formatter
        if formatter is None:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            text = text + "\nassistant:" if add_generation_prompt else text
            return self.tokenize(text, add_special=True, parse_special=False)
        # The template writes any BOS itself (llama-cpp-python's ``added_special``); special tokens in it are real.
        return self.tokenize(formatter(messages=messages).prompt, add_special=False, parse_special=True)

    # --- sampling ---
    def new_sampler(self, params: SamplingParams, seed: int, window: int) -> Sampler:
        """A per-request sampler (``sampling``): greedy, a vectorised temperature/top-p draw, or llama.cpp's chain
        (bias, penalties over the last ``window`` tokens, temperature, top-k, top-p, a seeded draw)."""
        return new_sampler(params, seed, window, self.n_vocab, self.ctx)
