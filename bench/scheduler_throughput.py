"""How many requests per second one scheduler routes, and how much latency it adds.

    .venv/bin/python bench/scheduler_throughput.py [--engines 4] [--slots 64] [--seconds 5] [--replicas N] [--inprocess]

Starts a private nats-server (provisioned as in production) and one scheduler, by default as
its own process (``python -m services.scheduler``, as ``./cy up`` runs it). This process plays
the engines with ``EngineDouble``s that accept at once and free the slot at once (heart-beating
on every change, as real engines do), and the producer. It measures:

* latency: one request at a time, producer ``js.publish`` to the engine receiving the
  dispatch, against a baseline of the same publish seen by a plain core subscriber (the
  earliest any scheduler could know of it); the difference is what the scheduler adds:
  one fetch round trip to JetStream, the decision, and the hop to the engine (a plain core
  request/reply round trip is printed for scale);
* backlog drain: 1,000 queued requests (the stream's bound) released at once;
* sustained: producers publishing as fast as the queue accepts, for ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from infra import provision  # noqa: E402
from schemas import names  # noqa: E402
from schemas.events import encode  # noqa: E402
from schemas.inference import InferenceRequest  # noqa: E402
from services.common.natsserver import NatsServer  # noqa: E402
from services.scheduler.config import SchedulerConfig  # noqa: E402
from tests.engine_double import EngineDouble  # noqa: E402
from services.scheduler.service import Scheduler  # noqa: E402
from services.scheduler.status import STATUS_SUBJECT  # noqa: E402

MODEL = "bench-model"


class _Id(msgspec.Struct):
    id: str


_id_decoder = msgspec.json.Decoder(_Id)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def request_bytes(lane_id: str) -> tuple[str, bytes]:
    rid = f"b-{uuid.uuid4().hex[:16]}"
    req = InferenceRequest(id=rid, model=MODEL, reply_to=names.reply_inbox("bench", rid), prompt=lane_id)
    return rid, encode(req)


class Arrivals:
    """Futures for request ids the engines are about to receive."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.count = 0
        self.window: asyncio.Semaphore | None = None  # producers' credit in the sustained phase

    def __call__(self, req: InferenceRequest) -> None:
        self.count += 1
        if self.window is not None:
            self.window.release()
        fut = self.waiting.pop(req.id, None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())


async def measure_latency(nc, arrivals: Arrivals, n: int) -> tuple[list[float], list[float]]:
    js = nc.jetstream()
    seen: dict[str, asyncio.Future[float]] = {}

    async def doorbell(msg) -> None:
        fut = seen.pop(_id_decoder.decode(msg.data).id, None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    sub = await nc.subscribe(names.INFER_SUBMIT_ALL, cb=doorbell)
    end_to_end, baseline = [], []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        rid, data = request_bytes("latency")
        arrivals.waiting[rid] = arrived = loop.create_future()
        seen[rid] = bell = loop.create_future()
        t0 = time.perf_counter()
        await js.publish(names.infer_submit("normal"), data)
        t_bell, t_engine = await asyncio.wait_for(asyncio.gather(bell, arrived), 5)
        baseline.append(t_bell - t0)
        end_to_end.append(t_engine - t0)
        await asyncio.sleep(0.002)
    await sub.unsubscribe()
    return end_to_end, baseline


async def measure_rtt(a, b, n: int = 300) -> list[float]:
    """Plain core request/reply between two connections: the unit every hop above is made of."""
    async def echo(msg) -> None:
        await msg.respond(b"")

    subject = a.new_inbox()
    sub = await b.subscribe(subject, cb=echo)
    await b.flush()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.request(subject, b"", timeout=2)
        times.append(time.perf_counter() - t0)
    await sub.unsubscribe()
    return times


async def measure_backlog(nc, arrivals: Arrivals, engines: list[EngineDouble], n: int) -> float:
    """Queue ``n`` requests with every engine full, then free them all; seconds to dispatch them all."""
    await asyncio.sleep(0.2)  # let the previous phase's last accepts and finishes settle
    js = nc.jetstream()
    # The backlog fills the stream to its bound: wait until the previous phase's acknowledged
    # messages are deleted (slower when the server fsyncs every write: bench/fsync_policy.py).
    settle = time.perf_counter() + 30
    while (await js.stream_info(names.INFER_STREAM)).state.messages:
        if time.perf_counter() > settle:
            raise RuntimeError("the queue still holds messages of the previous phase after 30 s")
        await asyncio.sleep(0.01)
    for e in engines:
        e.in_flight = e.slots
        await e.heartbeat()
    await asyncio.sleep(0.2)
    start_count = arrivals.count
    await asyncio.gather(*(js.publish(names.infer_submit("normal"), request_bytes("backlog")[1]) for _ in range(n)))
    if arrivals.count != start_count:
        raise RuntimeError("the scheduler dispatched while every engine was full")
    t0 = time.perf_counter()
    for e in engines:
        await e.finish(e.slots)
    deadline = t0 + 30
    while arrivals.count - start_count < n:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {arrivals.count - start_count} of {n} queued requests were dispatched in 30 s")
        await asyncio.sleep(0.001)
    return time.perf_counter() - t0


async def measure_sustained(nc, arrivals: Arrivals, seconds: float, producers: int,
                            window: int) -> tuple[float, int]:
    """Producers keep at most ``window`` requests queued (a credit returns with each dispatch)."""
    js = nc.jetstream()
    stop = time.perf_counter() + seconds
    full = 0
    arrivals.window = credit = asyncio.Semaphore(window)

    async def produce() -> None:
        nonlocal full
        while time.perf_counter() < stop:
            await credit.acquire()
            try:
                await js.publish(names.infer_submit("normal"), request_bytes("sustained")[1])
            except nats.js.errors.APIError:  # 10077: the bounded queue is full (should not happen here)
                full += 1
                credit.release()
                await asyncio.sleep(0.001)

    start_count = arrivals.count
    t0 = time.perf_counter()
    await asyncio.gather(*(produce() for _ in range(producers)))
    elapsed = time.perf_counter() - t0
    arrivals.window = None
    return (arrivals.count - start_count) / elapsed, full


async def wait_ready(nc, engines: list[EngineDouble], replicas: int = 1) -> None:
    """Until ``replicas`` scheduler instances each report every engine (status answers come from any one)."""
    want = {e.worker for e in engines}
    ready: set[str] = set()
    async with asyncio.timeout(30):
        while len(ready) < replicas:
            try:
                status = json.loads((await nc.request(STATUS_SUBJECT, b"", timeout=0.5)).data)
                if want <= {w["worker"] for w in status["workers"]}:
                    ready.add(status["instance"])
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            await asyncio.sleep(0.02)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        admin = await nats.connect(server.url)
        await provision.apply(admin.jetstream())
        engine_nc = await nats.connect(server.url, name="bench-engines")
        arrivals = Arrivals()
        engines = [EngineDouble(engine_nc, f"bench-{i}", models=(MODEL,), slots=args.slots, interval=1.0,
                                service_time=0.0) for i in range(args.engines)]
        for e in engines:
            e.on_accept = arrivals
            await e.start()
        children: list[asyncio.subprocess.Process] = []
        scheduler = sched_nc = None
        if args.inprocess:
            sched_nc = await nats.connect(server.url, name="bench-scheduler")
            scheduler = Scheduler(sched_nc, SchedulerConfig(nats_url=server.url), CollectorRegistry())
            await scheduler.start()
        else:
            for _ in range(args.replicas):
                children.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "services.scheduler", "--nats-url", server.url, cwd=REPO,
                    stderr=asyncio.subprocess.DEVNULL))
        try:
            await wait_ready(admin, engines, 1 if args.inprocess else args.replicas)
            producer = await nats.connect(server.url, name="bench-producer")
            await measure_latency(producer, arrivals, 50)  # warm-up
            e2e, base = await measure_latency(producer, arrivals, args.latency_requests)
            rtt = await measure_rtt(producer, engine_nc)
            drain = [await measure_backlog(producer, arrivals, engines, 1000) for _ in range(3)]
            rate, full = await measure_sustained(producer, arrivals, args.seconds, args.producers, args.window)
            report(args, rtt, e2e, base, drain, rate, full)
            await producer.close()
        finally:
            if scheduler is not None:
                await scheduler.stop()
                await sched_nc.drain()
            for child in children:
                child.terminate()
                await child.wait()
            for e in engines:
                await e.stop()
            await engine_nc.close()
            await admin.close()


def report(args, rtt: list[float], e2e: list[float], base: list[float], drain: list[float], rate: float,
           full: int) -> None:
    ms = lambda xs, q: percentile(xs, q) * 1e3  # noqa: E731
    added = [a - b for a, b in zip(e2e, base, strict=True)]
    where = "in-process" if args.inprocess else f"{args.replicas} replica process(es)"
    print(f"\nscheduler ({where}), {args.engines} engine doubles x {args.slots} slots, 2-core host\n")
    print(f"{'measure':<52} {'value':>12}")
    print(f"{'-' * 52} {'-' * 12}")
    print(f"{'plain core request/reply round trip, p50 (context)':<52} {ms(rtt, 50):>9.3f} ms")
    print(f"{'publish -> core subscriber, p50 (baseline)':<52} {ms(base, 50):>9.3f} ms")
    print(f"{'publish -> engine receives dispatch, p50':<52} {ms(e2e, 50):>9.3f} ms")
    print(f"{'publish -> engine receives dispatch, p99':<52} {ms(e2e, 99):>9.3f} ms")
    print(f"{'added by the scheduler (dispatch - baseline), p50':<52} {ms(added, 50):>9.3f} ms")
    print(f"{'added by the scheduler (dispatch - baseline), p99':<52} {ms(added, 99):>9.3f} ms")
    print(f"{'backlog of 1000 routed, req/s (best of 3)':<52} {1000 / min(drain):>12,.0f}")
    print(f"{'backlog of 1000 routed, req/s (median of 3)':<52} {1000 / statistics.median(drain):>12,.0f}")
    print(f"{f'sustained, {args.producers} producers, <= {args.window} queued, req/s':<52} {rate:>12,.0f}")
    if full:
        print(f"{'  publishes refused as queue full':<52} {full:>12,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--producers", type=int, default=32)
    p.add_argument("--window", type=int, default=500, help="most requests queued at once in the sustained phase")
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--inprocess", action="store_true", help="run the scheduler in this process (shares its CPU)")
    p.add_argument("--replicas", type=int, default=1, help="scheduler processes sharing the durable consumers")
    args = p.parse_args()
    if args.inprocess and args.replicas != 1:
        p.error("--inprocess runs exactly one scheduler")
    # SIGTERM (e.g. from `timeout`) unwinds normally, so the private nats-server is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
