"""The engine's side of the reply socket: which way a request's events go (``services/engine/replies.py``)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from schemas.events import StreamEnd, StreamStart, TokenDelta, decode_event
from services.common import reply_socket
from tests.engine.test_engine_service import dispatch, events_until_terminal, request, running_engine


class EdgeSocket:
    """A listening reply socket, as an edge has: the events it reads, by request id."""

    def __init__(self, directory, name: str = "edge-t") -> None:
        self.path = reply_socket.socket_path(directory, name)
        self.name = name
        self.events: dict[str, list] = {}
        self.changed = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> EdgeSocket:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        rest = b""
        while data := await reader.read(65536):
            frames, rest = reply_socket.split_frames(rest + data)
            for request_id, event in frames:
                self.events.setdefault(request_id, []).append(decode_event(event))
            self.changed.set()

    async def until(self, request_id: str, kind: type, timeout: float = 10.0) -> list:
        async with asyncio.timeout(timeout):
            while not any(type(e) is kind for e in self.events.get(request_id, [])):
                self.changed.clear()
                await self.changed.wait()
        return self.events[request_id]

    async def close(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()


@pytest.fixture
async def edge_socket(tmp_path):
    directory = reply_socket.socket_dir(str(tmp_path / "replies"))
    sock = await EdgeSocket(directory).start()
    try:
        yield sock
    finally:
        await sock.close()


def named(req, name: str):
    return msgspec.structs.replace(req, reply_socket=name)


def key(req) -> str:
    """What the engine sends a request's events under: the last token of its reply subject (an edge's
    subject ends with the request id)."""
    return req.reply_to.rsplit(".", 1)[1]


async def test_a_request_naming_a_socket_on_this_host_gets_every_event_there_and_none_on_nats(nc, nats_server,
                                                                                              edge_socket):
    async with running_engine(nats_server.url, "--reply-socket-dir", str(edge_socket.path.parent)) as (service, w):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = named(request(inbox, max_tokens=5), edge_socket.name)
        assert (await dispatch(nc, w, req)).accepted
        events = await edge_socket.until(key(req), StreamEnd)
        assert type(events[0]) is StreamStart and events[0].worker == w
        assert [e.seq for e in events if type(e) is TokenDelta] == [1, 2, 3, 4, 5]
        assert "".join(e.text for e in events if type(e) is TokenDelta) == "tok1 tok2 tok3 tok4 tok5 "
        assert type(events[-1]) is StreamEnd and events[-1].seq == 6
        with pytest.raises(TimeoutError):
            await sub.next_msg(timeout=0.3)  # the bus carried none of it
        assert service._replies.sockets == 1


@pytest.mark.parametrize("name", ["edge-gone", "../../etc/x", "a.b"])
async def test_a_socket_that_is_not_here_or_not_a_name_leaves_the_events_on_nats(nc, nats_server, edge_socket, name):
    async with running_engine(nats_server.url, "--reply-socket-dir", str(edge_socket.path.parent)) as (service, w):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = named(request(inbox, max_tokens=3), name)
        assert (await dispatch(nc, w, req)).accepted
        events = await events_until_terminal(sub)
        assert type(events[0]) is StreamStart and type(events[-1]) is StreamEnd
        assert [e.seq for e in events if type(e) is TokenDelta] == [1, 2, 3]
        assert service._replies.sockets == 0 and not edge_socket.events


async def test_an_engine_told_no_reply_socket_publishes_to_nats(nc, nats_server, edge_socket):
    async with running_engine(nats_server.url, "--reply-socket-dir", str(edge_socket.path.parent),
                              "--no-reply-socket") as (_, w):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = named(request(inbox, max_tokens=3), edge_socket.name)
        assert (await dispatch(nc, w, req)).accepted
        events = await events_until_terminal(sub)
        assert type(events[-1]) is StreamEnd and not edge_socket.events


async def test_a_socket_closed_mid_answer_sends_the_rest_to_nats_and_the_answer_still_ends(nc, nats_server,
                                                                                          edge_socket):
    async with running_engine(nats_server.url, "--reply-socket-dir", str(edge_socket.path.parent),
                              "--sim-token-rate", "20") as (_, w):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = named(request(inbox, max_tokens=40), edge_socket.name)
        assert (await dispatch(nc, w, req)).accepted
        await edge_socket.until(key(req), TokenDelta)
        await edge_socket.close()  # the edge went away: its connection ends
        events = await events_until_terminal(sub)
        on_bus = [e.seq for e in events]
        assert on_bus == sorted(on_bus) and type(events[-1]) is StreamEnd and events[-1].seq == 41
        seen = [e.seq for e in edge_socket.events[key(req)] if type(e) is not StreamStart]
        assert seen and max(seen) < on_bus[0]  # each event went one way, in order
        # The edge is back (a new listener on its socket): the next request reaches it there again.
        back = await EdgeSocket(edge_socket.path.parent, edge_socket.name).start()
        try:
            again = named(request(inbox, max_tokens=2), edge_socket.name)
            assert (await dispatch(nc, w, again)).accepted
            assert type((await back.until(key(again), StreamEnd))[-1]) is StreamEnd
        finally:
            await back.close()
