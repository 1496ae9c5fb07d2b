"""Iteration-level (continuous) batching over llama.cpp, in one model thread.

A llama.cpp context is not thread-safe, so one thread owns it. Every step builds one
``llama_batch``: the last sampled token of every decoding sequence (one row each, its own
sequence id, so its own KV stream) plus chunks of waiting prompts up to
``PREFILL_TOKEN_BUDGET`` tokens (chunked prefill: a long prompt never stalls the others for
more than one chunk). One ``llama_decode`` runs it, then each sequence whose logits came out
samples with its own sampler (own parameters, own seeded RNG, own penalty history), so
batching never changes what a seeded request draws (``sampling``: greedy and temperature/top-p
draws in numpy, the rest through llama.cpp's chain). A sequence that ends or is aborted has
its KV cells removed (``llama_memory_seq_rm``) and its sequence id returned at once.

With one KV stream per sequence, llama.cpp puts only sequences with consecutive ids, in
ascending order, into one micro-batch; anything else is split into one graph per run of ids.
So rows go into the batch sorted by sequence id and a new sequence takes the lowest free id
(filling the gap a finished one left). Before this, ids came back in finishing order and a
step of 8 sequences could run as 8 graphs: 63-65 tok/s for 8 streams instead of 161-169.

Structured outputs: a sequence with a constraint (``grammar.RowConstraint``, the same llguidance
matcher the transformers engine uses) has the tokens its grammar forbids set to -inf in its own
row of llama.cpp's logits buffer before its sampler reads them; other rows are untouched.
``logit_bias`` is a sampler in the chain (``GgufModel.new_sampler``).

LoRA adapters (``gguf_lora.GgufLoras``): llama.cpp applies one adapter set to a whole
``llama_decode``, so a step runs one decode per adapter among its sequences (the base model's
first), switching the context's adapter before each. Kept KV is reused only by a sequence
with the same adapter (an adapter on q/k/v changes the cached keys and values).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import llama_cpp
import numpy as np

from schemas.errors import BusError, ErrorCode
from schemas.events import TokenLogprob, TopLogprob
from schemas.inference import SamplingParams
from services.engine.backend import Chunk, Finished
from services.engine.backends.model_thread import Failed, ModelThread
from services.engine.text.detok import ByteDetokenizer, StopMatcher
from services.engine.backends.llamacpp.adapter_slots import AdapterListener, GgufLoras
from services.engine.backends.llamacpp.decode_threads import DecodeThreads, ThreadPins
from services.engine.backends.llamacpp.model import PREFILL_TOKEN_BUDGET, GgufModel
from services.engine.backends.llamacpp.sampling import Chain, LogitsRows, Sampler
from services.engine.backends.llamacpp.saved_prefixes import SavedPrefixes
from services.engine.grammar.constraint import RowConstraint
from services.engine.prefix_cache import common_length

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GgufSequence:
    """One request's state in the batch."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    detok: ByteDetokenizer
    stop: StopMatcher
    adapter: str | None = None  # with the GGUF form of it at adapter_path; None: the base model
    adapter_path: Path | None = None
    seq_id: int = -1
    sampler: Sampler | None = None
    n_past: int = 0  # tokens of this sequence in its KV stream
    reused: int = 0  # prompt tokens whose KV was kept in its stream or restored from a saved copy
    generated: int = 0
    out_ids: list[int] = field(default_factory=list)
    last_token: int = -1
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    constraint: RowConstraint | None = None  # structured output: the grammar this row must follow

    @property
    def prefilling(self) -> bool:
        """Some prompt tokens are not in the KV cache yet."""
        return self.n_past < len(self.prompt_ids)


Event = Chunk | Finished | Failed


def _by_seq_id(seq: GgufSequence) -> int:
    return seq.seq_id


def _by_adapter(seq: GgufSequence) -> tuple[bool, str]:
    return seq.adapter is not None, seq.adapter or ""


Delivery = Callable[[list[tuple[str, Event]]], None]


class GgufBatchGenerator(ModelThread):
    """The model thread: admits sequences, runs one batched decode per step, delivers events per step."""

    def __init__(self, model: GgufModel, deliver: Delivery, *, max_adapters: int = 8,
                 on_adapters: AdapterListener | None = None, prefix_cache_bytes: int = 0,
                 join_window: float = 0.0) -> None:
        super().__init__("cy-llamacpp-batch", deliver, join_window)
        self._model = model
        self.loras = GgufLoras(model, max_adapters, on_adapters)
        self._free_ids = list(range(model.shape.n_seq - 1, -1, -1))
        # Tokens whose KV a free stream still holds (what its last sequence had fed), with the adapter
        # file that computed them (None: the base model): the next sequence with that same file
        # sharing a prefix skips prefilling it (a re-converted adapter never reuses the old one's KV).
        self._cached: dict[int, tuple[Path | None, list[int]]] = {}
        # What those streams' next sequences would cut, saved to host memory and restored into any stream.
        self.saved = SavedPrefixes(model.ctx, model.memory, prefix_cache_bytes)
        self._running: list[GgufSequence] = []
        self._capacity = max(PREFILL_TOKEN_BUDGET, model.shape.n_seq)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._rows = LogitsRows(model.ctx, model.n_vocab)
        threads = 1 if model.shape.gpu_layers else model.threads  # offloaded: the CPU threads mostly wait
        self.threads = DecodeThreads(threads)
        self.pins: ThreadPins | None = None  # bound by the model thread once its OpenMP team has started

    # --- the model thread ---
    def run(self) -> None:
        try:
            # here, not in the loader thread: one OpenMP team (see warm_up), whose threads are then bound
            self.pins = ThreadPins.start(self._model.warm_up, self.threads.current, self._model.shape.pin_threads)
            while not self._stopping:
                self._collect(block=not self._running and not self._waiting)
                events: list[tuple[str, Event]] = []
                self._drop_aborted()
                self._admit(events)
                started = time.perf_counter()
                try:
                    if self._running:
                        self._step(events)
                except Exception as exc:  # a failed step must fail its requests, not kill the engine
                    log.exception("batch step failed; failing %d sequences", len(self._running))
                    for seq in self._running:
                        events.append((seq.request_id, Failed(ErrorCode.ENGINE_FAILED, f"generation failed: {exc}")))
                        self._release(seq, keep=False)
                    self._running = []
                if events:
                    self._hand_over(events, len(self._running), time.perf_counter() - started)
        finally:
            for seq in self._running:
                self._release(seq)
            self.loras.close()
            llama_cpp.llama_batch_free(self._batch)

    def _drop_aborted(self) -> None:
        aborted = self._take_aborted()
        if not aborted:
            return
        for seq in self._running:
            if seq.request_id in aborted:
                self._release(seq)
        self._running = [s for s in self._running if not s.done]

    def _admit(self, events: list) -> None:
        """Give waiting sequences a free sequence id and a sampler; their prompts feed from the next step.

        A sequence takes the free stream whose kept tokens share the longest prefix with its
        prompt (a shared system prompt, the earlier turns of a chat), else the lowest free id.
        The kept cells past the shared prefix are saved to host memory and cut, or the stream takes
        a saved copy sharing more (``saved_prefixes``); at least the prompt's last token is
        decoded again, because its logits are what the first sample needs. A sequence whose adapter
        cannot be loaded until a busy one goes idle waits; one llama.cpp refuses fails alone.
        """
        blocked: list[GgufSequence] = []
        while self._waiting and self._free_ids:
            seq = self._waiting.pop(0)
            if seq.adapter is not None:
                try:
                    if not self.loras.ensure(seq.adapter, seq.adapter_path, {s.adapter for s in self._running}):
                        blocked.append(seq)
                        continue
                except BusError as exc:
                    events.append((seq.request_id, Failed(exc.code, exc.message)))
                    continue
            best, shared = self._free_ids[-1], 0  # _free_ids is kept in descending order
            for seq_id in reversed(self._free_ids):  # lowest id first, so ties keep ids low
                adapter, kept = self._cached.get(seq_id, (None, ()))
                common = common_length(kept, seq.prompt_ids) if adapter == seq.adapter_path else 0
                if common > shared:
                    best, shared = seq_id, common
            self._free_ids.remove(best)
            seq.seq_id = best
            kept_owner, kept = self._cached.pop(best, (None, ()))
            seq.n_past = seq.reused = self.saved.place(best, seq.adapter_path, seq.prompt_ids, kept_owner, kept,
                                                       shared)
            seq.sampler = self._model.new_sampler(seq.params, seq.seed, seq.max_new_tokens)
            self._running.append(seq)
        self._waiting[:0] = blocked
        self._running.sort(key=_by_seq_id)

    def _step(self, events: list) -> None:
        """One step: a ``llama_decode`` per adapter in use (base model first), each with its sequences' rows."""
        groups = [list(g) for _, g in groupby(sorted(self._running, key=_by_adapter), key=_by_adapter)]
        for seqs in groups:  # sorted() is stable: each group stays in ascending sequence id
            self.loras.apply(seqs[0].adapter)
            self._decode(seqs, events)
        self.steps += 1
        for seq in self._running:
            if seq.done:
                self._release(seq)
        self._running = [s for s in self._running if not s.done]

    def _decode(self, seqs: list[GgufSequence], events: list) -> None:
        """One ``llama_decode``: a token per decoding sequence, then prompt chunks; sample where logits came out."""
        outputs = self._fill_batch(seqs)
        wall, cpu = time.perf_counter(), time.process_time()
        rc = llama_cpp.llama_decode(self._model.ctx, self._batch)
        self._pick_threads(time.perf_counter() - wall, time.process_time() - cpu)
        if rc != 0:
            # 1: no KV slot; 2: aborted; <0: error. These sequences are in an unknown state: fail them.
            log.error("llama_decode failed (%d); failing %d sequences", rc, len(seqs))
            for seq in seqs:
                events.append((seq.request_id, Failed(ErrorCode.ENGINE_FAILED, f"llama_decode failed with {rc}")))
                self._release(seq, keep=False)
            return
        for seq, index in outputs:
            # Before sampling: the model's own distribution, as OpenAI and vLLM report it.
            raw = self._log_softmax(index) if seq.params.logprobs is not None else None
            if seq.constraint is not None and not self._mask(seq, index, events):
                continue
            sampler = seq.sampler
            token = sampler.sample_at(index) if isinstance(sampler, Chain) else sampler.sample(self._logits(index))
            if seq.constraint is not None and not self._model.is_end_of_generation(token):
                seq.constraint.advance(token)
            self._advance(seq, token, events, raw)

    def _pick_threads(self, wall: float, cpu: float) -> None:
        """Fewer threads while the host starves them, all again once it does not (see ``decode_threads``)."""
        before = self.threads.current
        after = self.threads.observe(wall, cpu)
        if after != before:
            llama_cpp.llama_set_n_threads(self._model.ctx, after, after)
            if self.pins is not None:
                self.pins.apply(after)
            log.debug("llama.cpp decode threads %d -> %d (%.1f ms wall, %.1f ms CPU)", before, after,
                      wall * 1000, cpu * 1000)

    def _mask(self, seq: GgufSequence, index: int, events: list) -> bool:
        """Mask batch row ``index``'s logits (in llama.cpp's buffer) to what ``seq``'s grammar allows next.

        False (and the sequence failed, typed) if the matcher hit one of its limits.
        """
        seq.constraint.mask_numpy(self._logits(index))
        if not seq.constraint.error:
            return True
        events.append((seq.request_id, Failed(ErrorCode.INVALID_REQUEST,
                                              f"structured output could not be continued: {seq.constraint.error}")))
        seq.done = True
        return False

    def _logits(self, index: int) -> np.ndarray:
        """Batch row ``index``'s logits: a view of llama.cpp's own buffer (writes go to the sampler)."""
        return self._rows(index)

    def _fill_batch(self, seqs: list[GgufSequence]) -> list[tuple[GgufSequence, int]]:
        """Write this step's tokens into the batch; return (sequence, batch index) of every row with logits."""
        batch, n, outputs = self._batch, 0, []

        def put(seq: GgufSequence, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = seq.n_past
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq.seq_id
            batch.logits[n] = logits
            if logits:
                outputs.append((seq, n))
            seq.n_past += 1
            n += 1

        for seq in seqs:  # in ascending sequence id: see the module docstring
            if not seq.prefilling:
                put(seq, seq.last_token, True)
        budget = self._capacity - n
        for seq in seqs:
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(budget, len(seq.prompt_ids) - seq.n_past)
                budget -= take
                for token in seq.prompt_ids[seq.n_past:seq.n_past + take]:
                    put(seq, token, seq.n_past == len(seq.prompt_ids) - 1)
        batch.n_tokens = n
        return outputs

    def _log_softmax(self, index: int) -> np.ndarray:
        """Log-probabilities of the batch row ``index``'s raw logits (before penalties and temperature)."""
        logits = self._logits(index).astype(np.float64)
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    def _record_logprobs(self, seq: GgufSequence, raw: np.ndarray, token: int) -> None:
        """Keep ``token``'s log-probability and the ``params.logprobs`` most likely alternatives."""
        k = min(seq.params.logprobs or 0, raw.shape[0])
        top: list[TopLogprob] = []
        if k:
            ids = np.argpartition(raw, -k)[-k:]
            ids = ids[np.argsort(raw[ids])[::-1]]
            top = [TopLogprob(token_id=int(i), token=self._model.decode([int(i)]), logprob=float(raw[i])) for i in ids]
        seq.pending_logprobs.append(TokenLogprob(token_id=token, token=self._model.decode([token]),
                                                 logprob=float(raw[token]), top=top))

    def _take_pending(self, seq: GgufSequence, text: str) -> Chunk:
        chunk = Chunk(text, seq.pending_ids, seq.pending_logprobs or None)
        seq.pending_ids, seq.pending_logprobs = [], []
        return chunk

    def _advance(self, seq: GgufSequence, token: int, events: list, raw: np.ndarray | None = None) -> None:
        """Turn one sampled token into events."""
        seq.last_token = token
        if self._model.is_end_of_generation(token):
            self._finish(seq, "stop", events)
            return
        seq.generated += 1
        seq.out_ids.append(token)
        seq.pending_ids.append(token)
        if raw is not None:
            self._record_logprobs(seq, raw, token)
        text = seq.stop.feed(seq.detok.push(token))
        if text:
            events.append((seq.request_id, self._take_pending(seq, text)))
        if seq.stop.stopped:
            self._finish(seq, "stop", events)
        elif seq.generated >= seq.max_new_tokens:
            self._finish(seq, "length", events)

    def _finish(self, seq: GgufSequence, reason: str, events: list) -> None:
        rest = seq.stop.flush() if not seq.stop.stopped else ""
        if rest or seq.pending_ids:
            events.append((seq.request_id, self._take_pending(seq, rest)))
        events.append((seq.request_id, Finished(reason, len(seq.prompt_ids), seq.generated, seq.reused)))
        seq.done = True

    def _release(self, seq: GgufSequence, keep: bool = True) -> None:
        """Free the sampler and return the sequence id; its KV cells stay for a later prefix match
        unless ``keep`` is false (after a failed decode their content is unknown)."""
        seq.done = True
        if seq.seq_id >= 0:
            if keep:
                self._cached[seq.seq_id] = (seq.adapter_path, (seq.prompt_ids + seq.out_ids)[:seq.n_past])
            else:
                llama_cpp.llama_memory_seq_rm(self._model.memory, seq.seq_id, -1, -1)
            self._free_ids.append(seq.seq_id)
            self._free_ids.sort(reverse=True)  # descending: the lowest free id is last
            seq.seq_id = -1
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
