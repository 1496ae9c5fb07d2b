"""A request's structured-output constraint compiled into an llguidance grammar, for one tokenizer.

The grammar text is what is cached (per constraint, least recently used first out, bounded in
bytes): a matcher is built from it per sequence, which is cheap because llguidance builds its
lexer lazily. A compile runs in a worker thread under a time limit and llguidance's own
resource limits (``LLParserLimits``), so a pathological schema costs its request an
``invalid_request`` error, never a stalled engine; a constraint that timed out is remembered
and refused at once the next time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import llguidance

from schemas.errors import BusError, ErrorCode
from schemas.inference import StructuredOutput
from services.engine.grammar.constraint import RowConstraint

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 16 << 20
DEFAULT_TIME_LIMIT = 10.0
# Compact JSON (no free whitespace): a sampled model cannot wander off into endless blanks.
_JSON_OPTIONS = {"whitespace_flexible": False}
_ANY_OBJECT = '{"type":"object"}'

# Told the seconds each compile took (set by the engine service to its metric).
_observer: Callable[[float], None] | None = None


def set_compile_observer(observe: Callable[[float], None] | None) -> None:
    """Report every compile's duration to ``observe`` (the engine's ``llm_engine_grammar_compile_seconds``)."""
    global _observer
    _observer = observe


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar of ``structured`` (not yet checked: see ``GrammarCompiler``)."""
    match structured.kind:
        case "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(structured.json, defaults=_JSON_OPTIONS)
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_OPTIONS)
        case "regex":
            return llguidance.LLMatcher.grammar_from_regex(structured.regex)
        case "choice":
            # Lark string literals take JSON's escapes: each choice is matched byte for byte.
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in structured.choice))
        case "grammar":
            return llguidance.LLMatcher.grammar_from_lark(structured.grammar)
    raise BusError(ErrorCode.UNSUPPORTED, f"structured output kind {structured.kind!r} is not supported",
                   param="response_format")


class GrammarCompiler:
    """Compiles constraints for one tokenizer; see the module docstring."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, n_vocab: int, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 time_limit: float = DEFAULT_TIME_LIMIT, limits: llguidance.LLParserLimits | None = None) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._bytes = 0
        self._cache_bytes = cache_bytes
        self._time_limit = time_limit
        self._limits = limits or llguidance.LLParserLimits(verbose_errors=False)
        self._too_slow: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[str]] = {}
        self.compiles = 0

    def _compile(self, structured: StructuredOutput) -> str:
        """Build and check the grammar (in a worker thread); ``invalid_request`` with llguidance's reason."""
        start = time.perf_counter()
        try:
            grammar = grammar_text(structured)
        except ValueError as exc:  # grammar_from_json_schema raises on a schema it cannot compile
            raise BusError(ErrorCode.INVALID_REQUEST, f"the {structured.kind} cannot be compiled: {exc}",
                           param="response_format") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise BusError(ErrorCode.INVALID_REQUEST,
                           f"the {structured.kind} cannot be compiled: {matcher.get_error()[:500]}",
                           param="response_format")
        self.compiles += 1
        if _observer is not None:
            _observer(time.perf_counter() - start)
        return grammar

    async def grammar(self, structured: StructuredOutput) -> str:
        """The checked grammar of ``structured``: from the cache, else compiled under the time limit."""
        key = structured_key(structured)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if key in self._too_slow:
            raise self._timeout_error()
        pending = self._pending.get(key)
        if pending is None:  # one compile per constraint, however many requests wait for it
            pending = asyncio.ensure_future(self._compile_in_time(key, structured))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _compile_in_time(self, key: bytes, structured: StructuredOutput) -> str:
        try:
            async with asyncio.timeout(self._time_limit):
                grammar = await asyncio.to_thread(self._compile, structured)
        except TimeoutError:
            # The worker thread finishes on its own (llguidance's limits bound it); the request is answered now.
            self._too_slow[key] = None
            while len(self._too_slow) > 256:
                self._too_slow.popitem(last=False)
            raise self._timeout_error() from None
        self._remember(key, grammar)
        return grammar

    def _timeout_error(self) -> BusError:
        return BusError(ErrorCode.INVALID_REQUEST, f"the structured-output constraint took longer than "
                        f"{self._time_limit:g} s to compile; simplify the schema", param="response_format")

    def _remember(self, key: bytes, grammar: str) -> None:
        size = len(key) + len(grammar)
        if size > self._cache_bytes:
            return
        self._cache[key] = grammar
        self._bytes += size
        while self._bytes > self._cache_bytes:
            old_key, old = self._cache.popitem(last=False)
            self._bytes -= len(old_key) + len(old)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the cache (keys and grammars)."""
        return self._bytes

    def constraint(self, grammar: str) -> RowConstraint:
        """A fresh matcher for one sequence (call from any thread; it is then used by the model thread)."""
        return RowConstraint(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits),
                             self.n_vocab)


def structured_key(structured: StructuredOutput) -> bytes:
    """The cache key of a constraint: its bytes (the edge wrote a schema as compact JSON)."""
    from schemas.events import encode

    return encode(structured)


class EngineGrammars:
    """One engine's compiler, built on the first constrained request (building the tokenizer takes about 1 s)."""

    def __init__(self, make_tokenizer: Callable[[], llguidance.LLTokenizer], n_vocab: int) -> None:
        self._make_tokenizer = make_tokenizer
        self._n_vocab = n_vocab
        self._compiler: GrammarCompiler | None = None
        self._lock = asyncio.Lock()

    async def compiler(self) -> GrammarCompiler:
        """The compiler, built once in a worker thread."""
        async with self._lock:
            if self._compiler is None:
                tokenizer = await asyncio.to_thread(self._make_tokenizer)
                self._compiler = GrammarCompiler(tokenizer, self._n_vocab)
        return self._compiler

    async def constraint(self, structured: StructuredOutput | None) -> RowConstraint | None:
        """A new sequence's constraint (None without one); ``invalid_request`` if it cannot be compiled."""
        if structured is None:
            return None
        compiler = await self.compiler()
        return compiler.constraint(await compiler.grammar(structured))
