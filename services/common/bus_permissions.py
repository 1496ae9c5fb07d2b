"""Least-privilege NATS permissions of every bus identity, derived from ``schemas.names``.

Each service kind connects as its own NATS user (edge, scheduler, one user per engine worker,
trainer, the operator CLI, and a local NATS-native producer); this module says what each may
publish and subscribe to, and nothing here does I/O. The server config (``bus_auth``) and
``./cy nats permissions`` both render these sets, so what operators review is what is enforced.

The rules behind the sets:
- every identity subscribes only under its own inbox root (``names.identity_inbox``), which it
  also uses as nats-py's ``inbox_prefix``: its request replies, JetStream answers and push
  deliveries arrive there, and it cannot read anyone else's replies or token streams;
- publishing to ``_INBOX.>`` is given only to those that answer requests carrying a reply
  subject in their body (engines stream tokens, the scheduler sends typed errors); the others
  answer nats.micro discovery with ``allow_responses``;
- JetStream access is granted per stream: reading a stream means its ``STREAM.INFO``, message
  gets and consumers; consuming a work queue means only its durable's ``MSG.NEXT``/``INFO`` and
  acks; nobody but the operator may create, change, purge or delete a stream (writing an object
  store needs ``STREAM.PURGE`` of its own stream only: a replaced or deleted object's chunks go).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas import names

JS_API = "$JS.API"
# Where JetStream sends acks and flow-control answers: one subject tree per stream.
JS_ACK = "$JS.ACK"
JS_FC = "$JS.FC"
JS_SNAPSHOT = "$JS.SNAPSHOT.>"  # stream snapshot chunk acks and restore uploads (./cy backup, ./cy restore)

EDGE = "edge"
SCHEDULER = "scheduler"
ENGINE = "engine"
TRAINER = "trainer"
OPERATOR = "operator"
PRODUCER = "producer"
SITE = "site"  # a site's leaf node connection to the hub (``leaf_site``)
SERVICE_IDENTITIES = (EDGE, SCHEDULER, TRAINER, OPERATOR, PRODUCER)  # engines are per worker


@dataclass(frozen=True)
class Permissions:
    """What one NATS user may do: subjects to publish and subscribe to, and its inbox root."""

    identity: str
    inbox: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    description: str = field(default="", compare=False)

    def as_config(self) -> dict:
        """The ``permissions`` map of a nats-server user entry."""
        out: dict = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


def _unique(*groups: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Subjects in first-seen order, each once."""
    return tuple(dict.fromkeys(s for group in groups for s in group))


def _stream_info(stream: str) -> tuple[str, ...]:
    return (f"{JS_API}.STREAM.INFO.{stream}",)


def stream_reader(stream: str) -> tuple[str, ...]:
    """Read a whole stream: its info, single messages (direct or not) and its own consumers."""
    return (*_stream_info(stream), f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>", f"{JS_API}.CONSUMER.CREATE.{stream}",
            f"{JS_API}.CONSUMER.CREATE.{stream}.>", f"{JS_API}.CONSUMER.DELETE.{stream}.*",
            f"{JS_API}.CONSUMER.INFO.{stream}.*", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{JS_FC}.{stream}.>", f"{JS_ACK}.{stream}.>")


def queue_consumer(stream: str, durable: str) -> tuple[str, ...]:
    """Take work from one provisioned durable pull consumer (never create another one)."""
    return (f"{JS_API}.CONSUMER.INFO.{stream}.{durable}", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"{JS_ACK}.{stream}.{durable}.>")


def kv_reader(bucket: str) -> tuple[str, ...]:
    """Bind, get, list and watch KV ``bucket``."""
    return stream_reader(names.kv_stream(bucket))


def kv_writer(bucket: str, key: str | None = None) -> tuple[str, ...]:
    """Read KV ``bucket`` and put/delete its keys (only ``key`` when given)."""
    target = names.kv_subjects(bucket) if key is None else names.kv_key_subject(bucket, names.token(key))
    return (*kv_reader(bucket), target)


def kv_putter(bucket: str) -> tuple[str, ...]:
    """Bind KV ``bucket`` and put keys without reading any (an engine filling the prompt cache)."""
    return (*_stream_info(names.kv_stream(bucket)), names.kv_subjects(bucket))


def object_reader(bucket: str) -> tuple[str, ...]:
    """Bind object store ``bucket`` and read its objects.

    nats-py looks the stream of an object's chunks up by subject (``STREAM.NAMES``: the names of
    the streams only, no content).
    """
    return (*stream_reader(names.obj_stream(bucket)), f"{JS_API}.STREAM.NAMES")


def object_writer(bucket: str) -> tuple[str, ...]:
    """Read, put and delete objects of ``bucket`` (a delete purges the object's chunks; never the store)."""
    stream = names.obj_stream(bucket)
    return (*object_reader(bucket), *names.obj_subjects(bucket), f"{JS_API}.STREAM.PURGE.{stream}")


def _inbox(root: str) -> str:
    return f"{root}.>"


def edge() -> Permissions:
    """The HTTP edge: submits inference and training, reads keys and the cache, manages files, jobs and batches."""
    inbox = names.identity_inbox(EDGE)
    publish = _unique(
        [names.infer_submit(lane) for lane in names.LANES_BY_PRIORITY],
        (names.INFER_CANCEL, names.engine_any("cancel"), names.engine_any("control"),
         names.TRAIN_SUBMIT, names.TRAIN_CANCEL, names.TRAIN_EVENTS_ALL, names.RATE_ALL),
        _stream_info(names.INFER_STREAM), [f"{JS_API}.CONSUMER.INFO.{names.INFER_STREAM}.{names.scheduler_durable(lane)}"
                                           for lane in names.LANES_BY_PRIORITY],
        (*_stream_info(names.RATE_STREAM), f"{JS_API}.DIRECT.GET.{names.RATE_STREAM}",
         f"{JS_API}.DIRECT.GET.{names.RATE_STREAM}.>"),
        stream_reader(names.TRAIN_EVENTS_STREAM),
        kv_reader(names.API_KEYS_BUCKET), kv_reader(names.PROMPT_CACHE_BUCKET), kv_reader(names.MODELS_BUCKET),
        kv_reader(names.WORKERS_BUCKET), kv_writer(names.IDEMPOTENCY_BUCKET), kv_writer(names.TRAIN_JOBS_BUCKET),
        kv_writer(names.SCHEDULER_CONFIG_BUCKET), kv_writer(names.RESPONSES_BUCKET),
        object_writer(names.ARTIFACTS_STORE),
        # Batches: every edge queues them and runs their lines (``services.edge.batch``).
        (names.BATCH_START, names.BATCH_LINES_ALL), queue_consumer(names.BATCH_STREAM, names.BATCH_DURABLE),
        kv_writer(names.BATCHES_BUCKET),
        # A finished batch's line outcomes are purged once its result files hold them (``finish``).
        (f"{JS_API}.STREAM.PURGE.{names.kv_stream(names.BATCHES_BUCKET)}",))
    subscribe = (_inbox(inbox), names.WORKER_STATUS_ALL, names.MICRO_ALL)
    return Permissions(EDGE, inbox, publish, subscribe, allow_responses=True,
                       description="HTTP edge: submits inference and training jobs, reads API keys")


def _rate_counters() -> tuple[str, ...]:
    """Add to and read the ``LLM_RATE`` counters (the budgets every edge and scheduler share)."""
    return (names.RATE_ALL, *_stream_info(names.RATE_STREAM), f"{JS_API}.DIRECT.GET.{names.RATE_STREAM}",
            f"{JS_API}.DIRECT.GET.{names.RATE_STREAM}.>")


def scheduler() -> Permissions:
    """A scheduler replica: takes the inference queue, offers requests to engines, answers cache hits;
    admits API keys' NATS-native requests against their limits into the queue."""
    inbox = names.identity_inbox(SCHEDULER)
    publish = _unique(
        (names.engine_any("generate"), names.engine_any("cancel"), names.engine_any("control"),
         f"{names.REPLY_PREFIX}.>"),  # typed errors and cache hits go to each request's own reply subject
        _stream_info(names.INFER_STREAM),
        *[queue_consumer(names.INFER_STREAM, names.scheduler_durable(lane)) for lane in names.LANES_BY_PRIORITY],
        [names.infer_submit(lane) for lane in names.LANES_BY_PRIORITY],  # admitted keyed requests join the queue
        queue_consumer(names.INFER_KEYED_STREAM, names.KEYED_DURABLE), _rate_counters(),
        kv_reader(names.API_KEYS_BUCKET),
        kv_reader(names.WORKERS_BUCKET), kv_reader(names.PROMPT_CACHE_BUCKET), kv_reader(names.MODELS_BUCKET),
        kv_reader(names.SCHEDULER_CONFIG_BUCKET))
    subscribe = (_inbox(inbox), names.INFER_CANCEL, names.INFER_SUBMIT_ALL, names.WORKER_STATUS_ALL,
                 names.SCHEDULER_STATUS, names.MICRO_ALL)
    return Permissions(SCHEDULER, inbox, publish, subscribe, allow_responses=True,
                       description="scheduler: takes the inference queue, dispatches to engines")


def engine(worker: str) -> Permissions:
    """One engine worker: answers only its own subjects, streams tokens, heartbeats only its own entry."""
    worker = names.token(worker)
    inbox = names.identity_inbox(ENGINE, worker)
    publish = _unique(
        (f"{names.REPLY_PREFIX}.>",  # token events go to each request's reply subject
         names.worker_status(worker),
         names.RATE_TOKENS_ALL),  # a NATS-native request's tokens, charged to its key when it ends
        kv_writer(names.WORKERS_BUCKET, worker), kv_putter(names.PROMPT_CACHE_BUCKET),
        kv_reader(names.MODELS_BUCKET), object_reader(names.ARTIFACTS_STORE))
    subscribe = (_inbox(inbox), names.engine_generate(worker), names.engine_cancel(worker),
                 names.engine_control(worker), names.ENGINE_CONTROL_ALL, names.INFER_CANCEL, names.MICRO_ALL)
    return Permissions(f"{ENGINE}.{worker}", inbox, publish, subscribe, allow_responses=True,
                       description=f"engine worker {worker}: its own generate/cancel/control subjects")


def trainer() -> Permissions:
    """A trainer: takes the training queue, records job state, events, checkpoints and finished adapters."""
    inbox = names.identity_inbox(TRAINER)
    publish = _unique(
        (names.TRAIN_EVENTS_ALL,), queue_consumer(names.TRAIN_STREAM, names.TRAIN_DURABLE),
        kv_writer(names.TRAIN_JOBS_BUCKET), kv_writer(names.MODELS_BUCKET), object_writer(names.ARTIFACTS_STORE))
    subscribe = (_inbox(inbox), names.TRAIN_CANCEL, names.TRAINER_STATUS, names.MICRO_ALL)
    return Permissions(TRAINER, inbox, publish, subscribe, allow_responses=True,
                       description="trainer: takes the training queue, writes jobs, models, artifacts")


def operator() -> Permissions:
    """The operator CLI (``./cy infra apply``, ``./cy keys``, ``./cy backup``/``restore``, model
    registration): JetStream admin.

    It may define streams and edit every bucket, ask engines to load models, query services and
    watch heartbeats; it cannot subscribe to the request subjects or to anyone else's inbox.
    """
    inbox = names.identity_inbox(OPERATOR)
    publish = (f"{JS_API}.>", JS_SNAPSHOT, "$KV.>", "$O.>", f"{JS_ACK}.>", f"{JS_FC}.>", names.engine_any("control"),
               names.SCHEDULER_STATUS, names.TRAINER_STATUS, names.MICRO_ALL)
    subscribe = (_inbox(inbox), names.WORKER_STATUS_ALL)
    return Permissions(OPERATOR, inbox, publish, subscribe,
                       description="operator CLI: provisioning, API keys, model registry (JetStream admin)")


def producer() -> Permissions:
    """A NATS-native producer: submits to every lane and cancels; hears only its own inbox."""
    inbox = names.identity_inbox(PRODUCER)
    publish = (*[names.infer_submit(lane) for lane in names.LANES_BY_PRIORITY], names.INFER_CANCEL)
    return Permissions(PRODUCER, inbox, publish, (_inbox(inbox),),
                       description="NATS-native producer: submit lanes and cancel, its own inbox")


def key_producer(key_id: str, scopes: list[str] | tuple[str, ...]) -> Permissions:
    """The NATS user of one API key (``./cy keys create --nats``): if the key may run inference, submit
    only under its own key id (``names.infer_keyed``: the scheduler holds each request to the key's
    limits) and cancel; and only its own inbox ``_INBOX.<key id>`` (no other key's, nor the shared producer's)."""
    inbox = names.identity_inbox(key_id)
    infers = bool({"inference", "admin"} & set(scopes))
    publish = (*[names.infer_keyed(key_id, lane) for lane in names.LANES_BY_PRIORITY], names.INFER_CANCEL) if infers else ()
    return Permissions(f"key.{key_id}", inbox, publish, (_inbox(inbox),),
                       description=f"API key {key_id}'s NATS producer ({', '.join(scopes)})")


def in_js_domain(perms: Permissions, domain: str) -> Permissions:
    """``perms`` for a client whose JetStream is in another server's ``domain`` (an engine behind a site's leaf).

    The leaf maps ``$JS.API.>`` to ``$JS.<domain>.API.>`` and ``$KV.>`` to ``$JS.<domain>.API.$KV.>``
    (``site_mappings``) before it checks permissions, so each such subject is also granted in its
    mapped form.
    """
    prefix = f"$JS.{names.token(domain)}.API"
    mapped = tuple(f"{prefix}{s[len(JS_API):]}" if s.startswith(f"{JS_API}.") else f"{prefix}.{s}"
                   for s in perms.publish if s.startswith((f"{JS_API}.", "$KV.")))
    return Permissions(perms.identity, perms.inbox, _unique(perms.publish, mapped), perms.subscribe,
                       perms.allow_responses, perms.description)


def site_mappings(domain: str) -> dict[str, str]:
    """The subject mappings of a site's leaf node (no JetStream of its own) toward the hub's JetStream ``domain``.

    nats-server keeps ``$JS.API.>``, ``$KV.>`` and ``$OBJ.>`` from crossing a leaf connection between
    servers of one (even empty) JetStream domain; addressed to the hub's domain they cross, and the
    hub maps ``$JS.<domain>.API.$KV.>`` back to ``$KV.>`` itself.
    """
    prefix = f"$JS.{names.token(domain)}.API"
    return {f"{JS_API}.>": f"{prefix}.>", "$KV.>": f"{prefix}.$KV.>"}


def leaf_site(site: str, workers: list[str] | tuple[str, ...], hub_domain: str) -> Permissions:
    """The user a site's leaf node connects to the hub as: what the site's engine ``workers`` may do, together.

    The hub applies a leaf connection's permissions to what crosses it: subjects it may publish
    flow from the site into the hub (token events, heartbeats, the workers' own KV entries and the
    JetStream API reads of the registry and object store, in ``hub_domain``), subjects it may
    subscribe to flow from the hub to the site (each worker's generate/cancel/control subjects and
    inbox). Nothing else: the site sees no submit lane, no other worker's dispatches and no other
    identity's inbox.
    """
    engines = [in_js_domain(engine(w), hub_domain) for w in workers]
    if not engines:
        raise ValueError("a site needs at least one engine worker")
    return Permissions(f"{SITE}.{names.token(site)}", names.identity_inbox(ENGINE),
                       _unique(*(e.publish for e in engines)), _unique(*(e.subscribe for e in engines)),
                       allow_responses=True,
                       description=f"leaf node of site {site}: engines {', '.join(names.token(w) for w in workers)}")


def identities(workers: list[str] | tuple[str, ...]) -> dict[str, Permissions]:
    """Every identity of a deployment with engine ``workers``, by identity name."""
    sets = [edge(), scheduler(), *[engine(w) for w in workers], trainer(), operator(), producer()]
    return {p.identity: p for p in sets}
