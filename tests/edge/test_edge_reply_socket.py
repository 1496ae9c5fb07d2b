"""The edge's reply socket: frames from engines on this host reach the router as NATS events do."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import pytest

from schemas.events import StreamEnd, StreamStart, TokenDelta, Usage, encode
from services.common import reply_socket
from services.edge.bus.replies import ReplyRouter
from services.edge.bus.reply_socket import open_reply_socket


def events(rid: str) -> list[bytes]:
    return [encode(StreamStart(id=rid, worker="w1", model="m")),
            encode(TokenDelta(id=rid, seq=1, text="Hello")),
            encode(TokenDelta(id=rid, seq=2, text=" world")),
            encode(StreamEnd(id=rid, seq=3, finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=2)))]


def test_frames_split_anywhere_come_back_whole_and_in_order():
    wire = b"".join(reply_socket.frame(b"r1", e) for e in events("r1"))
    for cut in range(len(wire) + 1):
        first, rest = reply_socket.split_frames(wire[:cut])
        second, left = reply_socket.split_frames(rest + wire[cut:])
        assert [e for _, e in first + second] == events("r1") and left == b""
        assert {r for r, _ in first + second} <= {"r1"}


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f", b"\x03\x00\x00\x00\x00ab",
                                 b"\x02\x00\x00\x00\x02a"])
def test_a_frame_no_engine_writes_is_refused(bad):
    with pytest.raises(ValueError):
        reply_socket.split_frames(bad)


async def test_events_on_the_socket_reach_the_request_and_a_stranger_sending_garbage_is_cut_off(tmp_path):
    router = ReplyRouter("edge-a")
    sock = await open_reply_socket(router, str(tmp_path / "replies"), "edge-a")
    assert sock is not None
    try:
        assert stat.S_IMODE(sock.path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.path.stat().st_mode) == 0o600
        pending = router.register("r1")
        _, writer = await asyncio.open_unix_connection(str(sock.path))
        wire = b"".join(reply_socket.frame(b"r1", e) for e in events("r1"))
        for i in range(0, len(wire), 7):  # in pieces that cut frames anywhere
            writer.write(wire[i:i + 7])
            await writer.drain()
        got = [await asyncio.wait_for(pending.queue.get(), 5) for _ in range(4)]
        assert [type(e) for e in got] == [StreamStart, TokenDelta, TokenDelta, StreamEnd]
        assert pending.worker == "w1" and "".join(e.text for e in got[1:3]) == "Hello world"
        writer.close()
        reader, stranger = await asyncio.open_unix_connection(str(sock.path))
        stranger.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the edge
        stranger.close()
    finally:
        await sock.stop()
    assert not sock.path.exists()


async def test_a_directory_others_may_open_gets_no_socket_and_the_bus_carries_everything(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    assert await open_reply_socket(ReplyRouter("edge-a"), str(shared), "edge-a") is None
    assert not list(shared.iterdir())


async def test_an_edge_removes_the_sockets_of_edges_that_are_gone_and_leaves_live_ones(tmp_path):
    directory = reply_socket.socket_dir(str(tmp_path / "replies"))
    live = await open_reply_socket(ReplyRouter("edge-live"), str(directory), "edge-live")
    dead = reply_socket.socket_path(directory, "edge-dead")
    killed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    killed.bind(str(dead))  # bound and never listening again: what an edge killed with SIGKILL leaves
    killed.close()
    try:
        new = await open_reply_socket(ReplyRouter("edge-new"), str(directory), "edge-new")
        assert new is not None
        assert sorted(p.name for p in directory.iterdir()) == ["edge-live.sock", "edge-new.sock"]
        await new.stop()
    finally:
        await live.stop()
