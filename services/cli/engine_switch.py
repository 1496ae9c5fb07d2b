"""``./cy up --engine auto`` on a first run: build llama.cpp in the background, then switch engines.

The platform serves with transformers while llama-cpp-python compiles (at the lowest CPU
priority, its output in ``<state>/logs/llamacpp-build.log`` and its progress in ``up``'s
output). When the build succeeds, the switch is make-before-break, so no request is lost or cut:

1. the llama.cpp engine starts as a second child under its own worker id and NATS identity,
   unwatched (its failing to load is no death of the platform);
2. once its heartbeat says it serves the model, healthy and not draining, the schedulers route to
   it too (they prefer it: it is the faster engine);
3. the transformers engine is retired: SIGUSR1 makes it advertise ``draining`` (no scheduler
   sends it more work) while its in-flight streams finish at their own pace, however slow; once its
   heartbeat shows none in flight, SIGTERM stops it.

If the build or the new engine fails, transformers keeps serving and ``up`` says why.

Prometheus scrapes the engine at one fixed port (``--metrics-port`` + 1, the target in
``infra/prometheus/targets/engine.yml``), which the old engine holds while it drains: its own
metrics stay visible until it exits. The new engine gets the same port with
``--metrics-port-takeover`` and binds it as soon as it is free (it retries while the port is in
use), so after the switch the same target serves the llama.cpp engine's metrics. Any other design
(a second port) would need a second scrape target that is dead most of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nats.errors import Error as NatsError

from schemas import names
from schemas.heartbeat import EngineHeartbeat, Health
from services.cli.engine_auto import LlamaCppSetup
from services.cli.errors import CliError
from services.cli.infra import connect_once
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.bus import NatsOptions

# The supervisor's name (and log file) of the engine started by the switch.
SWITCH_CHILD = "engine-llamacpp"
BUILD_LOG = "llamacpp-build.log"

_heartbeat = msgspec.json.Decoder(EngineHeartbeat)


@dataclass(frozen=True)
class Switch:
    """One planned switch: how to build, what to start, what to retire, where to watch for readiness."""

    setup: LlamaCppSetup
    build_log: Path
    spec: ChildSpec      # the llama.cpp engine's child
    worker: str          # its worker id (heartbeats)
    model: str           # the model it must serve before the old engine goes
    retire: str          # the supervisor's name of the engine it replaces
    retire_worker: str   # that engine's worker id
    nats: NatsOptions
    nkey: str = ""       # a bus identity allowed to hear heartbeats (the operator's)
    ready_timeout: float = 300.0
    drain_timeout: float = 900.0  # the longest wait for the old engine's streams before SIGTERM anyway
    metrics_port: int = 0  # the engine's Prometheus port, the new engine's once the old one has exited (0: none)


async def build_and_switch(switch: Switch, supervisor: Supervisor, report: Callable[[str], None]) -> bool:
    """Build llama-cpp-python, start the llama.cpp engine, retire the old one; whether the switch happened."""
    report(f"llama.cpp: building llama-cpp-python in the background (several minutes, log {switch.build_log}); "
           "transformers keeps serving meanwhile")
    started = time.monotonic()
    code = await _build(switch.setup.install, switch.build_log, report, started)
    if code != 0:
        report(f"llama.cpp: the build failed (exit {code}; log {switch.build_log}): staying on transformers")
        return False
    if not await asyncio.to_thread(switch.setup.usable):
        report(f"llama.cpp: built, but llama-cpp-python still does not import (log {switch.build_log}): "
               "staying on transformers")
        return False
    report(f"llama.cpp: built in {time.monotonic() - started:.0f} s; starting the llama.cpp engine")
    child = await supervisor.start(switch.spec, watched=False)
    why_not = await _wait_beat(switch, switch.worker, lambda b: _serving(b, switch.model), switch.ready_timeout,
                               child.proc)
    if why_not:
        report(f"llama.cpp: the new engine did not serve: {why_not} (log {child.log_path}); staying on transformers")
        await supervisor.retire(switch.spec.name)
        return False
    supervisor.watch(switch.spec.name)
    report(f"llama.cpp: engine {switch.worker} serves {switch.model}; {switch.retire_worker} takes no more work "
           "and finishes its requests in flight")
    old = supervisor.children[switch.retire].proc
    with contextlib.suppress(ProcessLookupError):
        old.send_signal(signal.SIGUSR1)
    if why_not := await _wait_beat(switch, switch.retire_worker, lambda b: b.draining and b.in_flight == 0,
                                   switch.drain_timeout, old):
        report(f"llama.cpp: waiting for {switch.retire} to finish its requests {why_not}: stopping it anyway")
    await supervisor.retire(switch.retire)
    metrics = f" (its Prometheus metrics on :{switch.metrics_port}, free now)" if switch.metrics_port else ""
    report(f"llama.cpp: switched; {switch.worker} serves alone now{metrics}")
    return True


async def _build(command: str, log_path: Path, report: Callable[[str], None], started: float) -> int:
    """Run the install ``command``, its output to ``log_path``, each line also reported as progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None  # stdout=PIPE above
    try:
        with log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {command}\n".encode())
            async for raw in proc.stdout:
                log.write(raw)
                log.flush()
                if line := raw.decode(errors="replace").strip():
                    report(f"llama.cpp build [{time.monotonic() - started:.0f} s]: {line}")
        return await proc.wait()
    finally:
        if proc.returncode is None:  # up is stopping mid-build: the compiler goes with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())


def _serving(beat: EngineHeartbeat, model: str) -> bool:
    return (not beat.draining and beat.health == Health.OK.value
            and any(m.id == model for m in beat.models))


async def _wait_beat(switch: Switch, worker: str, wanted: Callable[[EngineHeartbeat], bool], timeout: float,
                     proc: asyncio.subprocess.Process) -> str:
    """Wait until ``worker`` heartbeats a status ``wanted`` accepts; why not (exit, timeout, no bus), or ''."""
    try:
        nc = await connect_once(switch.nats, "cy-engine-switch", nkey=switch.nkey)
    except CliError as exc:
        return f"could not be watched ({exc})"
    seen = asyncio.Event()

    async def on_beat(msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            if wanted(_heartbeat.decode(msg.data)):
                seen.set()

    try:
        await nc.subscribe(names.worker_status(worker), cb=on_beat)
        waits = [asyncio.ensure_future(seen.wait()), asyncio.ensure_future(proc.wait())]
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for future in waits:
            future.cancel()
        if seen.is_set():
            return ""
        return f"exited ({proc.returncode})" if done else f"timed out after {timeout:g} s"
    finally:
        with contextlib.suppress(NatsError, asyncio.TimeoutError):
            await nc.close()
