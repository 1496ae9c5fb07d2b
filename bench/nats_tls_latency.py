"""What TLS costs on a loopback bus: core request/reply and acknowledged JetStream publishes.

    .venv/bin/python bench/nats_tls_latency.py [--rounds N] [--payload BYTES]

Starts two single-node nats-servers from ``infra/nats/server.conf`` (fsync ``always``, as
``./cy up``): one plain, one with the TLS block ``./cy up --nats-tls on`` writes (a fresh local CA
in a temporary directory). For each it measures, alternating plain and TLS rounds, the round trip
of a core request answered by a second connection (a scheduler offering a request to an engine)
and of an acknowledged JetStream publish (the edge queueing a request), and prints p50/p99 in
microseconds and the TLS/plain ratio. Connections are made once, so the handshake is not measured:
services connect once and keep the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from services.cli.up import NATS_CONFIG  # noqa: E402
from services.common import nats_tls  # noqa: E402
from services.common.bus import NatsOptions, connect_kwargs  # noqa: E402
from services.common.natsserver import NatsServer  # noqa: E402

SUBJECT = "bench.tls.echo"
STREAM, STREAM_SUBJECT = "BENCH_TLS", "bench.tls.store"


async def _round(url: str, ca: str, rounds: int, payload: bytes) -> tuple[list[float], list[float]]:
    """Request/reply and JetStream publish latencies (seconds) against one server."""
    kwargs = connect_kwargs(NatsOptions(nats_url=url, nats_tls_ca=ca))
    client, server = await nats.connect(**kwargs), await nats.connect(**kwargs)
    try:
        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await server.subscribe(SUBJECT, cb=echo)
        await server.flush()
        js = client.jetstream()
        await js.add_stream(name=STREAM, subjects=[STREAM_SUBJECT], max_msgs=10_000)
        requests, publishes = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            await client.request(SUBJECT, payload, timeout=5)
            requests.append(time.perf_counter() - start)
            start = time.perf_counter()
            await js.publish(STREAM_SUBJECT, payload)
            publishes.append(time.perf_counter() - start)
        return requests, publishes
    finally:
        await client.close()
        await server.close()


def _stats(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99) - 1] * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per kind per server (default: 2000)")
    parser.add_argument("--payload", type=int, default=1024, help="message size in bytes (default: 1024)")
    parser.add_argument("--alternations", type=int, default=3, help="plain/TLS rounds, alternated (default: 3)")
    args = parser.parse_args()
    payload = b"x" * args.payload
    with tempfile.TemporaryDirectory(prefix="cy-tls-bench-") as tmp:
        files = nats_tls.ensure_local_tls(Path(tmp) / "tls", nats_tls.wanted_sans())
        servers = {
            "plain": (NatsServer(Path(tmp) / "plain", config=NATS_CONFIG, sync="always"), ""),
            "tls": (NatsServer(Path(tmp) / "tls-node", config=NATS_CONFIG, sync="always", tls=True,
                               node_config=nats_tls.node_config(None, tls=files)), str(files.ca)),
        }
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in servers}
        try:
            for server, _ in servers.values():
                server.start()
            for _ in range(args.alternations):
                for name, (server, ca) in servers.items():
                    requests, publishes = await _round(server.url, ca, args.rounds // args.alternations, payload)
                    results[name][0].extend(requests)
                    results[name][1].extend(publishes)
        finally:
            for server, _ in servers.values():
                server.stop()
    print(f"{args.rounds} round trips per kind, {args.payload}-byte payload, loopback, fsync always")
    print(f"{'':28}{'plain p50/p99 µs':>20}{'TLS p50/p99 µs':>20}{'TLS/plain p50':>15}")
    for index, kind in enumerate(("core request/reply", "JetStream publish+ack")):
        plain, tls = _stats(results["plain"][index]), _stats(results["tls"][index])
        print(f"{kind:28}{plain[0]:>9.0f}/{plain[1]:<10.0f}{tls[0]:>9.0f}/{tls[1]:<10.0f}{tls[0] / plain[0]:>14.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
