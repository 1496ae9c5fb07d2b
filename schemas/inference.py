"""The inference request and the scheduler <-> engine dispatch messages."""

from __future__ import annotations

import msgspec


class ChatMessage(msgspec.Struct, omit_defaults=True):
    """One chat turn; ``content`` is plain text (multi-part content is flattened by the edge)."""

    role: str
    content: str
    name: str | None = None


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every parameter that changes the output. Defaults mirror OpenAI's.

    ``top_k == 0`` disables top-k; ``seed is None`` means a fresh random seed. ``logprobs`` asks
    for each generated token's log-probability plus that many most likely alternatives (0: the
    sampled token's alone); ``None`` (the default) asks for none. They are the model's raw
    log-probabilities (log-softmax of its logits, before temperature, penalties, top-k/top-p), as
    OpenAI and vLLM report them. The OpenAI ``n`` is fanned out by the edge into ``n`` requests
    with ``n == 1`` each, so engines always see 1 here.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    logprobs: int | None = None
    # OpenAI ``logit_bias``: added to the token's logit before sampling (-100 bans it, 100 forces it).
    logit_bias: dict[int, float] = {}


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the answer must match, enforced by constrained decoding in the engine (a token mask per step).

    ``kind`` says which one field holds the constraint: ``json_schema`` (``json``: the schema as
    compact JSON text, keys in the client's order, which is the order the answer's properties take), ``json_object`` (any JSON
    object; no other field), ``regex`` (``regex``), ``choice`` (``choice``: the answer is exactly
    one of these strings) or ``grammar`` (``grammar``: a Lark grammar in llguidance's syntax, as
    vLLM's ``structured_outputs.grammar`` takes it). The edge checks the JSON Schema subset; the
    engine compiles the constraint and answers ``invalid_request`` if it cannot.
    """

    kind: str
    json: str = ""
    regex: str = ""
    choice: list[str] = []
    grammar: str = ""


class InferenceRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request for generation, published to ``llm.v1.infer.submit.<lane>``.

    Exactly one of ``messages`` (chat) or ``prompt`` (completion) is set. Token events are
    published to ``reply_to`` (a core NATS subject the producer listens on). ``deadline`` is a
    Unix timestamp in seconds; past it the request is answered with a ``timeout`` error.
    """

    id: str
    model: str
    reply_to: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = True
    priority: int = 0
    deadline: float = 0.0
    created: float = 0.0
    adapter: str | None = None
    user: str | None = None
    # Prompt cache: ``cache`` False opts out; ``cache_key`` is set by the scheduler on a
    # cacheable miss, telling the engine to store the finished response under that key.
    cache: bool = True
    cache_key: str | None = None
    # Failover. ``attempt`` > 0 marks a re-publication by the producer after the engine
    # running the request was lost; its ``id`` is ``names.attempt_id(original, attempt)``.
    # ``continuation`` is the text already delivered to the client: the engine renders the prompt
    # (chat: with the generation prompt) followed by this text and continues from there, with
    # ``sampling.max_tokens`` already reduced to the remaining budget; its usage counts the
    # prompt without the continuation and only the new tokens.
    attempt: int = 0
    continuation: str = ""
    # Set by a scheduler only on a redelivered message: "are you running (or did you just finish)
    # this id?" An engine answers accepted=True if so and never starts the request.
    probe: bool = False
    # Which offer of this request to an engine this is (so a late accept is told apart): set by the scheduler,
    # 0 for the first offer of the first delivery and larger for every later one (another engine
    # after no answer, a redelivery), so a later offer always has a larger number. The engine echoes
    # it in every event; a producer follows only the largest it has seen, and the scheduler withdraws
    # an offer it gave up on by this number (``CancelRequest.dispatch`` on ``names.engine_cancel``).
    dispatch: int = 0
    # Who notices a dead engine. False (a NATS-native producer): the scheduler replica that
    # got the engine's accept remembers the request until its deadline and, if the engine misses three
    # heartbeats, sends a ``worker_lost`` StreamError to ``reply_to``. True: the producer follows the
    # engine's heartbeats itself (the edge sets it on every request it publishes, and migrates a
    # request whose engine died); the scheduler then sends no such error, which would pre-empt that.
    producer_watches: bool = False
    # Structured outputs (OpenAI ``response_format``, vLLM ``structured_outputs``): None is free text.
    structured: StructuredOutput | None = None
    # Whose rate budget the request's tokens are charged to when it ends (``LLM_RATE`` counters), set
    # only by the scheduler when it admits an API key's NATS-native request (whatever the producer
    # wrote is replaced). Empty: the submitter charges them itself (the edge does for HTTP requests).
    rate_caller: str = ""
    # The producer's reply socket (``services/common/reply_socket.py``): an engine on its host that can
    # open it sends the events there rather than to ``reply_to``. Set by the edge; a name, never a path.
    reply_socket: str = ""


class DispatchReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An engine's immediate answer to ``llm.v1.engine.<worker>.generate``.

    ``accepted`` true means the engine owns the request and will stream events to its
    ``reply_to``; it has already published the request's ``StreamStart`` there before answering.
    ``in_flight``/``slots`` and ``status_seq`` let the scheduler update its view of the engine
    without waiting for the next heartbeat.
    """

    accepted: bool
    worker: str
    in_flight: int = 0
    slots: int = 0
    status_seq: int = 0
    code: str | None = None
    message: str | None = None


class CancelRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Broadcast on ``llm.v1.infer.cancel``: stop request ``id`` wherever it is.

    ``reason`` is informational; the edge sends ``client_disconnected``, ``timeout``,
    ``worker_lost``, ``publish_timeout`` or ``edge_shutdown``.

    The same message on one engine's ``llm.v1.engine.<worker>.cancel`` withdraws only offer
    ``dispatch`` of the request from that engine: the scheduler gave up waiting for its answer
    (``dispatch_timeout``) or the producer follows another engine (``stray_dispatch``). The engine
    stops that run without a terminal event (the reply subject is another engine's now) and refuses
    that offer if it only reads it later.
    """

    id: str
    reason: str = "cancelled"
    dispatch: int = 0
