"""The MindIE engine: Huawei Ascend NPUs through a running MindIE Server, as its streaming HTTP client.

Why a client and not an in-process library: MindIE-LLM's Python-level interfaces are not a
request API one can build on. ``mindie_llm.text_generator.Generator`` is a batch-step generator
that needs the caller's own scheduler and KV-block bookkeeping (see ``mindie_llm/examples/
run_generator.py``), and the ``llm_manager`` Python binding is a tensor-map/callback interface
wrapped only by a demo package (``tools/llm_manager_python_api_demo`` in Ascend/MindIE-LLM), not
by the installed ``mindie_llm`` package. The documented serving interface is MindIE Server's
EndPoint (``mindieservice_daemon``; ``docs/zh/user_guide/user_manual/service_APIs_usage_guidance.md``).
This backend therefore talks to that server, on the vLLM-compatible OpenAI endpoint
``POST /v1/completions`` with ``stream: true``, checked in its source
(``src/server/endpoint/single_req_infer_interface/single_req_vllm_openai_completions_infer_interface.cpp``,
``src/server/endpoint/utils/infer_param.cpp``):

- ``prompt`` may be a list of token ids, so we render the chat template ourselves (the same
  rendering as every other engine) and send ids;
- sampling: ``temperature`` (0 allowed = greedy), ``top_p`` in (0, 1], ``top_k`` > 0 (or -1),
  ``seed``, ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``, ``max_tokens``.
  Stop strings are NOT sent: a streamed delta cannot tell "the server trimmed a stop string" from
  "the text ended there", so our own matcher cuts them and closes the stream (which stops the
  request in the server), as the other engines do;
- each SSE event ``data: {...}`` carries ``choices[0].text`` (the delta) and, on the last one,
  ``finish_reason`` (``length`` or ``stop``) and ``usage``; then ``data: [DONE]``;
- a closed client connection stops the request in the server (its ``ThreadPoolMonitor`` calls
  ``StopInferRequest``), so abort is closing our stream;
- ``GET /health`` answers 200 while the server serves; ``GET /v1/models`` lists the model name
  the ``model`` field must carry.

NOT RUN HERE: there is no Ascend NPU nor MindIE Server on this repository's machines or CI. The
pure parts (request body, SSE parsing, output translation, error mapping) and the lifecycle
errors are tested in tests/engine/test_engine_gpu_backends.py; the HTTP exchange itself is not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence as Seq
from pathlib import Path

import aiohttp

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest, SamplingParams
from services.engine.backend import EngineBackend, Finished, GenerationEvent, refuse_logprobs
from services.engine.backends.library import import_library
from services.engine.text.prompt import check_context, config_context_length, render_prompt
from services.engine.text.deltas import TextStream

log = logging.getLogger(__name__)

ENGINE = "mindie"
DEFAULT_URL = "http://127.0.0.1:1025"  # MindIE Server's default ServerConfig port
SERVER_HINT = ("install MindIE (CANN + MindIE-LLM; docs/engines.md) and start its server with "
               "`mindieservice_daemon` (or `python -m mindie_llm.server.main`), then pass its address as --mindie-url")
DONE = object()  # the SSE stream's ``data: [DONE]``


def completion_body(model: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int, *,
                    rng: random.Random | None = None) -> dict:
    """The ``/v1/completions`` JSON body for a rendered prompt and our ``SamplingParams``.

    Values MindIE rejects as "off" (``top_p`` 1.0 is allowed but ``top_k`` 0 is not) are omitted
    when neutral; our "no seed" is a fresh random seed in MindIE's range [0, 2^63). Stop strings
    are applied here, not by the server (see the module docstring).
    """
    body: dict = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "stream": True,
                  "temperature": max(params.temperature, 0.0),
                  "seed": params.seed if params.seed is not None else (rng or random).getrandbits(63)}
    if params.temperature > 0.0:
        if params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.top_k > 0:
            body["top_k"] = params.top_k
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    return body


def parse_sse_line(line: bytes):
    """One line of the server's SSE stream: a decoded ``data:`` payload, ``DONE``, or None (blank/comment)."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        return json.loads(data)
    except ValueError:
        raise BusError(ErrorCode.ENGINE_FAILED, f"MindIE sent a malformed stream event: {data[:200]!r}") from None


def chunk_events(payload: dict, stream: TextStream, prompt_tokens: int) -> list[GenerationEvent]:
    """One decoded stream event as our events: the text delta, and ``Finished`` on the last one.

    Usage is the server's when it sends it (its last event); when our stop matcher ends the
    request first, the completion tokens are the decode steps streamed so far.
    """
    if "error" in payload:
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise BusError(ErrorCode.ENGINE_FAILED, f"MindIE failed the request: {message}")
    choices = payload.get("choices") or [{}]
    choice = choices[0]
    events: list[GenerationEvent] = []
    ids = choice.get("token_ids") or ()
    # MindIE streams one event per decode step and no ids: without speculative decoding, one token.
    chunk = stream.push(choice.get("text") or "", ids, tokens=len(ids) or 1)
    if chunk is not None:
        events.append(chunk)
    reason = "stop" if stream.stopped else choice.get("finish_reason")
    if reason is None:
        return events
    tail = stream.finish()
    if tail is not None:
        events.append(tail)
    usage = payload.get("usage") or {}
    completion = int(usage.get("completion_tokens", stream.tokens))
    events.append(Finished("length" if reason == "length" else "stop", prompt_tokens, completion))
    return events


def map_http_error(status: int, text: str) -> BusError:
    """A non-200 answer of MindIE Server as a typed error."""
    detail = text.strip()[:500]
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            inner = body.get("error", body)
            detail = str(inner.get("message", inner) if isinstance(inner, dict) else inner)[:500]
    except ValueError:
        pass
    lowered = detail.lower()
    if status in (400, 413, 422) and ("length" in lowered or "exceed" in lowered or "too long" in lowered):
        return BusError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"MindIE refused the prompt: {detail}", param="messages")
    if status in (400, 422):
        return BusError(ErrorCode.INVALID_REQUEST, f"MindIE refused the request: {detail}")
    if status == 404:
        return BusError(ErrorCode.MODEL_NOT_FOUND, f"MindIE does not serve this model: {detail}", param="model")
    if status in (429, 503):
        return BusError(ErrorCode.ENGINE_BUSY, f"MindIE is busy ({status}): {detail}")
    return BusError(ErrorCode.ENGINE_FAILED, f"MindIE answered {status}: {detail}")


def pick_served_model(models: dict, wanted: str) -> str:
    """The model name to send: ``wanted`` if MindIE lists it, else the only model it serves."""
    ids = [m.get("id") for m in models.get("data") or [] if isinstance(m, dict) and m.get("id")]
    if wanted in ids:
        return wanted
    if len(ids) == 1:
        return ids[0]
    raise RuntimeError(f"MindIE serves {ids or 'no models'}; none is {wanted!r} (give --model-id the name in "
                       "MindIE's config.json ModelDeployConfig.ModelConfig.modelName)")


class MindIEEngine(EngineBackend):
    """Serves the model a MindIE Server has loaded, as a streaming client of its HTTP endpoint."""

    name = ENGINE

    def __init__(self, *, model_path: str | Path, model_id: str, aliases: Seq[str] = (), slots: int = 8,
                 url: str = DEFAULT_URL, context_length: int = 0, device: str = "npu", **_unused) -> None:
        self._path = Path(model_path) if model_path else None
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._url = url.rstrip("/")
        self._context_length = context_length
        self._device = "npu" if device == "auto" else device
        self._served_name = model_id
        self._session: aiohttp.ClientSession | None = None
        self._responses: dict[str, aiohttp.ClientResponse] = {}
        self._aborted: set[str] = set()
        self.tokenizer = None

    @classmethod
    def from_config(cls, cfg) -> MindIEEngine:
        """Build from the engine's ``EngineConfig``."""
        return cls(model_path=cfg.model_path, model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots,
                   url=cfg.mindie_url, context_length=cfg.context_length, device=cfg.device)

    # --- lifecycle ---
    async def start(self) -> None:
        """Load the tokenizer, reach the server (a clear error if it is not there) and learn its model name."""
        if self._path is None or not (self._path / "config.json").exists():
            raise FileNotFoundError(f"no model at {self._path} (give --model-path the Hugging Face directory MindIE "
                                    "loaded: its tokenizer renders prompts here)")
        transformers = import_library("transformers", engine=ENGINE, install="pip install transformers")
        self.tokenizer = await asyncio.to_thread(transformers.AutoTokenizer.from_pretrained, self._path)
        self._context_length = self._context_length or config_context_length(self._path) or 2048
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            async with self._session.get(f"{self._url}/v1/models") as resp:
                if resp.status != 200:
                    raise RuntimeError(f"MindIE Server at {self._url} answered {resp.status} to /v1/models")
                self._served_name = pick_served_model(await resp.json(content_type=None), self._model_id)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await self._session.close()
            self._session = None
            raise RuntimeError(f"cannot reach the MindIE Server at {self._url} ({exc}); {SERVER_HINT}") from exc
        log.info("MindIE Server at %s serves %s as %s, context %d", self._url, self._model_id, self._served_name,
                 self._context_length)

    async def close(self) -> None:
        """Close every stream (which stops those requests in the server) and the HTTP session."""
        for resp in list(self._responses.values()):
            resp.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_health(self) -> None:
        """MindIE Server's ``/health`` must answer 200."""
        if self._session is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "the MindIE engine is not started")
        try:
            async with self._session.get(f"{self._url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    raise BusError(ErrorCode.ENGINE_FAILED, f"MindIE Server health answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BusError(ErrorCode.ENGINE_FAILED, f"MindIE Server at {self._url} unreachable: {exc}") from None

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """As configured (set it to MindIE's ``maxBatchSize``)."""
        return self._slots

    @property
    def device(self) -> str:
        """``npu``: the Ascend devices are MindIE's (its ``npuDeviceIds``)."""
        return self._device

    def served_models(self) -> list[ServedModel]:
        """The one model the server holds, under our model id."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    def memory_bytes(self) -> int:
        """Unknown from a client: the NPU memory belongs to the server process."""
        return 0

    # --- generation ---
    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream ``request`` from ``/v1/completions``; closing the stream early stops it in the server."""
        if self._session is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        if request.adapter:
            raise BusError(ErrorCode.UNSUPPORTED, "the mindie engine does not serve adapters", param="adapter")
        refuse_logprobs(request, "mindie")
        rendered = render_prompt(self.tokenizer, request)
        check_context(len(rendered.ids), self._context_length)
        max_tokens = min(request.sampling.max_tokens, self._context_length - len(rendered.ids))
        body = completion_body(self._served_name, rendered.ids, request.sampling, max_tokens)
        stream = TextStream(request.sampling.stop)
        try:
            async with self._session.post(f"{self._url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise map_http_error(resp.status, await resp.text())
                self._responses[request.id] = resp
                async for line in resp.content:
                    payload = parse_sse_line(line)
                    if payload is None:
                        continue
                    if payload is DONE:
                        break
                    for event in chunk_events(payload, stream, rendered.billed):
                        if isinstance(event, Finished) and stream.stopped:
                            resp.close()  # our stop string: closing ends the request in the server
                        yield event
                        if isinstance(event, Finished):
                            return
            if request.id in self._aborted:  # closing the response may end the stream quietly
                raise BusError(ErrorCode.CANCELLED, "request aborted")
            raise BusError(ErrorCode.ENGINE_FAILED, "MindIE ended the stream without a finish reason")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if request.id in self._aborted:
                raise BusError(ErrorCode.CANCELLED, "request aborted") from None
            raise BusError(ErrorCode.ENGINE_FAILED, f"MindIE stream failed: {exc}") from None
        finally:
            self._responses.pop(request.id, None)
            self._aborted.discard(request.id)

    async def abort(self, request_id: str) -> None:
        """Close the request's stream: MindIE stops a request whose client went away."""
        resp = self._responses.get(request_id)
        if resp is not None:
            self._aborted.add(request_id)
            resp.close()
