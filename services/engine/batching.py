"""Iteration-level (continuous) batching over a Hugging Face causal LM, in one model thread.

Every step decodes one token for every active sequence in a single forward pass. A new
sequence is prefilled on its own and then merged into the batch's KV cache, left-padded to
a common length (the padding is masked out and positions are per row); finished or aborted
sequences are dropped from the batch between steps. Each sequence keeps its own sampling
parameters and RNG, so batching never changes what a seeded request samples from.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from schemas.errors import ErrorCode
from schemas.inference import SamplingParams
from services.engine.adapter import Chunk, Finished
from services.engine.detok import IncrementalDetokenizer, StopMatcher
from services.engine.sampling import apply_penalties, sample_row

log = logging.getLogger(__name__)

# Most prompt tokens (padding included) prefilled in one forward pass.
PREFILL_TOKEN_BUDGET = 8192


@dataclass(slots=True)
class Failed:
    """A sequence could not be generated (the forward pass raised)."""

    code: str
    message: str


@dataclass(eq=False)
class Sequence:
    """One request's state inside the batch."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator
    counts: dict[int, int] = field(default_factory=dict)
    generated: int = 0
    last_token: int = -1
    pending_ids: list[int] = field(default_factory=list)
    done: bool = False


Delivery = Callable[[list[tuple[str, "Chunk | Finished | Failed"]]], None]


class BatchGenerator(threading.Thread):
    """The model thread: admits sequences, runs batched decode steps, delivers events per step."""

    def __init__(self, model, eos_ids: set[int], device: torch.device, max_batch: int, deliver: Delivery) -> None:
        super().__init__(name="cy-batch-generator", daemon=True)
        self._model = model
        self._eos = eos_ids
        self._device = device
        self._max_batch = max_batch
        self._deliver = deliver
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._active: list[Sequence] = []
        self._waiting: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._stopping = False
        self.steps = 0

    # --- called from the event loop ---
    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` for admission at the next step."""
        self._inbox.put(seq)

    def abort(self, request_id: str) -> None:
        """Drop ``request_id`` at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def stop(self) -> None:
        """Ask the thread to exit after the current step."""
        self._stopping = True
        self._inbox.put(None)

    # --- the model thread ---
    def run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._collect(block=not self._active and not self._waiting)
                events: list[tuple[str, Chunk | Finished | Failed]] = []
                try:
                    self._drop_aborted()
                    self._admit(events)
                    if events:  # first tokens go out before the next decode step
                        self._deliver(events)
                        events = []
                    if self._active:
                        self._decode_step(events)
                except Exception as exc:  # a failed forward must fail its requests, not kill the engine
                    log.exception("batch step failed; failing %d sequences", len(self._active))
                    for seq in self._active:
                        events.append((seq.request_id, Failed(ErrorCode.ENGINE_FAILED, f"generation failed: {exc}")))
                    self._active, self._cache, self._mask = [], None, None
                if events:
                    self._deliver(events)

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            aborted, self._aborted = self._aborted, set()
        self._waiting = [s for s in self._waiting if s.request_id not in aborted]
        for seq in self._active:
            if seq.request_id in aborted:
                seq.done = True
        self._compact()

    def _admit(self, events: list) -> None:
        """Prefill waiting sequences together (left-padded) and merge them into the batch."""
        room = self._max_batch - len(self._active)
        if not self._waiting or room <= 0:
            return
        group: list[Sequence] = []
        longest = 0
        for seq in self._waiting[:room]:
            longest = max(longest, len(seq.prompt_ids))
            if group and longest * (len(group) + 1) > PREFILL_TOKEN_BUDGET:
                break
            group.append(seq)
        self._waiting = self._waiting[len(group):]
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.tensor([[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in group], device=self._device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in group],
                            device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        self._merge(cache, mask)
        self._active.extend(group)
        logits = out.logits[:, -1, :].float()
        for i, seq in enumerate(group):
            self._advance(seq, logits[i], events)
        self._compact()

    def _decode_step(self, events: list) -> None:
        batch = len(self._active)
        input_ids = torch.tensor([[s.last_token] for s in self._active], device=self._device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        out = self._model(input_ids=input_ids, attention_mask=self._mask, position_ids=positions,
                          past_key_values=self._cache, use_cache=True)
        logits = out.logits[:, -1, :].float()
        for i, seq in enumerate(self._active):
            self._advance(seq, logits[i], events)
        self.steps += 1
        self._compact()

    def _advance(self, seq: Sequence, logits: torch.Tensor, events: list) -> None:
        """Sample one token for ``seq`` and turn it into events."""
        logits = apply_penalties(logits, seq.params, seq.counts, None)
        token = sample_row(logits, seq.params, seq.generator)
        seq.last_token = token
        if token in self._eos:
            self._finish(seq, "stop", events)
            return
        seq.generated += 1
        seq.counts[token] = seq.counts.get(token, 0) + 1
        seq.pending_ids.append(token)
        text = seq.stop.feed(seq.detok.push(token))
        if text:
            events.append((seq.request_id, Chunk(text, seq.pending_ids)))
            seq.pending_ids = []
        if seq.stop.stopped:
            self._finish(seq, "stop", events)
        elif seq.generated >= seq.max_new_tokens:
            self._finish(seq, "length", events)

    def _finish(self, seq: Sequence, reason: str, events: list) -> None:
        rest = seq.stop.flush() if not seq.stop.stopped else ""
        if rest or seq.pending_ids:
            events.append((seq.request_id, Chunk(rest, seq.pending_ids)))
        events.append((seq.request_id, Finished(reason, len(seq.prompt_ids), seq.generated)))
        seq.done = True

    # --- KV cache bookkeeping ---
    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch, left-padding both sides to a common length."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        have, new = self._mask.shape[1], mask.shape[1]
        width = max(have, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width - have), _left_pad(theirs.keys, width - new)])
            mine.values = torch.cat([_left_pad(mine.values, width - have), _left_pad(theirs.values, width - new)])
        self._mask = torch.cat([F.pad(self._mask, (width - have, 0)), F.pad(mask, (width - new, 0))])

    def _compact(self) -> None:
        """Drop finished rows from the batch and trim columns that are padding in every row."""
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, device=self._device)
        mask = self._mask.index_select(0, idx)
        first = int(torch.nonzero(mask.sum(dim=0))[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self._mask = mask[:, first:]


def _left_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, time, dim]`` tensor along time."""
    return F.pad(x, (0, 0, pad, 0)) if pad else x
