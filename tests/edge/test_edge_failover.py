"""The edge failing a request over when its engine is lost: before the first token, and mid-stream.

Two stand-in engines on a real NATS server: the first takes the request and goes silent (as a
SIGKILLed engine does); the second takes whatever the edge re-publishes. The end-to-end version
with real processes is in ``test_e2e_failover.py``.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from schemas import names
from schemas.events import StreamEnd, StreamStart, TokenDelta, Usage
from schemas.inference import CancelRequest, ChatMessage, InferenceRequest, SamplingParams
from services.common import bus
from services.edge.bus.failover import Delivered, Impossible, begin, next_attempt
from services.edge.state import EDGE
from tests.scheduler.test_scheduler_harness import eventually
from tests.edge_harness import (  # noqa: F401 - fixtures
    BusEngine,
    assert_error,
    cancels,
    chat_body,
    client,
    edge_config,
    engine,
    parse_json,
    sse_payloads,
)

CHAT = "/v1/chat/completions"
# The engines that must stay alive beat slower, so a busy test machine never makes them look dead.
SPARE_INTERVAL = 0.3


def _deltas(req: InferenceRequest, words: list[str], first: int = 1) -> list[TokenDelta]:
    return [TokenDelta(id=req.id, seq=first + i, text=w, token_ids=[first + i]) for i, w in enumerate(words)]


async def test_engine_lost_mid_stream_the_answer_continues_on_another_engine(client, engine, nc, js, cancels):
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True, max_tokens=6,
                                                                    stream_options={"include_usage": True})))
        first = await engine.next_request()
        await engine.send(first, engine.start_event(first), *_deltas(first, ["tok1 ", "tok2 "]))
        await engine.stop_heartbeats()  # SIGKILL, as the edge sees it
        again = await spare.next_request()
        assert again.id == names.attempt_id(first.id, 1) and again.attempt == 1
        assert again.reply_to == f"{first.reply_to.rsplit('.', 1)[0]}.{again.id}"  # the same edge inbox
        assert again.continuation == "tok1 tok2 "
        assert again.sampling.max_tokens == 4  # the remaining budget
        assert again.messages == first.messages and again.cache_key is None
        assert (await cancels.wait_for(first.id)).reason == "worker_lost"  # in case it is only cut off
        await spare.send(again, spare.start_event(again, prompt_tokens=7), *_deltas(again, ["tok3 ", "tok4 "]),
                         StreamEnd(id=again.id, seq=3, finish_reason="stop",
                                   usage=Usage(prompt_tokens=7, completion_tokens=2)))
        resp = await post
        assert resp.status == 200
        payloads = sse_payloads(await resp.text())
        assert payloads[-1] == "[DONE]"
        chunks = [parse_json(p) for p in payloads[:-1]]
        assert {c["id"] for c in chunks} == {first.id}  # one response id throughout
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "tok1 tok2 tok3 tok4 "
        assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
        assert not any("error" in c for c in chunks)
    finally:
        await spare.stop_heartbeats()


async def _hold_up_in_the_grace(client, request_id: str) -> None:
    """Block the event loop past the spare's three intervals once the sweep found the engine silent.

    As a long collector pause on a loaded host does: the spare's heartbeats wait unread meanwhile,
    and a sweep judging on waking would find no live engine to fail over to.
    """
    pending = client.app[EDGE].router._pending[request_id]
    while pending.dead_since is None:  # the sweep found the engine silent; the grace runs
        await asyncio.sleep(0.005)
    assert pending.lost is None  # not given up on yet: nothing is awaited between this check and the hold-up
    time.sleep(4 * SPARE_INTERVAL)


@pytest.mark.parametrize("held_up", [False, True], ids=["edge-on-time", "edge-held-up-in-the-grace"])
async def test_engine_lost_before_the_first_token_is_invisible_to_the_client(client, engine, nc, js, held_up):
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body(max_tokens=5, temperature=0)))
        first = await engine.next_request()
        await engine.send(first, engine.start_event(first))
        await engine.stop_heartbeats()
        if held_up:
            await _hold_up_in_the_grace(client, first.id)
        again = await spare.next_request()
        assert (again.attempt, again.continuation, again.sampling) == (1, "", first.sampling)  # the same request
        await spare.answer(again, ["Hello", " there"])
        resp = await asyncio.wait_for(post, 5)
        body = await resp.json()
        assert resp.status == 200, body
        assert body["id"] == first.id
        assert body["choices"][0]["message"]["content"] == "Hello there"
        assert body["usage"]["completion_tokens"] == 2
    finally:
        await spare.stop_heartbeats()


async def test_a_late_event_of_the_lost_attempt_never_reaches_the_client(client, engine, nc, js):
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body(max_tokens=8)))
        first = await engine.next_request()
        await engine.send(first, engine.start_event(first), *_deltas(first, ["a "]))
        await engine.stop_heartbeats()
        again = await spare.next_request()
        await engine.send(first, *_deltas(first, ["ZOMBIE "], first=2))  # cut off, not dead: still talking
        await spare.answer(again, ["b "])
        body = await (await asyncio.wait_for(post, 5)).json()
        assert body["choices"][0]["message"]["content"] == "a b "
    finally:
        await spare.stop_heartbeats()


async def _withdrawals(nc, worker: str) -> list[CancelRequest]:
    """Every withdrawal sent to ``worker`` from now on (``llm.v1.engine.<worker>.cancel``)."""
    got: list[CancelRequest] = []

    async def on_msg(msg) -> None:
        got.append(msgspec.json.decode(msg.data, type=CancelRequest))

    await nc.subscribe(names.engine_cancel(worker), cb=on_msg)
    await bus.flush(nc)
    return got


def _offer(events: list, dispatch: int) -> list:
    return [msgspec.structs.replace(e, dispatch=dispatch) for e in events]


async def test_an_engine_that_accepted_an_older_offer_late_never_reaches_the_client(client, engine, nc, js):
    # A late accept: the scheduler gave up on ``engine`` (offer 0) and offered the request to ``spare`` (offer 1);
    # ``engine`` accepted late anyway and streams onto the same reply subject.
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    stopped = await _withdrawals(nc, engine.worker)
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body(max_tokens=8)))
        req = await engine.next_request()
        await spare.send(req, *_offer([spare.start_event(req), *_deltas(req, ["a "])], 1))
        await engine.send(req, engine.start_event(req), *_deltas(req, ["LATE ", "LATE "]),
                          StreamEnd(id=req.id, seq=3, finish_reason="stop",
                                    usage=Usage(prompt_tokens=5, completion_tokens=2)))
        await spare.send(req, *_offer([*_deltas(req, ["b "], first=2), StreamEnd(
            id=req.id, seq=3, finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=2))], 1))
        body = await (await asyncio.wait_for(post, 5)).json()
        assert body["choices"][0]["message"]["content"] == "a b "
        assert body["usage"]["completion_tokens"] == 2
        # The withdrawal travels on its own subject: wait for it rather than assume it came first.
        await eventually(lambda: bool(stopped), what="the late engine's withdrawal")
        assert [(c.id, c.dispatch, c.reason) for c in stopped] == [(req.id, 0, "stray_dispatch")]
    finally:
        await spare.stop_heartbeats()


async def test_a_newer_offer_starting_after_tokens_of_an_older_one_continues_without_repeating(
        client, engine, nc, js, cancels):
    # The late engine's StreamStart and first token beat the current engine's StreamStart to the edge:
    # following the newer engine from its start would repeat "tok1 ", so the request moves on instead.
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    stopped = await _withdrawals(nc, engine.worker)
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body(max_tokens=3)))
        req = await engine.next_request()
        await engine.send(req, engine.start_event(req), *_deltas(req, ["tok1 "]))
        await spare.send(req, *_offer([spare.start_event(req)], 1))
        again = await spare.next_request()
        assert again.id == names.attempt_id(req.id, 1) and again.continuation == "tok1 "
        assert (await cancels.wait_for(req.id)).id == req.id  # both engines of the old id are stopped
        await spare.send(again, spare.start_event(again), *_deltas(again, ["tok2 ", "tok3 "]),
                         StreamEnd(id=again.id, seq=3, finish_reason="length",
                                   usage=Usage(prompt_tokens=5, completion_tokens=2)))
        body = await (await asyncio.wait_for(post, 5)).json()
        assert body["choices"][0]["message"]["content"] == "tok1 tok2 tok3 "
        assert body["usage"]["completion_tokens"] == 3
        assert [(c.id, c.dispatch) for c in stopped] == [(req.id, 0)]
    finally:
        await spare.stop_heartbeats()


async def test_with_no_other_engine_the_client_gets_worker_lost_at_once(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), *_deltas(req, ["a "]))
    await engine.stop_heartbeats()
    resp = await asyncio.wait_for(post, 3)
    assert resp.status == 502
    body = await resp.json()
    assert_error(body, "worker_lost")
    assert "no other live engine" in body["error"]["message"]


async def test_failovers_are_bounded(client, engine, nc, js, edge_config):
    spare = await BusEngine(nc, js, interval=SPARE_INTERVAL).start()
    doomed = [await BusEngine(nc, js).start() for _ in range(edge_config.max_failovers)]
    try:
        post = asyncio.create_task(client.post(CHAT, json=chat_body()))
        attempts = []
        for current in [engine, *doomed]:  # every engine that takes it dies before its first token
            req = await current.next_request()
            attempts.append(req.attempt)
            await current.send(req, current.start_event(req))
            await current.stop_heartbeats()
        resp = await asyncio.wait_for(post, 5)  # the spare is alive, but retries are spent
        assert resp.status == 502
        assert_error(await resp.json(), "worker_lost")
        assert attempts == list(range(edge_config.max_failovers + 1))
    finally:
        for eng in [spare, *doomed]:
            await eng.stop_heartbeats()


def _request(**sampling) -> InferenceRequest:
    return InferenceRequest(id="chatcmpl-x", model="m", reply_to="_INBOX.e1.chatcmpl-x",
                            messages=[ChatMessage(role="user", content="hi")], deadline=2e9,
                            sampling=SamplingParams(max_tokens=4, **sampling))


def test_delivered_numbers_deltas_continuously_and_adds_up_usage():
    req = _request()
    delivered = Delivered()
    for seq, word in enumerate(["a ", "b "], 1):
        assert delivered.take(TokenDelta(id=req.id, seq=seq, text=word, token_ids=[seq]), req.id).seq == seq
    plan = next_attempt(req, delivered, max_attempts=2)
    assert isinstance(plan, InferenceRequest) and plan.continuation == "a b " and plan.sampling.max_tokens == 2
    begin(delivered, plan.attempt)
    out = delivered.take(TokenDelta(id=plan.id, seq=1, text="c ", token_ids=[9]), req.id)
    assert (out.id, out.seq, out.text) == (req.id, 3, "c ")
    end = delivered.take(StreamEnd(id=plan.id, seq=2, finish_reason="length",
                                   usage=Usage(prompt_tokens=3, completion_tokens=1)), req.id)
    assert (end.seq, end.usage.prompt_tokens, end.usage.completion_tokens) == (4, 3, 3)


def test_no_attempt_past_the_budget_the_deadline_or_the_retry_bound():
    delivered = Delivered()
    for seq in range(1, 5):
        delivered.take(TokenDelta(id="x", seq=seq, text="w ", token_ids=[seq]), "x")
    done = next_attempt(_request(), delivered, max_attempts=2)
    assert isinstance(done, StreamEnd) and done.finish_reason == "length" and done.usage.completion_tokens == 4
    late = msgspec.structs.replace(_request(), deadline=1.0)
    assert isinstance(next_attempt(late, Delivered(), max_attempts=2), Impossible)
    assert isinstance(next_attempt(_request(), Delivered(attempt=2), max_attempts=2), Impossible)
