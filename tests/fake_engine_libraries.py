"""TEST DOUBLES of engine libraries this machine cannot run (tensorrt_llm, mlx_lm) and of MindIE Server.

They exist only to drive OUR backend code paths (argument mapping, output translation, abort,
lifecycle) in tests/engine/test_engine_gpu_backends.py. They mimic the shapes those libraries' current
sources document (cited in each backend's docstring) and nothing more: a test passing against
them says nothing about the real library. Each is injected through ``sys.modules`` (or, for
MindIE, served on a loopback port) by the test that uses it, never by default.
"""

from __future__ import annotations

import asyncio
import json
import types
from dataclasses import dataclass, field

from aiohttp import web


# --- tensorrt_llm double ------------------------------------------------------------------------

@dataclass
class FakeCompletionOutput:
    """Shape of ``tensorrt_llm.executor.result.CompletionOutput`` in streaming mode."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _last_text_len: int = 0
    _last_token_ids_len: int = 0

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len:]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]


class FakeRequestOutput:
    """Async-iterable like ``RequestOutput``: one step per scripted token, then the finish reason."""

    def __init__(self, tokenizer, prompt_ids, params, script: list[int], finish: str, step_delay: float) -> None:
        self.prompt_token_ids = prompt_ids
        self.sampling_params = params
        self._tokenizer = tokenizer
        self._script = script
        self._finish = finish
        self._delay = step_delay
        self._step = 0
        self.outputs = [FakeCompletionOutput()]
        self.finished = False
        self.aborted_calls = 0

    def abort(self) -> None:
        self.aborted_calls += 1

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(self._delay)
        out = self.outputs[0]
        out._last_text_len, out._last_token_ids_len = len(out.text), len(out.token_ids)
        if self.aborted_calls:
            out.finish_reason, self.finished = "cancelled", True
            return self
        max_tokens = self.sampling_params.kwargs["max_tokens"]
        out.token_ids.append(self._script[self._step % len(self._script)])
        self._step += 1
        out.text = self._tokenizer.decode(out.token_ids, skip_special_tokens=True)
        if self._step >= max_tokens:
            out.finish_reason, self.finished = "length", True
        elif self._step >= len(self._script):
            out.finish_reason, self.finished = self._finish, True
        return self


class FakeSamplingParams:
    """Records the keyword arguments our backend passes to ``tensorrt_llm.SamplingParams``."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class FakeExecutor:
    def __init__(self) -> None:
        self.shut = False

    def is_shutdown(self) -> bool:
        return self.shut


class FakeLLM:
    """``tensorrt_llm.LLM`` double: records its arguments and every ``generate_async`` call."""

    instances: list[FakeLLM] = []
    script: list[int] = []
    finish = "stop"
    step_delay = 0.0

    def __init__(self, **kwargs) -> None:
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        self.args = types.SimpleNamespace(max_seq_len=kwargs.get("max_seq_len", 1024))
        self._executor = FakeExecutor()
        self.calls: list[dict] = []
        self.results: list[FakeRequestOutput] = []
        FakeLLM.instances.append(self)

    def generate_async(self, inputs, sampling_params=None, lora_request=None, streaming=False, **_):
        self.calls.append({"inputs": inputs, "sampling_params": sampling_params, "lora_request": lora_request,
                           "streaming": streaming})
        result = FakeRequestOutput(self.tokenizer, inputs, sampling_params, self.script, self.finish,
                                   self.step_delay)
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self._executor.shut = True


def fake_tensorrt_llm_modules() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries standing in for tensorrt_llm (monkeypatch them in, they are removed after)."""
    root = types.ModuleType("tensorrt_llm")
    root.LLM = FakeLLM
    root.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    return {"tensorrt_llm": root}


# --- mlx_lm double ------------------------------------------------------------------------------

@dataclass
class FakeGenerationResponse:
    """Shape of ``mlx_lm.generate.GenerationResponse`` (the fields our backend reads)."""

    text: str
    token: int
    generation_tokens: int
    finish_reason: str | None = None


class FakeMlx:
    """State shared by the mlx_lm and mlx.core doubles: what was called, and the scripted output."""

    def __init__(self, tokenizer, script: list[int], eos: int, step_delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.eos = eos
        self.step_delay = step_delay
        self.seeds: list[int] = []
        self.sampler_calls: list[dict] = []
        self.processor_calls: list[dict] = []
        self.generate_calls: list[dict] = []
        self.closed = 0
        self.running = 0
        self.max_running = 0

    def stream_generate(self, model, tokenizer, prompt, max_tokens=256, **kwargs):
        """Like mlx_lm's: a response per token; the last has finish_reason, and an EOS stop carries the EOS."""
        import time

        self.generate_calls.append({"prompt": list(prompt), "max_tokens": max_tokens, **kwargs})
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        ids: list[int] = []
        try:
            for n in range(max_tokens):
                time.sleep(self.step_delay)
                token = self.script[n] if n < len(self.script) else self.eos
                before = self.tokenizer.decode(ids)
                if token == self.eos:
                    yield FakeGenerationResponse("", token, n + 1, "stop")
                    return
                ids.append(token)
                text = self.tokenizer.decode(ids)[len(before):]
                last = n + 1 == max_tokens
                yield FakeGenerationResponse(text, token, n + 1, "length" if last else None)
        finally:
            self.running -= 1
            self.closed += 1

    def modules(self) -> dict[str, types.ModuleType]:
        """``sys.modules`` entries standing in for mlx_lm, mlx_lm.sample_utils, mlx and mlx.core."""
        mlx_lm = types.ModuleType("mlx_lm")
        mlx_lm.load = lambda path: (object(), self.tokenizer)
        mlx_lm.stream_generate = self.stream_generate
        sample_utils = types.ModuleType("mlx_lm.sample_utils")
        sample_utils.make_sampler = lambda **kw: self.sampler_calls.append(kw) or ("sampler", kw)
        sample_utils.make_logits_processors = lambda **kw: self.processor_calls.append(kw) or []
        mlx_lm.sample_utils = sample_utils
        mlx = types.ModuleType("mlx")
        core = types.ModuleType("mlx.core")
        core.random = types.SimpleNamespace(seed=self.seeds.append)
        core.get_active_memory = lambda: 12345
        mlx.core = core
        return {"mlx_lm": mlx_lm, "mlx_lm.sample_utils": sample_utils, "mlx": mlx, "mlx.core": core}


# --- MindIE Server double -----------------------------------------------------------------------

class FakeMindIEServer:
    """A loopback HTTP server answering like MindIE Server's ``/v1/models``, ``/health``, ``/v1/completions``.

    ``/v1/completions`` streams one SSE event per scripted text piece, the last with
    ``finish_reason`` and ``usage``, then ``data: [DONE]``; it records request bodies and whether
    the client went away before the end.
    """

    def __init__(self, model: str, pieces: list[str], *, finish: str = "stop", step_delay: float = 0.0,
                 status: int = 200, error_body: str = "") -> None:
        self.model = model
        self.pieces = pieces
        self.finish = finish
        self.step_delay = step_delay
        self.status = status
        self.error_body = error_body
        self.bodies: list[dict] = []
        self.disconnects = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeMindIEServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return web.Response(status=self.status, text=self.error_body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self.pieces):
                await asyncio.sleep(self.step_delay)
                last = i + 1 == len(self.pieces)
                event = {"id": "1", "object": "text_completion", "model": self.model,
                         "choices": [{"index": 0, "text": piece, "stop_reason": None,
                                      "finish_reason": self.finish if last else None}]}
                if last:
                    n = len(self.pieces)
                    event["usage"] = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                      "total_tokens": len(body["prompt"]) + n}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp

