"""The MLX engine: Apple silicon (Metal) through ``mlx_lm``, one request at a time in a model thread.

Written against mlx-lm's current API, checked in its sources (ml-explore/mlx-lm ``mlx_lm/__init__.py``,
``mlx_lm/generate.py``, ``mlx_lm/sample_utils.py``): ``mlx_lm.load(path) -> (model, tokenizer)``;
``mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=, sampler=, logits_processors=)``
yielding ``GenerationResponse(text, token, generation_tokens, finish_reason, ...)`` whose last item
has ``finish_reason`` ``"stop"`` (EOS: its ``token`` is the EOS, not output) or ``"length"``;
``make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k)`` (temp 0 = argmax) and
``make_logits_processors(logit_bias, repetition_penalty, repetition_context_size, presence_penalty,
presence_context_size, frequency_penalty, frequency_context_size)`` (presence/frequency since
mlx-lm 0.31.1, hence the ``>=0.31.1`` of the ``[mlx]`` extra); ``mx.random.seed``.

One request runs at a time (``slots`` is 1): mlx_lm's ``BatchGenerator`` exists but is not used
yet. Abort is checked between tokens: the generator is closed at the next token.

NOT RUN HERE: there is no Apple silicon on this repository's machines or CI, and ``mlx`` only
installs on macOS arm64. The pure parts (sampler/processor arguments, output translation) and
the lifecycle errors are tested in tests/engine/test_engine_gpu_backends.py against a test double.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest, SamplingParams
from services.engine.backend import EngineBackend, Finished, GenerationEvent, refuse_logprobs
from services.engine.backends.library import import_library
from services.engine.backends.model_thread import Failed
from services.engine.text.prompt import check_context, config_context_length, render_prompt
from services.engine.text.deltas import TextStream

log = logging.getLogger(__name__)

ENGINE = "mlx"
INSTALL = "pip install 'mlx-lm>=0.31.1' (macOS on Apple silicon only; or the [mlx] extra)"


def sampler_kwargs(params: SamplingParams) -> dict:
    """``mlx_lm.sample_utils.make_sampler`` arguments: temp 0 is argmax; top_p 1.0 and top_k 0 are off there too."""
    if params.temperature <= 0.0:
        return {"temp": 0.0}
    kwargs: dict = {"temp": params.temperature}
    if params.top_p < 1.0:
        kwargs["top_p"] = params.top_p
    if params.top_k > 0:
        kwargs["top_k"] = params.top_k
    return kwargs


def logits_processor_kwargs(params: SamplingParams, prompt_tokens: int) -> dict:
    """``make_logits_processors`` arguments; only non-neutral penalties, so older mlx_lm versions still accept them.

    mlx_lm's penalties look at the last ``*_context_size`` tokens (default 20). The OpenAI
    penalties mean the whole output, so their window is ``max_tokens``; the HF repetition penalty
    covers prompt and output, so its window is both.
    """
    kwargs: dict = {}
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
        kwargs["repetition_context_size"] = prompt_tokens + params.max_tokens
    if params.presence_penalty:
        kwargs["presence_penalty"] = params.presence_penalty
        kwargs["presence_context_size"] = params.max_tokens
    if params.frequency_penalty:
        kwargs["frequency_penalty"] = params.frequency_penalty
        kwargs["frequency_context_size"] = params.max_tokens
    return kwargs


class OutputTranslator:
    """``stream_generate`` responses of one request as our events (pure; fed in the model thread)."""

    def __init__(self, stops: Seq[str], prompt_tokens: int) -> None:
        self._stream = TextStream(stops)
        self._prompt_tokens = prompt_tokens
        self.generated = 0
        self.done = False

    def events(self, response) -> list[GenerationEvent]:
        """Events for one response; sets ``done`` after the ``Finished`` one."""
        reason = response.finish_reason
        # The final response of an EOS stop carries the EOS token, which is not output.
        is_output = reason != "stop"
        self.generated = response.generation_tokens - (0 if is_output else 1)
        out: list[GenerationEvent] = []
        chunk = self._stream.push(response.text, [response.token] if is_output else [])
        if chunk is not None:
            out.append(chunk)
        if self._stream.stopped:
            reason = "stop"
        if reason is None:
            return out
        tail = self._stream.finish()
        if tail is not None:
            out.append(tail)
        out.append(Finished("length" if reason == "length" else "stop", self._prompt_tokens, self.generated))
        self.done = True
        return out


@dataclass
class _Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    prompt_tokens: int
    deliver: object  # callable(list of events), thread-safe
    cancel: threading.Event = field(default_factory=threading.Event)


class MlxEngine(EngineBackend):
    """Serves one local MLX (or plain Hugging Face safetensors) model directory with mlx_lm."""

    name = ENGINE

    def __init__(self, *, model_path: str | Path, model_id: str, aliases: Seq[str] = (), slots: int = 1,
                 context_length: int = 0, **_unused) -> None:
        self._path = Path(model_path)
        self._model_id = model_id
        self._aliases = list(aliases)
        if slots != 1:
            log.info("the mlx engine runs one request at a time; --slots %d is served as 1", slots)
        self._context_length = context_length
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._current: _Job | None = None
        self._thread: threading.Thread | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: dict[str, _Job] = {}  # queued or running, by request id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mlx_lm = self._sample_utils = self._mx = None
        self.model = self.tokenizer = None

    @classmethod
    def from_config(cls, cfg) -> MlxEngine:
        """Build from the engine's ``EngineConfig``."""
        return cls(model_path=cfg.model_path, model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots,
                   context_length=cfg.context_length)

    # --- lifecycle ---
    async def start(self) -> None:
        """Import mlx_lm (a clear error if missing), then load the model in the model thread."""
        self._mlx_lm = import_library("mlx_lm", engine=ENGINE, install=INSTALL)
        self._sample_utils = import_library("mlx_lm.sample_utils", engine=ENGINE, install=INSTALL)
        self._mx = import_library("mlx.core", engine=ENGINE, install=INSTALL)
        if not (self._path / "config.json").exists():
            raise FileNotFoundError(f"no model at {self._path} (expected an MLX or Hugging Face model directory)")
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name="mlx-model", daemon=True)
        self._thread.start()
        await loaded
        self._context_length = self._context_length or config_context_length(self._path) or 4096
        log.info("mlx loaded %s from %s, context %d", self._model_id, self._path, self._context_length)

    async def close(self) -> None:
        """Stop the current request and the model thread."""
        if self._current is not None:
            self._current.cancel.set()
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self.model = None

    async def check_health(self) -> None:
        """The model thread must be alive."""
        if self._thread is None or not self._thread.is_alive() or self.model is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "the mlx model thread is not running")

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """One request at a time."""
        return 1

    @property
    def device(self) -> str:
        """Apple silicon's GPU through Metal."""
        return "metal"

    def served_models(self) -> list[ServedModel]:
        """The one model this engine holds."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    def memory_bytes(self) -> int:
        """Metal memory MLX holds (``mx.get_active_memory``; ``mx.metal.*`` in older MLX)."""
        getter = getattr(self._mx, "get_active_memory", None) or getattr(getattr(self._mx, "metal", None),
                                                                        "get_active_memory", None)
        return int(getter()) if getter is not None else super().memory_bytes()

    # --- generation ---
    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Queue ``request`` for the model thread and stream its events."""
        if self._thread is None or self.model is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        if request.adapter:
            raise BusError(ErrorCode.UNSUPPORTED, "the mlx engine does not serve adapters", param="adapter")
        refuse_logprobs(request, "mlx")
        rendered = render_prompt(self.tokenizer, request)
        check_context(len(rendered.ids), self._context_length)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request.id] = q
        job = _Job(request.id, rendered.ids, request.sampling,
                   min(request.sampling.max_tokens, self._context_length - len(rendered.ids)), rendered.billed,
                   deliver=lambda events, rid=request.id: self._loop.call_soon_threadsafe(self._dispatch, rid, events))
        self._pending[request.id] = job
        self._jobs.put(job)
        try:
            while True:
                event = await q.get()
                if isinstance(event, Failed):
                    raise BusError(event.code, event.message)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancel.set()  # a no-op when it finished; otherwise it stops at the next token
            self._queues.pop(request.id, None)
            self._pending.pop(request.id, None)

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` at its next token (or before it starts); its stream ends ``cancelled``."""
        q = self._queues.pop(request_id, None)
        job = self._pending.pop(request_id, None)
        if job is not None:
            job.cancel.set()  # the model thread skips it, or stops it at its next token
        if q is not None:
            q.put_nowait(Failed(ErrorCode.CANCELLED, "request aborted"))

    def _dispatch(self, request_id: str, events: list) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            for event in events:
                q.put_nowait(event)

    # --- the model thread ---
    def _run(self, loaded: asyncio.Future) -> None:
        try:
            self.model, self.tokenizer = self._mlx_lm.load(str(self._path))
        except (OSError, ValueError, RuntimeError) as exc:
            self._loop.call_soon_threadsafe(loaded.set_exception, exc)
            return
        self._loop.call_soon_threadsafe(loaded.set_result, None)
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                continue
            self._current = job
            try:
                self._generate(job)
            except Exception as exc:  # reported to the request, not hidden: the thread must keep serving
                log.exception("mlx generation failed for %s", job.request_id)
                job.deliver([Failed(ErrorCode.ENGINE_FAILED, f"mlx generation failed: {exc}")])
            finally:
                self._current = None

    def _generate(self, job: _Job) -> None:
        params = job.params
        if params.seed is not None:
            self._mx.random.seed(params.seed)
        translator = OutputTranslator(params.stop, job.prompt_tokens)
        responses = self._mlx_lm.stream_generate(
            self.model, self.tokenizer, job.prompt_ids, max_tokens=job.max_tokens,
            sampler=self._sample_utils.make_sampler(**sampler_kwargs(params)),
            logits_processors=self._sample_utils.make_logits_processors(
                **logits_processor_kwargs(params, len(job.prompt_ids))))
        try:
            for response in responses:
                if job.cancel.is_set():
                    return
                events = translator.events(response)
                if events:
                    job.deliver(events)
                if translator.done:
                    return
        finally:
            responses.close()
