"""JetStream's own stream snapshot and restore, spoken from nats-py (which has no helper for them).

Why the server's snapshot API and not a copy of the messages through an ordered consumer: a
snapshot is the stream's store as the server sees it at one instant (taken under the stream's
lock), so it keeps what a re-publish would lose or change: sequence numbers (a KV entry's
revision, on which optimistic updates rely), original timestamps (so TTLs and ``max_age`` keep
counting from the original write, not from the restore), deleted-message gaps, and every durable
consumer with its delivered/acknowledged state (the trainers' and schedulers' place in their
queues). Messages, subjects and headers are byte for byte those of the original. It is also what
``nats stream backup/restore`` uses, so a backup's stream files are the server's own format.

The protocol (nats-server ``jetstream_api.go``):

- snapshot: request ``$JS.API.STREAM.SNAPSHOT.<stream>`` with a ``deliver_subject``; the reply
  holds the stream's config and state. Chunks then arrive on the deliver subject; each one with
  a reply subject must be answered (that is the flow control: the server stops after a window of
  unanswered chunks). An empty message without a reply ends it: no status or ``204`` is success,
  any other status (``408``, ``500 <why>``) a failed snapshot.
- restore: request ``$JS.API.STREAM.RESTORE.<stream>`` with ``{config, state}``; the reply names
  a subject to send the chunks to, each as a request answered by an empty message (or an error
  body). An empty request ends it; its answer is the new stream's info or an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

SNAPSHOT_API = "$JS.API.STREAM.SNAPSHOT.{}"
RESTORE_API = "$JS.API.STREAM.RESTORE.{}"
CHUNK_SIZE = 128 * 1024
# The server gives up on a silent receiver after 5 s; a stalled snapshot ends well before this.
SNAPSHOT_IDLE_TIMEOUT = 30.0
# How long a restore chunk is resent while its subject has no subscriber yet (see ``_send``).
NO_RESPONDERS_GRACE = 5.0


class SnapshotError(RuntimeError):
    """The server refused or broke off a snapshot or a restore (its message says why)."""


def _api_error(reply: dict[str, Any]) -> str | None:
    err = reply.get("error")
    if not err:
        return None
    return f"{err.get('description', 'error')} (code {err.get('code')}, error {err.get('err_code')})"


async def snapshot_stream(nc: Client, stream: str, sink: BinaryIO,
                          on_chunk: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Write ``stream``'s snapshot to ``sink``; the stream's config and state as the server reported them.

    Consumers are included; ``jsck`` makes the server verify every message's checksum first, so a
    corrupted store fails the backup instead of being copied.
    """
    inbox = nc.new_inbox()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=queue.put)
    try:
        request = {"deliver_subject": inbox, "jsck": True, "chunk_size": CHUNK_SIZE}
        answer = json.loads((await nc.request(SNAPSHOT_API.format(stream), json.dumps(request).encode(),
                                              timeout=30)).data)
        if why := _api_error(answer):
            raise SnapshotError(f"snapshot of {stream} refused: {why}")
        while not done.done():
            try:
                msg = await asyncio.wait_for(queue.get(), SNAPSHOT_IDLE_TIMEOUT)
            except TimeoutError:
                raise SnapshotError(f"snapshot of {stream}: no data from the server for "
                                    f"{SNAPSHOT_IDLE_TIMEOUT:g} s") from None
            if msg.data:
                sink.write(msg.data)
                on_chunk(len(msg.data))
            if msg.reply:
                await nc.publish(msg.reply, b"")  # flow control: one more chunk may come
            elif not msg.data:
                status = (msg.headers or {}).get("Status", "204")
                if status != "204":
                    why = (msg.headers or {}).get("Description", "")
                    raise SnapshotError(f"snapshot of {stream} failed on the server: {status} {why}".strip())
                done.set_result(None)
        return {"config": answer["config"], "state": answer["state"]}
    finally:
        await sub.unsubscribe()


async def restore_stream(nc: Client, meta: dict[str, Any], chunks: Iterable[bytes], replicas: int,
                         on_chunk: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Create a stream from a snapshot (``meta`` from ``snapshot_stream``) at ``replicas``; its new info."""
    config = dict(meta["config"], num_replicas=replicas)
    stream = config["name"]
    answer = json.loads((await nc.request(RESTORE_API.format(stream),
                                          json.dumps({"config": config, "state": meta["state"]}).encode(),
                                          timeout=30)).data)
    if why := _api_error(answer):
        raise SnapshotError(f"restore of {stream} refused: {why}")
    deliver = answer["deliver_subject"]
    for chunk in chunks:
        reply = await _send(nc, deliver, chunk, timeout=30)
        if reply.data:
            raise SnapshotError(f"restore of {stream} failed: {_api_error(json.loads(reply.data)) or reply.data!r}")
        on_chunk(len(chunk))
    # The server now unpacks and checks the whole stream before answering.
    final = json.loads((await _send(nc, deliver, b"", timeout=300)).data)
    if why := _api_error(final):
        raise SnapshotError(f"restore of {stream} failed: {why}")
    return final


async def _send(nc: Client, subject: str, data: bytes, timeout: float) -> Msg:
    """One restore chunk as a request; resent while nobody listens yet.

    On a cluster the subject is served by the server chosen to receive the restore, and its
    interest may reach the server this client is connected to a moment after the restore reply:
    a 'no responders' answer means the chunk reached nobody, so sending it again is safe.
    """
    deadline = time.monotonic() + NO_RESPONDERS_GRACE
    while True:
        try:
            return await nc.request(subject, data, timeout=timeout)
        except NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def file_chunks(path_or_file: BinaryIO, size: int = CHUNK_SIZE) -> Iterable[bytes]:
    """The contents of an open file in ``size`` pieces."""
    while piece := path_or_file.read(size):
        yield piece
