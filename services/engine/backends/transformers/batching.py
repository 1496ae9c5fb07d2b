"""Iteration-level (continuous) batching over a Hugging Face causal LM, in one model thread.

Every step decodes one token for every running sequence. Sequences are grouped by the PEFT
adapter they asked for (``None``: the base model); each group is its own ``RowBatch`` (KV
cache, mask, left-padded rows), and each step runs one forward per group with that group's
adapter alone active (``AdapterSlots.activate``). That is exact for every layer-modifying
PEFT method (LoRA, DoRA, IA3, LoHa, LoKr, VeRA, ...), unlike a mixed-adapter forward.
Adapters are loaded, evicted and switched only here, between forwards. Each sequence keeps
its own sampling parameters and RNG, so batching never changes what a seeded request samples.

A sequence with a structured-output constraint (``grammar.RowConstraint``) has the tokens its
grammar forbids masked out of its own row before sampling, after penalties and ``logit_bias``;
rows without one pay nothing for it.

A prompt that starts with one prefilled lately for the same adapter reuses that prefix's keys
and values (``prefix_cache.PrefixCache``, bounded in bytes) and prefills only the rest; the
reused count is reported as ``cached_tokens``.

A sequence that asked for ``logprobs`` gets, for every token, the log-softmax of the model's raw
logits at that step (before penalties, temperature, top-k/top-p: what OpenAI and vLLM report),
the sampled token's entry and the ``logprobs`` most likely alternatives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from schemas.errors import BusError, ErrorCode
from schemas.events import TokenLogprob, TopLogprob
from schemas.inference import SamplingParams
from services.engine.backend import Chunk, Finished
from services.engine.backends.model_thread import Failed, ModelThread
from services.engine.backends.transformers.adapter_slots import AdapterSlots
from services.engine.backends.transformers.prefix_cache import PrefixCache
from services.engine.text.detok import IncrementalDetokenizer, StopMatcher
from services.engine.backends.transformers.row_batch import RowBatch
from services.engine.sampling import Nucleus
from services.engine.backends.transformers.sampling import (apply_logit_bias, apply_penalties, sample_row,
                                                            token_logprobs)
from services.engine.grammar.constraint import RowConstraint

log = logging.getLogger(__name__)

# Most prompt tokens (padding included) prefilled in one forward pass.
PREFILL_TOKEN_BUDGET = 8192


@dataclass(eq=False)
class Sequence:
    """One request's state inside the batch; ``adapter`` (with its local ``adapter_path``) or the base model."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    draw: Nucleus | None  # its seeded temperature/top-p draw; None: greedy
    adapter: str | None = None
    adapter_path: Path | None = None
    counts: dict[int, int] = field(default_factory=dict)
    generated: int = 0
    last_token: int = -1
    pending_ids: list[int] = field(default_factory=list)
    done: bool = False
    # With ``params.logprobs`` set: one token's text (decoded alone), and the entries of ``pending_ids``.
    token_text: Callable[[int], str] = str
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: RowConstraint | None = None  # structured output: the grammar this row must follow
    cached: int = 0  # prompt tokens whose KV came from the prefix cache

    def take_pending(self, text: str) -> Chunk:
        """The chunk of ``text`` with the token ids (and log-probabilities) not sent yet."""
        chunk = Chunk(text, self.pending_ids, self.pending_logprobs or None)
        self.pending_ids, self.pending_logprobs = [], []
        return chunk

    def record_logprobs(self, logprobs: torch.Tensor, token: int) -> None:
        """Keep ``token``'s log-probability (and the top alternatives asked for) from the step's raw logits."""
        chosen, top = token_logprobs(logprobs, token, self.params.logprobs or 0)
        text = self.token_text
        self.pending_logprobs.append(TokenLogprob(
            token_id=token, token=text(token), logprob=chosen,
            top=[TopLogprob(token_id=i, token=text(i), logprob=lp) for i, lp in top]))


Delivery = Callable[[list[tuple[str, "Chunk | Finished | Failed"]]], None]
# Called from the model thread when the loaded adapters change: (loaded ids, total loads, total evictions).
AdapterListener = Callable[[list[str], int, int], None]


class BatchGenerator(ModelThread):
    """The model thread: admits sequences, runs batched decode steps, delivers events per step."""

    def __init__(self, model, eos_ids: set[int], device: torch.device, max_batch: int, deliver: Delivery, *,
                 max_adapters: int = 8, on_adapters: AdapterListener | None = None,
                 prefix_cache_bytes: int = 0, join_window: float = 0.0) -> None:
        super().__init__("cy-batch-generator", deliver, join_window)
        self._slots = AdapterSlots(model, max_adapters)
        # Off for models whose KV cannot be cut to a prefix (sliding-window or linear-attention layers).
        self.prefix = PrefixCache(prefix_cache_bytes if RowBatch.reusable(model) else 0)
        self._eos = eos_ids
        self._device = device
        self._max_batch = max_batch
        self._on_adapters = on_adapters
        self._batches: dict[str | None, RowBatch] = {}

    # --- the model thread ---
    def run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._collect(block=not self._running() and not self._waiting)
                events: list[tuple[str, Chunk | Finished | Failed]] = []
                try:
                    self._drop_aborted()
                    self._admit(events)
                    if events:  # first tokens go out before the next decode step
                        self._deliver(events)
                        events = []
                    started = time.perf_counter()
                    if self._running():
                        self._decode_step(events)
                except Exception as exc:  # a failed forward must fail its requests, not kill the engine
                    log.exception("batch step failed; failing %d sequences", self._running())
                    for seq in self._rows():
                        events.append((seq.request_id, Failed(ErrorCode.ENGINE_FAILED, f"generation failed: {exc}")))
                    self._batches = {}
                    started = time.perf_counter()
                if events:
                    self._hand_over(events, self._running(), time.perf_counter() - started)

    def _rows(self) -> Iterator[Sequence]:
        for batch in self._batches.values():
            yield from batch.rows

    def _running(self) -> int:
        return sum(len(b) for b in self._batches.values())

    def _prune(self) -> None:
        self._batches = {a: b for a, b in self._batches.items() if b}

    def _drop_aborted(self) -> None:
        aborted = self._take_aborted()
        if not aborted:
            return
        for batch in self._batches.values():
            for seq in batch.rows:
                if seq.request_id in aborted:
                    seq.done = True
            batch.compact()
        self._prune()

    def _admit(self, events: list) -> None:
        """Prefill admissible waiting sequences, one forward per adapter, and merge them into their batches."""
        room = self._max_batch - self._running()
        if not self._waiting or room <= 0:
            return
        before = self._slots.loaded
        picked = self._pick(room, events)
        if self._slots.loaded != before:
            for gone in set(before) - set(self._slots.loaded):
                self.prefix.drop_adapter(gone)
            if self._on_adapters is not None:
                self._on_adapters(self._slots.loaded, self._slots.loads, self._slots.evictions)
        for adapter, group in picked.items():
            batch = self._batches.setdefault(adapter, RowBatch(self._device))
            try:
                logits = self._prefill(batch, adapter, group)
            except Exception as exc:  # a failed prefill fails its own sequences only
                log.exception("prefill of %d sequences failed", len(group))
                events.extend((s.request_id, Failed(ErrorCode.ENGINE_FAILED, f"generation failed: {exc}"))
                              for s in group)
                continue
            for i, seq in enumerate(group):
                self._advance(seq, logits[i], events)
            batch.compact()
        self._prune()

    def _prefill(self, batch: RowBatch, adapter: str | None, group: list[Sequence]) -> torch.Tensor:
        """Prefill ``group`` with ``adapter`` active, reusing cached prompt prefixes and caching the new prompts."""
        hits = [self.prefix.lookup(adapter, s.prompt_ids) for s in group] if self.prefix.enabled else []
        keep = [self.prefix.enabled and not self.prefix.covers(adapter, s.prompt_ids) for s in group]
        with self._slots.activate(adapter):
            logits, kept = batch.prefill(self._slots.base, group, hits, keep)
        for seq, hit, layers in zip(group, hits or [None] * len(group), kept):
            seq.cached = hit.length if hit else 0
            if layers is not None:
                self.prefix.store(adapter, seq.prompt_ids, layers)
        return logits

    def _pick(self, room: int, events: list) -> dict[str | None, list[Sequence]]:
        """Waiting sequences to prefill now, by adapter, loading adapters as needed.

        An adapter that cannot be loaded until busy ones go idle blocks every later adapter
        request (so busy adapters drain and it is not starved); base-model requests still pass.
        """
        picked: dict[str | None, list[Sequence]] = {}
        longest: dict[str | None, int] = {}
        left: list[Sequence] = []
        blocked = False
        for seq in self._waiting:
            if room <= 0 or (blocked and seq.adapter is not None):
                left.append(seq)
                continue
            if seq.adapter is not None:
                busy = {a for a, b in self._batches.items() if b} | set(picked)
                try:
                    ready = self._slots.ensure(seq.adapter, seq.adapter_path, busy)
                except BusError as exc:
                    events.append((seq.request_id, Failed(exc.code, exc.message)))
                    continue
                if not ready:
                    blocked = True
                    left.append(seq)
                    continue
            group = picked.setdefault(seq.adapter, [])
            width = max(longest.get(seq.adapter, 0), len(seq.prompt_ids))
            if group and width * (len(group) + 1) > PREFILL_TOKEN_BUDGET:
                left.append(seq)
                continue
            longest[seq.adapter] = width
            group.append(seq)
            room -= 1
        self._waiting = left
        return picked

    def _decode_step(self, events: list) -> None:
        """One token for every running sequence: one forward per adapter batch, its adapter alone active."""
        for adapter, batch in list(self._batches.items()):
            if not batch:
                continue
            with self._slots.activate(adapter):
                logits = batch.decode(self._slots.base)
            for i, seq in enumerate(batch.rows):
                self._advance(seq, logits[i], events)
            batch.compact()
        self.steps += 1
        self._prune()

    def _advance(self, seq: Sequence, logits: torch.Tensor, events: list) -> None:
        """Sample one token for ``seq`` and turn it into events."""
        # Before the penalties, which change ``logits`` in place: the model's own distribution.
        raw = torch.log_softmax(logits, dim=-1) if seq.params.logprobs is not None else None
        logits = apply_penalties(logits, seq.params, seq.counts, None)
        if seq.params.logit_bias:
            logits = apply_logit_bias(logits, seq.params.logit_bias)
        if seq.constraint is not None:
            seq.constraint.mask_torch(logits)
            if seq.constraint.error:
                self._fail_constraint(seq, events)
                return
        token = sample_row(logits, seq.params, seq.draw)
        seq.last_token = token
        if seq.constraint is not None and token not in self._eos:
            seq.constraint.advance(token)
        if token in self._eos:
            self._finish(seq, "stop", events)
            return
        seq.generated += 1
        seq.counts[token] = seq.counts.get(token, 0) + 1
        seq.pending_ids.append(token)
        if raw is not None:
            seq.record_logprobs(raw, token)
        text = seq.stop.feed(seq.detok.push(token))
        if text:
            events.append((seq.request_id, seq.take_pending(text)))
        if seq.stop.stopped:
            self._finish(seq, "stop", events)
        elif seq.generated >= seq.max_new_tokens:
            self._finish(seq, "length", events)

    def _fail_constraint(self, seq: Sequence, events: list) -> None:
        """The grammar matcher hit one of its limits: the answer could not stay valid, so it fails, typed."""
        events.append((seq.request_id, Failed(ErrorCode.INVALID_REQUEST,
                                              f"structured output could not be continued: {seq.constraint.error}")))
        seq.done = True

    def _finish(self, seq: Sequence, reason: str, events: list) -> None:
        rest = seq.stop.flush() if not seq.stop.stopped else ""
        if rest or seq.pending_ids:
            events.append((seq.request_id, seq.take_pending(rest)))
        events.append((seq.request_id, Finished(reason, len(seq.prompt_ids), seq.generated, seq.cached)))
        seq.done = True
