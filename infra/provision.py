"""Apply the JetStream definitions in ``infra/nats/jetstream.toml`` idempotently.

Applying twice changes nothing. A definition that differs from what the server holds is
reported field by field and refused (``ProvisionError``), unless ``update=True``, which applies
only changes the server makes without dropping data (limits, descriptions, replicas), and still
refuses changes of retention or storage.

Replicas are a deploy-time setting, not part of a definition: ``replicas=None`` (what ``./cy up``
applies) creates missing objects with one replica and leaves an existing object's count as the
server has it, so an R3 cluster is never refused nor downgraded. ``replicas=N`` asks for N: a
different count is a difference like any other, applied by ``update=True`` (JetStream changes a
stream's replica count in place, copying its data to the new peers).

Every name (stream, subject, durable, bucket) comes from ``schemas/names.py``. The definitions
file spells them too, for operators to read; ``name_mismatches`` compares the two and ``apply``
refuses a file that disagrees, so a renamed subject can never be provisioned under its old name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from schemas import names

DEFINITIONS = Path(__file__).parent / "nats" / "jetstream.toml"

# Changing these would mean recreating the stream, that is losing its data: never done here.
_IMMUTABLE_STREAM_FIELDS = ("retention", "storage")


class ProvisionError(RuntimeError):
    """The server holds a definition that differs from ``jetstream.toml``."""


@dataclass(frozen=True)
class Action:
    """What ``apply`` did to one object: ``created``, ``unchanged`` or ``updated``."""

    kind: str
    name: str
    action: str
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind:<13} {self.name:<22} {self.action}{extra}"


def load_definitions(path: Path = DEFINITIONS) -> dict[str, Any]:
    """Read the TOML definitions file."""
    with path.open("rb") as f:
        return tomllib.load(f)


def _disagreement(section: str, defined: set[str], known: set[str]) -> list[str]:
    """Names ``section`` of the file has that names.py lacks, and the other way round."""
    out = [f"[{section}.{n}] is not a {section} name of schemas/names.py" for n in sorted(defined - known)]
    out += [f"[{section}.{n}] is missing (schemas/names.py names it)" for n in sorted(known - defined)]
    return out


def name_mismatches(defs: dict[str, Any]) -> list[str]:
    """Every place the definitions spell a name differently from ``schemas/names.py`` (empty: none)."""
    streams, consumers = defs.get("streams", {}), defs.get("consumers", {})
    out = _disagreement("streams", set(streams), set(names.STREAMS))
    out += _disagreement("consumers", set(consumers), set(names.DURABLES))
    out += _disagreement("kv", set(defs.get("kv", {})), set(names.KV_BUCKETS))
    out += _disagreement("object_stores", set(defs.get("object_stores", {})), set(names.OBJECT_STORES))
    for name, d in streams.items():
        want = names.STREAMS.get(name)
        if want is not None and sorted(d.get("subjects", [])) != sorted(want):
            out.append(f"[streams.{name}] subjects = {d.get('subjects')!r}, schemas/names.py has {list(want)!r}")
    for name, d in consumers.items():
        want = names.DURABLES.get(name)
        if want is not None and (d.get("stream"), d.get("filter_subject")) != want:
            out.append(f"[consumers.{name}] stream, filter_subject = {d.get('stream')!r}, "
                       f"{d.get('filter_subject')!r}; schemas/names.py has {want[0]!r}, {want[1]!r}")
    return out


def _stream_config(name: str, d: dict[str, Any], replicas: int | None) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        description=d.get("description"),
        subjects=list(names.STREAMS[name]),
        retention=api.RetentionPolicy(d.get("retention", "limits")),
        storage=api.StorageType(d.get("storage", "file")),
        max_msgs=d.get("max_msgs", -1),
        max_bytes=d.get("max_bytes", -1),
        max_age=d.get("max_age", 0),
        max_msgs_per_subject=d.get("max_msgs_per_subject", -1),
        discard=api.DiscardPolicy(d.get("discard", "old")),
        duplicate_window=d.get("duplicate_window", 120),
        allow_rollup_hdrs=d.get("allow_rollup_hdrs", False),
        deny_delete=d.get("deny_delete", False),
        allow_direct=d.get("allow_direct", False),
        # Omitted unless set, so older servers and existing streams see the same request as before.
        allow_msg_counter=d.get("allow_msg_counter") or None,
        num_replicas=replicas,
    )


def _kv_stream_config(bucket: str, d: dict[str, Any], replicas: int | None) -> api.StreamConfig:
    # Mirrors what nats.py's create_key_value builds, so a bucket made either way compares equal.
    history = d.get("history", 1)
    return api.StreamConfig(
        name=names.kv_stream(bucket),
        description=d.get("description"),
        subjects=[names.kv_subjects(bucket)],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType(d.get("storage", "file")),
        max_msgs=-1,
        max_bytes=d.get("max_bytes", -1),
        max_age=d.get("ttl", 0),
        max_msgs_per_subject=history,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(d.get("ttl", 0) or 120, 120),
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        # Per-message TTLs (nats-server >= 2.11); omitted unless set, as for allow_msg_counter.
        allow_msg_ttl=d.get("allow_msg_ttl") or None,
        num_replicas=replicas,
    )


def _obj_stream_config(bucket: str, d: dict[str, Any], replicas: int | None) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.obj_stream(bucket),
        description=d.get("description"),
        subjects=list(names.obj_subjects(bucket)),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType(d.get("storage", "file")),
        max_bytes=d.get("max_bytes", -1),
        max_age=d.get("ttl", 0),
        discard=api.DiscardPolicy.NEW,
        duplicate_window=120,
        allow_rollup_hdrs=True,
        allow_direct=True,
        num_replicas=replicas,
    )


_COMPARED = ("subjects", "retention", "storage", "max_msgs", "max_bytes", "max_age", "max_msgs_per_subject",
             "discard", "duplicate_window", "num_replicas")


def _norm(field: str, value: Any) -> Any:
    if field in ("max_age", "duplicate_window"):
        return round(float(value or 0), 3)
    if field in ("max_msgs", "max_bytes", "max_msgs_per_subject"):
        return -1 if value in (None, 0, -1) and field != "max_msgs_per_subject" else (value if value is not None else -1)
    if field == "subjects":
        return sorted(value or [])
    if field == "num_replicas":
        return value or 1
    return value


def _differences(want: api.StreamConfig, have: api.StreamConfig) -> dict[str, tuple[Any, Any]]:
    diff = {}
    for f in _COMPARED:
        if f == "num_replicas" and want.num_replicas is None:
            continue  # keep what the cluster has
        w, h = _norm(f, getattr(want, f)), _norm(f, getattr(have, f))
        if w != h:
            diff[f] = (h, w)
    return diff


async def _apply_stream(js: JetStreamContext, kind: str, want: api.StreamConfig, update: bool) -> Action:
    try:
        info = await js.stream_info(want.name)
    except NotFoundError:
        await js.add_stream(replace(want, num_replicas=want.num_replicas or 1))
        return Action(kind, want.name, "created")
    diff = _differences(want, info.config)
    if not diff:
        return Action(kind, want.name, "unchanged")
    text = ", ".join(f"{f}: server has {h!r}, definition wants {w!r}" for f, (h, w) in diff.items())
    immutable = [f for f in diff if f in _IMMUTABLE_STREAM_FIELDS]
    if immutable or not update:
        hint = ("these cannot change without recreating the stream (losing its data); "
                "delete it yourself if that is what you want" if immutable else
                "re-run with --update to apply (no data is dropped by these changes)")
        raise ProvisionError(f"{kind} {want.name} differs from infra/nats/jetstream.toml: {text}; {hint}")
    await js.update_stream(replace(want, num_replicas=want.num_replicas or info.config.num_replicas or 1))
    return Action(kind, want.name, "updated", text)


def _consumer_config(name: str, d: dict[str, Any], replicas: int | None) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=name,
        description=d.get("description"),
        filter_subject=names.DURABLES[name][1],
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=d.get("ack_wait", 30),
        max_deliver=d.get("max_deliver", -1),
        max_ack_pending=d.get("max_ack_pending", 1000),
        max_waiting=d.get("max_waiting", 512),
        # None (also for 1): created with its stream's replica count, which it keeps if the stream's changes;
        # a work-queue stream refuses a consumer whose explicit count differs from its own (10134).
        num_replicas=replicas if replicas and replicas > 1 else None,
    )


async def _apply_consumer(js: JetStreamContext, name: str, d: dict[str, Any], replicas: int | None,
                          update: bool) -> Action:
    want = _consumer_config(name, d, replicas)
    stream = names.DURABLES[name][0]
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        await js.add_consumer(stream, want)
        return Action("consumer", name, "created")
    have = info.config
    diff = {}
    for f in ("filter_subject", "ack_wait", "max_deliver", "max_ack_pending"):
        w, h = getattr(want, f), getattr(have, f)
        if f == "ack_wait":
            w, h = round(float(w), 3), round(float(h or 0), 3)
        if f == "max_deliver":
            w, h = w or -1, h or -1
        if w != h:
            diff[f] = (h, w)
    # A consumer keeps the replica count it was created with when its stream's changes.
    peers = 1 + len(info.cluster.replicas or []) if info.cluster else 1
    have_replicas = have.num_replicas or peers
    if replicas is not None and replicas != have_replicas:
        diff["num_replicas"] = (have_replicas, replicas)
    if not diff:
        return Action("consumer", name, "unchanged")
    text = ", ".join(f"{f}: server has {h!r}, definition wants {w!r}" for f, (h, w) in diff.items())
    if not update:
        raise ProvisionError(f"consumer {name} differs from infra/nats/jetstream.toml: {text}; "
                             "re-run with --update to apply")
    await js.add_consumer(stream, want)  # create-or-update on the same durable
    return Action("consumer", name, "updated", text)


async def apply(js: JetStreamContext, *, definitions: dict[str, Any] | None = None, replicas: int | None = 1,
                update: bool = False) -> list[Action]:
    """Create every stream, consumer, KV bucket and object store that is missing; verify the rest.

    ``replicas=None``: keep each existing object's replica count (new ones get 1).

    Refuses (``ProvisionError``, before touching the server) definitions whose names disagree with
    ``schemas/names.py``.
    """
    defs = definitions if definitions is not None else load_definitions()
    mismatches = name_mismatches(defs)
    if mismatches:
        raise ProvisionError("infra/nats/jetstream.toml disagrees with schemas/names.py: " + "; ".join(mismatches))
    actions: list[Action] = []
    for name, d in defs.get("streams", {}).items():
        actions.append(await _apply_stream(js, "stream", _stream_config(name, d, replicas), update))
    for name, d in defs.get("consumers", {}).items():
        actions.append(await _apply_consumer(js, name, d, replicas, update))
    for bucket, d in defs.get("kv", {}).items():
        actions.append(await _apply_stream(js, "kv", _kv_stream_config(bucket, d, replicas), update))
    for bucket, d in defs.get("object_stores", {}).items():
        actions.append(await _apply_stream(js, "object_store", _obj_stream_config(bucket, d, replicas), update))
    return actions
