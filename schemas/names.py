"""Every subject, stream, bucket and consumer name, built and validated in one place.

Version root is ``llm.v1``. Tokens that come from users or config (worker ids, request ids)
go through ``token()``, which rejects anything that is not a single safe subject token;
model ids like ``Qwen/Qwen2.5-7B`` never become subject tokens (use ``slug()``).
"""

from __future__ import annotations

import enum
import hashlib
import re

ROOT = "llm.v1"

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class Lane(enum.StrEnum):
    """Priority lanes of the inference queue, highest first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


LANES_BY_PRIORITY: tuple[Lane, ...] = (Lane.HIGH, Lane.NORMAL, Lane.LOW)


def token(value: str) -> str:
    """Return ``value`` if it is one safe subject token (letters, digits, ``_``, ``-``), else raise."""
    if not _TOKEN_RE.match(value):
        raise ValueError(f"not a valid subject token: {value!r} (allowed: letters, digits, '_' and '-', 1-128 chars)")
    return value


def slug(value: str) -> str:
    """Turn any string (a model id, a host name) into a stable, unique subject token."""
    base = _SLUG_BAD.sub("-", value).strip("-")[:48] or "x"
    if base == value:
        return base
    return f"{base}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def lane_for_priority(priority: int) -> Lane:
    """Map an integer priority (the seed's ``int32 priority``) to a lane: >0 high, 0 normal, <0 low."""
    if priority > 0:
        return Lane.HIGH
    if priority < 0:
        return Lane.LOW
    return Lane.NORMAL


# --- inference queue (JetStream) ---
INFER_STREAM = "LLM_INFER"
INFER_SUBMIT_ALL = f"{ROOT}.infer.submit.*"


def infer_submit(lane: Lane | str) -> str:
    """Subject of one lane of the inference queue: ``llm.v1.infer.submit.<lane>``."""
    return f"{ROOT}.infer.submit.{Lane(lane).value}"


def attempt_id(request_id: str, attempt: int) -> str:
    """The bus id of a request's ``attempt``-th re-publication after failover (attempt 0 is the id itself).

    Each attempt has its own id (its own reply subject, ``Nats-Msg-Id`` and cancel), so a lost engine
    that is only partitioned, not dead, cannot interleave its tokens with the new attempt's.
    """
    if attempt == 0:
        return request_id
    return token(f"{request_id[:120]}-r{attempt}")


def choice_id(request_id: str, index: int) -> str:
    """The bus id of choice ``index`` of a request the edge fans out into ``n`` requests (OpenAI ``n``).

    Each choice is an ordinary request with its own id, reply subject and cancel (and its own
    failover attempts, ``attempt_id`` of this id).
    """
    return token(f"{request_id[:110]}-c{index}")


def idempotency_msg_id(scoped_key: str, run: int) -> str:
    """``Nats-Msg-Id`` of the ``run``-th publication under an ``Idempotency-Key`` (already scoped + hashed)."""
    return f"idem-{scoped_key}" if run == 0 else f"idem-{scoped_key}-{run}"


def lane_of_subject(subject: str) -> Lane:
    """The lane a ``llm.v1.infer.submit.<lane>`` subject belongs to."""
    return Lane(subject.rsplit(".", 1)[-1])


def scheduler_durable(lane: Lane | str) -> str:
    """Durable pull consumer shared by all scheduler replicas for one lane."""
    return f"schedulers_{Lane(lane).value}"


# --- NATS-native producers' requests, held until the key's rate limits admit them (JetStream) ---
# A producer with an API key's NATS user may publish only under its own key id, so the subject
# names the key the server authenticated: the scheduler counts the request against that key's
# budget, then moves it into the inference queue (or answers a typed rate-limit error).
INFER_KEYED_STREAM = "LLM_INFER_KEYED"
INFER_KEYED_ALL = f"{ROOT}.infer.keyed.*.*"
KEYED_DURABLE = "schedulers_keyed"


def infer_keyed(key_id: str, lane: Lane | str) -> str:
    """Where API key ``key_id``'s NATS producer submits to ``lane``: ``llm.v1.infer.keyed.<key id>.<lane>``."""
    return f"{ROOT}.infer.keyed.{token(key_id)}.{Lane(lane).value}"


def keyed_parts(subject: str) -> tuple[str, Lane]:
    """The key id and lane of an ``infer_keyed`` subject; ``ValueError`` for any other subject."""
    parts = subject.split(".")
    if len(parts) != 6 or ".".join(parts[:4]) != f"{ROOT}.infer.keyed":
        raise ValueError(f"{subject!r} is not a keyed submit subject")
    return parts[4], Lane(parts[5])


# --- core subjects ---
INFER_CANCEL = f"{ROOT}.infer.cancel"
WORKER_STATUS_ALL = f"{ROOT}.workers.status.*"


def worker_status(worker: str) -> str:
    """Core subject where an engine publishes its heartbeat and capacity changes."""
    return f"{ROOT}.workers.status.{token(worker)}"


def engine_generate(worker: str) -> str:
    """Core request/reply subject: scheduler -> one engine."""
    return f"{ROOT}.engine.{token(worker)}.generate"


def engine_cancel(worker: str) -> str:
    """Core subject: withdraw one offer of a request from one engine (``CancelRequest`` with ``dispatch``)."""
    return f"{ROOT}.engine.{token(worker)}.cancel"


def engine_control(worker: str) -> str:
    """Core request/reply subject for model load/unload/list on one engine."""
    return f"{ROOT}.engine.{token(worker)}.control"


ENGINE_CONTROL_ALL = f"{ROOT}.engine.all.control"


def engine_any(verb: str) -> str:
    """One of an engine's subjects for every worker (``llm.v1.engine.*.<verb>``): what a caller of engines may address."""
    if verb not in ("generate", "cancel", "control"):
        raise ValueError(f"unknown engine subject {verb!r}")
    return f"{ROOT}.engine.*.{verb}"

REPLY_PREFIX = "_INBOX"


def identity_inbox(identity: str, instance: str | None = None) -> str:
    """The inbox root of one bus identity: ``_INBOX.<identity>`` (``.<instance>`` for per-instance ones).

    A service connects with this as nats-py's ``inbox_prefix``, so every reply it gets (requests,
    JetStream API answers and deliveries) lands under it, and its NATS user may subscribe to
    nothing else under ``_INBOX``: one identity never reads another's replies.
    """
    root = f"{REPLY_PREFIX}.{token(identity)}"
    return root if instance is None else f"{root}.{token(instance)}"


def reply_inbox(owner: str, request_id: str, root: str = REPLY_PREFIX) -> str:
    """A reply subject under an owner's wildcard inbox (``<root>.<owner>.<request>``; root ``_INBOX``)."""
    return f"{root}.{token(owner)}.{token(request_id)}"


def reply_inbox_all(owner: str, root: str = REPLY_PREFIX) -> str:
    """The wildcard an owner subscribes to once to receive every one of its replies."""
    return f"{root}.{token(owner)}.*"


# --- KV buckets / object store ---
WORKERS_BUCKET = "llm_workers"
PROMPT_CACHE_BUCKET = "llm_prompt_cache"
MODELS_BUCKET = "llm_models"
SCHEDULER_CONFIG_BUCKET = "llm_scheduler_config"
STRATEGY_KEY = "strategy"  # key in SCHEDULER_CONFIG_BUCKET: the active routing strategy, watched by every replica
ARTIFACTS_STORE = "llm_artifacts"
# Idempotency-Key records: scoped key hash -> IdempotencyRecord; TTL = LLM_INFER's duplicate window.
IDEMPOTENCY_BUCKET = "llm_idempotency"
# API keys: key id -> ApiKeyRecord (only the SHA-256 of the key is stored).
API_KEYS_BUCKET = "llm_api_keys"
# Stored /v1/responses responses: response id -> StoredResponse; each expires on its own (per-message TTL).
RESPONSES_BUCKET = "llm_responses"


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind KV ``bucket`` (JetStream's own naming: ``KV_<bucket>``)."""
    return f"KV_{bucket}"


def kv_subjects(bucket: str) -> str:
    """Every key's subject of KV ``bucket`` (``$KV.<bucket>.>``); a key's is this prefix plus the key."""
    return f"$KV.{bucket}.>"


def kv_key_subject(bucket: str, key: str) -> str:
    """The subject of one key of KV ``bucket`` (``$KV.<bucket>.<key>``)."""
    return f"$KV.{bucket}.{key}"


def obj_stream(bucket: str) -> str:
    """The JetStream stream behind object store ``bucket`` (JetStream's own naming: ``OBJ_<bucket>``)."""
    return f"OBJ_{bucket}"


def obj_subjects(bucket: str) -> tuple[str, str]:
    """The chunk and metadata subjects of object store ``bucket`` (``$O.<bucket>.C.>``, ``$O.<bucket>.M.>``)."""
    return f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"


# --- training ---
TRAIN_STREAM = "LLM_TRAIN"
TRAIN_SUBMIT = f"{ROOT}.train.submit"
TRAIN_EVENTS_STREAM = "LLM_TRAIN_EVENTS"
TRAIN_EVENTS_ALL = f"{ROOT}.train.job.*.event"  # every job's events: the subjects of TRAIN_EVENTS_STREAM
TRAIN_DURABLE = "trainers"
TRAIN_JOBS_BUCKET = "llm_train_jobs"
TRAIN_CANCEL = f"{ROOT}.train.cancel"  # core broadcast of TrainCancel


def train_job_events(job_id: str) -> str:
    """Subject of one training job's events."""
    return f"{ROOT}.train.job.{token(job_id)}.event"


# --- batches (``schemas.batch``): lines as durable low-lane work, progress in KV ---
BATCH_STREAM = "LLM_BATCH"
BATCH_START = f"{ROOT}.batch.start"
BATCH_LINES_ALL = f"{ROOT}.batch.line.*"
BATCH_ALL = f"{ROOT}.batch.>"  # the runners' consumer takes starts and lines alike
BATCH_DURABLE = "batch_runners"
BATCHES_BUCKET = "llm_batches"


def batch_lines(batch_id: str) -> str:
    """Subject of one batch's lines on ``LLM_BATCH``."""
    return f"{ROOT}.batch.line.{token(batch_id)}"


def batch_line_msg_id(batch_id: str, custom_id: str) -> str:
    """``Nats-Msg-Id`` of a batch line: from the batch id and its ``custom_id`` (any string, so digested)."""
    return f"{token(batch_id)}:{hashlib.sha256(custom_id.encode()).hexdigest()[:24]}"


def batch_request_id(batch_id: str, custom_id: str, delivery: int) -> str:
    """Bus id (and ``Nats-Msg-Id``) of a batch line's ``delivery``-th run.

    One delivery's publish retries share it, so JetStream stores the request once; a line
    redelivered after its runner died gets the next id (the dead runner's answer went to its inbox).
    """
    digest = hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:24]
    return token(f"bl-{digest}-d{int(delivery)}")


def batch_outcome_key(batch_id: str, outcome: str, index: int) -> str:
    """KV key in ``llm_batches`` of line ``index``'s outcome (``ok``, ``err`` or ``skip``)."""
    if outcome not in ("ok", "err", "skip"):
        raise ValueError(f"unknown batch line outcome {outcome!r}")
    return f"{token(batch_id)}.{outcome}.{int(index)}"


def batch_line_keys(batch_id: str, index: int) -> str:
    """Subject filter of every outcome key of one line (its create-only guard)."""
    return kv_key_subject(BATCHES_BUCKET, f"{token(batch_id)}.*.{int(index)}")


def batch_outcome_keys(batch_id: str, outcome: str = "*") -> str:
    """Subject filter of a batch's outcome keys of one kind (``*``: all)."""
    return kv_key_subject(BATCHES_BUCKET, f"{token(batch_id)}.{outcome}.*")


# --- rate limits (JetStream counter stream, shared by every edge replica) ---
RATE_STREAM = "LLM_RATE"
RATE_ALL = f"{ROOT}.rate.>"
# Every caller's token counters (engines charge a NATS-native request's tokens when it ends).
RATE_TOKENS_ALL = f"{ROOT}.rate.*.tokens.*"


def rate_counter(principal: str, kind: str, window: int) -> str:
    """Counter subject of one caller's usage of ``kind`` (requests, tokens, streams) in one time window.

    ``principal`` is any caller identity (an API key id, a JWT subject, an address); it is slugged.
    """
    if kind not in ("requests", "tokens", "streams"):
        raise ValueError(f"unknown rate counter kind {kind!r}")
    return f"{ROOT}.rate.{slug(principal)}.{kind}.{int(window)}"


# --- what infra provisions (infra/nats/jetstream.toml holds the settings, infra/provision.py applies) ---
# Provisioning takes every name below from here and refuses a definitions file that disagrees.

# Stream -> its subjects.
STREAMS: dict[str, tuple[str, ...]] = {
    INFER_STREAM: (INFER_SUBMIT_ALL,),
    TRAIN_STREAM: (TRAIN_SUBMIT,),
    TRAIN_EVENTS_STREAM: (TRAIN_EVENTS_ALL,),
    RATE_STREAM: (RATE_ALL,),
    INFER_KEYED_STREAM: (INFER_KEYED_ALL,),
    BATCH_STREAM: (BATCH_START, BATCH_LINES_ALL),
}
# Durable consumer -> (its stream, its filter subject).
DURABLES: dict[str, tuple[str, str]] = {
    **{scheduler_durable(lane): (INFER_STREAM, infer_submit(lane)) for lane in LANES_BY_PRIORITY},
    TRAIN_DURABLE: (TRAIN_STREAM, TRAIN_SUBMIT),
    KEYED_DURABLE: (INFER_KEYED_STREAM, INFER_KEYED_ALL),
    BATCH_DURABLE: (BATCH_STREAM, BATCH_ALL),
}
KV_BUCKETS: tuple[str, ...] = (WORKERS_BUCKET, PROMPT_CACHE_BUCKET, IDEMPOTENCY_BUCKET, SCHEDULER_CONFIG_BUCKET,
                               MODELS_BUCKET, TRAIN_JOBS_BUCKET, API_KEYS_BUCKET, RESPONSES_BUCKET, BATCHES_BUCKET)
OBJECT_STORES: tuple[str, ...] = (ARTIFACTS_STORE,)


# --- NATS micro service names ---
MICRO_EDGE = "cy-edge"
MICRO_SCHEDULER = "cy-scheduler"
MICRO_ENGINE = "cy-engine"
MICRO_TRAINER = "cy-trainer"
# The scheduler's status endpoint as nats.micro builds it: group name, then endpoint name.
SCHEDULER_STATUS = f"{MICRO_SCHEDULER}.status"
TRAINER_STATUS = f"{MICRO_TRAINER}.status"  # a trainer's status endpoint (job it runs, if any)
MICRO_ALL = "$SRV.>"  # nats.micro's discovery subjects ($SRV.PING|INFO|STATS[.<name>[.<id>]])
