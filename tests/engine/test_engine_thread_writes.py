"""Token events written by the model thread straight to an edge's reply socket (``services/engine/replies.py``).

The link's frames stay whole and in order between the model thread and the event loop; a step's
frames leave at its flush, before anything the loop writes later; the
thread gives way for good once bytes wait in the loop's transport; a frame the socket takes in
part is finished before anything else; and real llama.cpp and transformers engines send every
token this way, numbered in order, none on the bus, with the response cache recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid

import msgspec
import nats
import pytest
import uvloop

from schemas import names
from schemas.cache import CachedResponse
from schemas.events import StreamEnd, StreamStart, TokenDelta, decode_event
from services.common import reply_socket
from services.engine.backend import Chunk
from services.engine.progress import Progress
from services.engine.replies import ReplySender
from tests.engine.test_engine_reply_socket import EdgeSocket, key, named
from tests.engine.test_engine_service import dispatch, request, serving


class SlowEdge:
    """A reply socket read by a thread of its own, and only when told to (``read_some``, ``read``): the
    frames read, by request. Reading off the event loop lets a test hold the loop while the socket drains."""

    def __init__(self, directory, name: str = "edge-slow") -> None:
        self.path = reply_socket.socket_path(directory, name)
        self.name = name
        self.frames: list[tuple[str, object]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen()
        self._budget = threading.Semaphore(0)  # reads allowed
        self._read = threading.Event()  # set after each read
        self._all = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        rest = b""
        with conn:
            while self._all or self._budget.acquire():
                data = conn.recv(1 << 22)
                if not data:
                    return
                frames, rest = reply_socket.split_frames(rest + data)  # ValueError for a broken frame
                self.frames += [(request_id, decode_event(event)) for request_id, event in frames]
                self._read.set()
                if self.frames and self.frames[-1][1].text == "last":
                    return

    def read_some(self) -> None:
        """One read of what the socket holds, waited for in the calling thread (the event loop stays held)."""
        self._read.clear()
        self._budget.release()
        assert self._read.wait(10)

    async def read(self) -> list[tuple[str, object]]:
        """Read on until the frame whose text is ``last``; every frame read."""
        self._all = True
        self._budget.release()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive()
        return self.frames

    def close(self) -> None:
        self._listener.close()


class Stream:
    """One request on a sender's link: its ``send`` (the loop's way), its progress and a thread writer."""

    def __init__(self, req, send, sender: ReplySender, stalled=lambda: False) -> None:
        self.req, self.send, self.progress = req, send, Progress()
        self.writer = sender.writer(req.id, send, lambda chunk: self.progress.delta(req, chunk),
                                    lambda chunk: self.progress.sent(chunk, None), stalled)
        assert self.writer is not None

    async def through_loop(self, chunk: Chunk) -> None:
        await self.send(self.progress.delta(self.req, chunk))
        self.progress.sent(chunk, None)


def step(writer, chunk: Chunk) -> bool:
    """As ``EventQueues.deliver`` does for one request's chunk of a step: the writer takes it, then flushes."""
    taken = writer(chunk)
    writer.flush()
    return taken


async def open_stream(nc, sender: ReplySender, edge_name: str, **kw) -> Stream:
    req = named(request(nc.new_inbox() + f".r{uuid.uuid4().hex[:8]}"), edge_name)
    return Stream(req, await sender.sender(req), sender, **kw)


@pytest.fixture
async def sender(nc, tmp_path):
    out = ReplySender(lambda: nc.publish, enabled=True, directory=str(reply_socket.socket_dir(str(tmp_path / "r"))))
    try:
        yield out
    finally:
        await out.close()


LOOPS = ["asyncio", "uvloop"]  # engines run on uvloop (services/common/lifecycle.py), tests on asyncio's loop


async def on_loop(kind: str, nats_url: str, tmp_path, body) -> None:
    """``body(nc, sender)`` on an event loop of ``kind``: this one, or a uvloop run in a thread of its own."""
    async def run() -> None:
        nc = await nats.connect(nats_url)
        sender = ReplySender(lambda: nc.publish, enabled=True, directory=str(tmp_path / "r"))
        try:
            await body(nc, sender)
        finally:
            await sender.close()
            await nc.close()

    reply_socket.socket_dir(str(tmp_path / "r"))
    if kind == "asyncio":
        await run()
    else:
        await asyncio.to_thread(uvloop.run, run())


def seqs(frames, stream: Stream) -> list[int]:
    return [event.seq for request_id, event in frames if request_id == key(stream.req)]


@pytest.mark.parametrize("loop", LOOPS)
async def test_frames_from_the_model_thread_and_the_loop_stay_whole_and_in_order(nats_server, tmp_path, loop):
    async def body(nc, sender) -> None:
        edge = await EdgeSocket(tmp_path / "r", "edge-t").start()
        try:
            a, b = await open_stream(nc, sender, edge.name), await open_stream(nc, sender, edge.name)
            running = asyncio.get_running_loop()

            def model_thread() -> None:  # as EventQueues.deliver: a chunk the writer refuses goes through the loop
                for i in range(400):
                    chunk = Chunk(f"a{i} " * (1 + i % 50), [i])
                    if not step(a.writer, chunk):
                        asyncio.run_coroutine_threadsafe(a.through_loop(chunk), running).result()

            thread = threading.Thread(target=model_thread)
            thread.start()
            for i in range(400):
                await b.through_loop(Chunk(f"b{i} " * (1 + i % 70), [i]))
                await asyncio.sleep(0)
            await asyncio.to_thread(thread.join)
            await b.send(b.progress.delta(b.req, Chunk("last", [])))
            await a.send(a.progress.delta(a.req, Chunk("last", [])))
            await edge.until(key(a.req), TokenDelta)
            async with asyncio.timeout(10):
                while len(edge.events.get(key(a.req), [])) < 401 or len(edge.events.get(key(b.req), [])) < 401:
                    edge.changed.clear()
                    await edge.changed.wait()
            for stream in (a, b):
                assert [e.seq for e in edge.events[key(stream.req)]] == list(range(1, 402))
            assert a.writer.written > 0  # the thread wrote, and the loop's frames came between its own
        finally:
            await edge.close()

    await on_loop(loop, nats_server.url, tmp_path, body)


@pytest.mark.parametrize("loop", LOOPS)
async def test_the_thread_gives_way_for_good_once_bytes_wait_in_the_loops_transport(nats_server, tmp_path, loop):
    async def body(nc, sender) -> None:
        edge = SlowEdge(tmp_path / "r")
        try:
            a, b = await open_stream(nc, sender, edge.name), await open_stream(nc, sender, edge.name)
            assert step(a.writer, Chunk("first", [1]))  # nothing waits yet: straight to the socket
            for i in range(64):  # 4 MiB through the loop: the socket fills and the rest waits in the transport
                await b.through_loop(Chunk("x" * 65536, [i]))
            edge.read_some()  # the socket has room again, but the loop (held here) has not sent what waits
            assert not a.writer(Chunk("refused", [2]))  # it would overtake the loop's queued bytes
            await a.through_loop(Chunk("second", [2]))
            await b.through_loop(Chunk("last", [3]))
            frames = await edge.read()
            assert not a.writer(Chunk("still refused", [4]))  # drained now, but the request stays with the loop
            assert seqs(frames, a) == [1, 2] and seqs(frames, b) == list(range(1, 66))
            assert [e.text for r, e in frames if r == key(a.req)] == ["first", "second"]
        finally:
            edge.close()

    await on_loop(loop, nats_server.url, tmp_path, body)


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_frame_the_socket_takes_in_part_is_finished_before_anything_else(nats_server, tmp_path, loop):
    async def body(nc, sender) -> None:
        edge = SlowEdge(tmp_path / "r")
        try:
            a, b = await open_stream(nc, sender, edge.name), await open_stream(nc, sender, edge.name)
            await b.through_loop(Chunk("before", [0]))  # the link is open and nothing waits
            big = Chunk("y" * (4 << 20), [1])  # far more than an unread socket takes
            # Written in part; the rest is the event loop's to send, and a frame the loop writes before it
            # gets to that (here at once, in the same callback) must come after the rest.
            assert step(a.writer, big)
            await b.through_loop(Chunk("middle", [1]))
            assert not a.writer(Chunk("after", [2]))  # not while anything waits
            await b.through_loop(Chunk("last", [2]))
            frames = await edge.read()
            assert [(r == key(a.req), e.seq) for r, e in frames] == [(False, 1), (True, 1), (False, 2), (False, 3)]
            assert len(frames[1][1].text) == 4 << 20
        finally:
            edge.close()

    await on_loop(loop, nats_server.url, tmp_path, body)


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_steps_frames_leave_at_its_flush_and_before_any_later_frame_of_the_loop(nats_server, tmp_path, loop):
    async def body(nc, sender) -> None:
        edge = SlowEdge(tmp_path / "r")
        try:
            a, b, c = [await open_stream(nc, sender, edge.name) for _ in range(3)]
            assert a.writer(Chunk("a1", [1])) and b.writer(Chunk("b1", [1]))  # one step: both taken, not flushed
            await c.through_loop(Chunk("c1", [1]))  # made after them: the loop sends the taken frames first
            a.writer.flush()  # nothing left to send
            b.writer.flush()
            assert a.writer(Chunk("a2", [2])) and b.writer(Chunk("b2", [2]))
            a.writer.flush()  # one write for both (the link's), the second flush finds none
            b.writer.flush()
            await c.through_loop(Chunk("last", [2]))
            frames = await edge.read()
            assert [e.text for _, e in frames] == ["a1", "b1", "c1", "a2", "b2", "last"]
            assert seqs(frames, a) == seqs(frames, b) == seqs(frames, c) == [1, 2]
        finally:
            edge.close()

    await on_loop(loop, nats_server.url, tmp_path, body)


async def test_a_stopped_or_stalled_writer_writes_nothing(nc, sender, tmp_path):
    edge = await EdgeSocket(tmp_path / "r", "edge-t").start()
    stalled = False
    try:
        a = await open_stream(nc, sender, edge.name)
        b = await open_stream(nc, sender, edge.name, stalled=lambda: stalled)
        sender.stop_writer(a.req.id)
        assert not a.writer(Chunk("no", [1]))
        stalled = True  # the engine was stopped past three heartbeat intervals: the loop ends the request
        assert not b.writer(Chunk("no", [1]))
        stalled = False
        assert not b.writer(Chunk("no", [1]))  # and it stays with the loop
        assert a.progress.seq == b.progress.seq == 0 and not edge.events
        sender.end_writer(a.req.id)
        sender.end_writer(b.req.id)
        assert sender.thread_frames == 0
    finally:
        await edge.close()


def model_thread_engine(nats_url: str, engine: str, model_dir, socket_dir, *extra: str):
    # llama.cpp serves the GGUF shipped for the default model; transformers its safetensors copy.
    model = ["--model-path", str(model_dir), "--device", "cpu"] if engine == "transformers" else []
    return serving(["--nats-url", nats_url, "--engine", engine, "--model-id", "SmolLM2-135M-Instruct", *model,
                    "--heartbeat-interval", "0.5", "--slots", "2", "--reply-socket-dir", str(socket_dir), *extra])


@pytest.mark.parametrize(("engine", "thread_writes"), [("llamacpp", True), ("llamacpp", False),
                                                       ("transformers", True)])
async def test_an_engine_writes_every_token_from_its_model_thread(nc, js, nats_server, default_model_dir, tmp_path,
                                                                   engine, thread_writes):
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    edge = await EdgeSocket(reply_socket.socket_dir(str(tmp_path / "r")), "edge-t").start()
    flag = [] if thread_writes else ["--no-thread-writes"]
    try:
        async with model_thread_engine(nats_server.url, engine, default_model_dir, edge.path.parent,
                                       *flag) as (service, worker):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            cache_key = uuid.uuid4().hex
            req = msgspec.structs.replace(named(request(inbox, max_tokens=24, model="SmolLM2-135M-Instruct",
                                                        temperature=0.0), edge.name), cache_key=cache_key)
            assert (await dispatch(nc, worker, req)).accepted
            events = await edge.until(key(req), StreamEnd, timeout=60)
            deltas = [e for e in events if type(e) is TokenDelta]
            assert type(events[0]) is StreamStart and [e.seq for e in deltas] == list(range(1, len(deltas) + 1))
            end = events[-1]
            assert end.seq == len(deltas) + 1 and end.usage.completion_tokens == 24
            with pytest.raises(TimeoutError):
                await sub.next_msg(timeout=0.3)  # the bus carried none of it
            # Every delta came from the model thread, or every one from the loop.
            assert service._replies.thread_frames == (len(deltas) if thread_writes else 0)
            kv = await js.key_value(names.PROMPT_CACHE_BUCKET)
            async with asyncio.timeout(10):  # stored after the terminal event, in the background
                while True:
                    with contextlib.suppress(Exception):
                        cached = msgspec.json.decode((await kv.get(cache_key)).value, type=CachedResponse)
                        break
                    await asyncio.sleep(0.05)
            assert [d.text for d in cached.deltas] == [e.text for e in deltas]
            assert [t for d in cached.deltas for t in d.token_ids] == [t for e in deltas for t in e.token_ids]
    finally:
        await edge.close()
