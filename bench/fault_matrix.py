"""The fault matrix under load: each fault in turn on a live platform, and what clients noticed.

    .venv/bin/python bench/fault_matrix.py [--hold 4] [--net-hold 12] [--concurrency 8] [--only NAME ...]

The platform: one NATS node, 2 simulated engines (``--engine simulated`` at ``--sim-token-rate``
tokens/s per request), 2 schedulers and 1 edge, started as processes with a ``Supervisor`` like
``./cy up`` starts them. ``tests/load_support.Load`` keeps ``--concurrency`` streaming clients
busy (each answer checked word for word; a client pauses 0.2 s after a failure instead of retrying
at once). Faults, one after another, each followed by a settling
period until ``2 x concurrency`` requests that started after the recovery have ended:

- ``<kind> SIGKILL``: engine-0 / scheduler-0 / the edge killed, restarted after ``--hold`` s;
- ``<kind> SIGSTOP``: the same process frozen for ``--hold`` s, then SIGCONT;
- ``engine network loss``: engine-0 reaches NATS through ``bench/tcp_cut.CuttableLink``; every
  byte on that link is lost for ``--net-hold`` s (longer than the heartbeat TTL), then it is reset;
- ``full queue``: both schedulers frozen and the inference stream's ``max_msgs`` lowered to
  ``concurrency / 2`` for ``--hold`` s: the stream at its bound refuses new requests (429).

The trainer is left out: its faults (SIGKILL mid-job, resume from the checkpoint) are covered by
tests/trainer and tests/e2e/test_e2e_platform_crash.py and would not change the serving load.
For every fault it prints one row: requests in flight when it struck, requests that overlapped
it, failed, wrong text (a duplicated or missing token shows here), the longest silence a client
saw, and the failures by kind (HTTP status, the typed error code of an SSE error event, or the
connection error). JSON rows go to stderr for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from bench.tcp_cut import CuttableLink  # noqa: E402
from infra import provision  # noqa: E402
from schemas import names  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.cli.supervisor import ChildSpec, Supervisor  # noqa: E402
from services.cli.up import NATS_CONFIG  # noqa: E402
from services.common.natsserver import NatsServer, free_ports  # noqa: E402
from tests.load_support import Load, Outcome  # noqa: E402

MODEL = "sim"
RETRY_PAUSE_S = 0.2
KINDS = {"engine": "engine-0", "scheduler": "scheduler-0", "edge": "edge"}


class Platform:
    """NATS, engines (engine-0 behind a cuttable link), schedulers and an edge, as processes."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=10)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: NatsServer | None = None
        self.link: CuttableLink | None = None
        self.specs: dict[str, ChildSpec] = {}

    async def start(self) -> None:
        """Everything up and the edge listing the model."""
        self.server = NatsServer(self.tmp / "nats", config=NATS_CONFIG, log_file=self.tmp / "nats.log").start()
        self.nc = await nats.connect(self.server.url)
        await provision.apply(self.nc.jetstream())
        self.link = CuttableLink(int(self.server.url.rsplit(":", 1)[1]))
        linked = f"nats://127.0.0.1:{await self.link.start()}"
        py = sys.executable
        for i in range(2):
            self.specs[f"engine-{i}"] = ChildSpec(f"engine-{i}", (
                py, "-m", "services.engine", "--nats-url", linked if i == 0 else self.server.url, "--engine",
                "simulated", "--model-id", MODEL, "--worker-id", f"fault-{i}", "--slots", "32",
                "--sim-token-rate", str(self.args.token_rate)))
        for i in range(2):
            self.specs[f"scheduler-{i}"] = ChildSpec(f"scheduler-{i}", (
                py, "-m", "services.scheduler", "--nats-url", self.server.url))
        self.specs["edge"] = ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", self.server.url,
                                                "--port", str(self.port)))
        for spec in self.specs.values():
            await self.sup.start(spec)
        await wait_until_ready(self.url, [MODEL], timeout=120)

    def pid(self, name: str) -> int:
        """The process id of child ``name``."""
        return self.sup.children[name].proc.pid

    async def kill(self, name: str) -> None:
        """SIGKILL child ``name`` and reap it."""
        child = self.sup.children[name]
        os.kill(child.proc.pid, signal.SIGKILL)
        await child.proc.wait()

    async def restart(self, name: str) -> None:
        """Start child ``name`` again (after it was killed); the edge is waited for until it serves."""
        self.sup.children.pop(name)
        await self.sup.start(self.specs[name])
        if name == "edge":
            await wait_until_ready(self.url, [MODEL], timeout=120)

    async def queue_bound(self, max_msgs: int) -> None:
        """Set the inference stream's ``max_msgs`` (its backpressure bound)."""
        js = self.nc.jetstream()
        info = await js.stream_info(names.INFER_STREAM)
        await js.update_stream(dataclasses.replace(info.config, max_msgs=max_msgs))

    async def stop(self) -> None:
        """Everything down, services first."""
        await self.sup.stop_all(("edge", "scheduler-0", "scheduler-1", "engine-0", "engine-1"))
        if self.link is not None:
            await self.link.close()
        await self.nc.close()
        if self.server is not None:
            self.server.stop()


class PacedLoad(Load):
    """``Load`` whose clients pause ``RETRY_PAUSE_S`` after a failure, as a client backing off would,
    so a fault's failure count is not a measure of how fast a refusal comes back."""

    async def _client(self) -> None:
        while not self.stopped:
            outcome = await self._one()
            self.outcomes.append(outcome)
            if outcome.error:
                await asyncio.sleep(RETRY_PAUSE_S)


Fault = Callable[[Platform, argparse.Namespace], Awaitable[None]]


def sigkill(kind: str) -> Fault:
    """Kill the ``kind``'s first process, wait ``--hold`` s, start it again."""
    async def fault(p: Platform, args: argparse.Namespace) -> None:
        await p.kill(KINDS[kind])
        await asyncio.sleep(args.hold)  # the platform runs without it meanwhile
        await p.restart(KINDS[kind])
    return fault


def sigstop(kind: str) -> Fault:
    """Freeze the ``kind``'s first process for ``--hold`` s (alive, silent), then let it go on."""
    async def fault(p: Platform, args: argparse.Namespace) -> None:
        pid = p.pid(KINDS[kind])
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(args.hold)
        finally:
            os.kill(pid, signal.SIGCONT)
    return fault


async def network_loss(p: Platform, args: argparse.Namespace) -> None:
    """Every byte between engine-0 and NATS lost for ``--net-hold`` s, then the link is back (reset)."""
    assert p.link is not None
    p.link.cut()
    try:
        await asyncio.sleep(args.net_hold)
    finally:
        p.link.restore()


async def full_queue(p: Platform, args: argparse.Namespace) -> None:
    """Both schedulers frozen and the queue bounded below the load: it fills, new requests are refused."""
    pids = [p.pid("scheduler-0"), p.pid("scheduler-1")]
    info = await p.nc.jetstream().stream_info(names.INFER_STREAM)
    await p.queue_bound(max(1, args.concurrency // 2))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(args.hold)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await p.queue_bound(info.config.max_msgs)


FAULTS: dict[str, Fault] = {
    "engine SIGKILL": sigkill("engine"), "engine SIGSTOP": sigstop("engine"),
    "scheduler SIGKILL": sigkill("scheduler"), "scheduler SIGSTOP": sigstop("scheduler"),
    "edge SIGKILL": sigkill("edge"), "edge SIGSTOP": sigstop("edge"),
    "engine network loss": network_loss, "full queue": full_queue,
}


def error_kind(outcome: Outcome) -> str:
    """A failure's kind: ``HTTP 429``, the typed code of an SSE error event, or the connection error."""
    error = outcome.error
    if error.startswith("HTTP "):
        status = error.split(":", 1)[0]
        try:
            code = json.loads(error.split(":", 1)[1])["error"].get("code")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            code = None
        return f"{status} {code}" if code else status
    if error.startswith("{"):
        try:
            return f"stream error {json.loads(error).get('code')}"
        except ValueError:
            return "stream error"
    return error.split(":", 1)[0]


def row(name: str, in_flight: int, outcomes: list[Outcome], expected: str) -> dict:
    """The table row of one fault."""
    failed = [o for o in outcomes if o.error]
    wrong = [o for o in outcomes if not o.error and o.text != expected]
    kinds = collections.Counter(error_kind(o) for o in failed)
    return {"fault": name, "in_flight": in_flight, "requests": len(outcomes), "failed": len(failed),
            "wrong_text": len(wrong), "longest_stall_s": round(max((o.longest_gap for o in outcomes), default=0), 2),
            "errors": dict(kinds)}


async def run_fault(p: Platform, load: Load, name: str, args: argparse.Namespace) -> dict:
    """Apply one fault under the running load, let it settle; its row."""
    await load.until_completed_after(time.monotonic(), args.concurrency)  # steady before the fault
    struck = time.monotonic()
    in_flight = load.in_flight
    await FAULTS[name](p, args)
    await load.until_completed_after(time.monotonic(), 2 * args.concurrency, timeout=180)
    settled = time.monotonic()
    overlapping = [o for o in load.outcomes if o.ended >= struck and o.started <= settled]
    return row(name, in_flight, overlapping, load.expected)


def print_table(rows: list[dict]) -> None:
    """The rows as a Markdown table."""
    print("| fault | in flight | requests | failed | wrong text | longest stall (s) | failures by kind |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r["errors"].items())) or "-"
        print(f"| {r['fault']} | {r['in_flight']} | {r['requests']} | {r['failed']} | {r['wrong_text']} | "
              f"{r['longest_stall_s']} | {kinds} |", flush=True)


async def main() -> None:
    """Start the platform and the load, run every fault (or ``--only`` these), print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hold", type=float, default=4.0, help="seconds a process stays killed/stopped")
    ap.add_argument("--net-hold", type=float, default=12.0, help="seconds the engine's NATS link loses every byte")
    ap.add_argument("--concurrency", type=int, default=8, help="streaming clients")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--token-rate", type=float, default=40.0, help="simulated engine: tokens/s per request")
    ap.add_argument("--only", nargs="*", choices=sorted(FAULTS), help="run only these faults")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cy-faults-") as tmp_name:
        platform = Platform(Path(tmp_name), args)
        rows = []
        try:
            await platform.start()
            load = PacedLoad(platform.url, MODEL, max_tokens=args.max_tokens, concurrency=args.concurrency)
            load.start()
            for name in args.only or FAULTS:
                rows.append(await run_fault(platform, load, name, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            await load.stop()
        finally:
            await platform.stop()
        print_table(rows)


if __name__ == "__main__":
    asyncio.run(main())
