"""services.common.bus.flush: its PONG proves that the commands queued before it reached the server.

nats-py 2.16's own ``flush`` writes its PING ahead of commands still queued for the client's
flusher task. An engine that subscribed, flushed and then said it was ready once got a control
request answered with "no responders" in CI. These tests read what the client writes to its socket.
"""

from __future__ import annotations

import uuid

import nats

from services.common import bus
from services.common.natsserver import NatsServer


def _record_verbs(nc: nats.NATS) -> list[str]:
    """The protocol verbs ``nc`` writes to its socket from now on, in order."""
    verbs: list[str] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def note(data) -> None:
        verbs.append(bytes(data).split(b" ", 1)[0].strip().decode())

    def recorded_write(data) -> None:
        note(data)
        write(data)

    def recorded_writelines(lines) -> None:
        for data in lines:
            note(data)
        writelines(lines)

    transport.write, transport.writelines = recorded_write, recorded_writelines
    return verbs


async def _ignore(msg) -> None:
    pass


async def test_nats_py_flush_alone_pings_ahead_of_a_queued_subscription(nc):
    verbs = _record_verbs(nc)
    await nc.subscribe("flush.order", cb=_ignore)
    await nc.flush()
    # If this ever fails, nats-py orders its PING after queued commands and bus.flush can be one flush.
    assert verbs.index("PING") < verbs.index("SUB")


async def test_bus_flush_pings_after_the_queued_subscription_and_publication(nc):
    verbs = _record_verbs(nc)
    await nc.subscribe("flush.order", cb=_ignore)
    await nc.publish("flush.order", b"x")
    await bus.flush(nc)
    last_ping = len(verbs) - 1 - verbs[::-1].index("PING")
    assert verbs.index("SUB") < verbs.index("PUB") < last_ping


async def test_a_subscription_flushed_with_bus_flush_is_answered_from_another_connection(nats_server: NatsServer):
    responder = await nats.connect(nats_server.url)
    requester = await nats.connect(nats_server.url)

    async def answer(msg) -> None:
        await msg.respond(b"here")

    try:
        for _ in range(50):
            subject = f"flush.{uuid.uuid4().hex}"
            await responder.subscribe(subject, cb=answer)
            await bus.flush(responder)
            assert (await requester.request(subject, b"?", timeout=5)).data == b"here"
    finally:
        await requester.close()
        await responder.close()
