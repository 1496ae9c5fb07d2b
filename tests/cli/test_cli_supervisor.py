"""The process supervisor of ./cy up, with stand-in child processes (plain Python one-liners)."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import time
from pathlib import Path

from services.cli.supervisor import ChildSpec, Supervisor, describe_exit

# A stand-in service: says "ready" once its SIGTERM handler is in place, records the order in
# which it was stopped, and exits 0 on SIGTERM (or ignores SIGTERM, or dies by itself).
SERVICE = r"""
import signal, sys, time
name, record, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def on_term(signum, frame):
    with open(record, "a") as f:
        f.write(name + "\n")
    print(name, "stopping", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
print(name, "ready", flush=True)
if mode == "dies":
    time.sleep(0.3)
    print(name, "fatal: cannot load the model", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(60)
"""


def spec(name: str, record: Path, mode: str = "normal") -> ChildSpec:
    """A stand-in child named ``name``."""
    return ChildSpec(name, (sys.executable, "-c", SERVICE, name, str(record), mode))


async def wait_until_ready(sup: Supervisor, name: str, timeout: float = 10.0) -> None:
    """Wait until the child has logged ``<name> ready`` (its SIGTERM handler is in place)."""
    deadline = time.monotonic() + timeout
    path = sup.children[name].log_path
    while not (path.exists() and f"\n{name} ready\n" in path.read_text()):
        assert time.monotonic() < deadline, f"{name} never said it was ready"
        await asyncio.sleep(0.02)


async def test_children_stop_one_by_one_in_the_given_order(tmp_path: Path):
    record = tmp_path / "stopped"
    sup = Supervisor(tmp_path / "logs", console=None, report=lambda m: None)
    for name in ("engine", "scheduler", "edge"):
        await sup.start(spec(name, record))
    for name in ("engine", "scheduler", "edge"):
        await wait_until_ready(sup, name)

    codes = await sup.stop_all(("edge", "scheduler", "engine"))

    assert record.read_text().split() == ["edge", "scheduler", "engine"]
    assert codes == {"edge": 0, "scheduler": 0, "engine": 0}
    assert "edge stopping" in (tmp_path / "logs" / "edge.log").read_text()


async def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path):
    messages: list[str] = []
    sup = Supervisor(tmp_path / "logs", console=None, stop_timeout=0.5, report=messages.append)
    await sup.start(spec("engine", tmp_path / "stopped", "stubborn"))
    await wait_until_ready(sup, "engine")

    codes = await sup.stop_all()

    # Killed (SIGKILL), not left to end its 60 s sleep by itself (that would be exit 0).
    assert codes == {"engine": -9}
    assert any("did not exit within 0.5 s" in m for m in messages)


async def test_the_first_child_to_die_is_reported_with_its_log(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", console=None, report=lambda m: None)
    await sup.start(spec("scheduler", tmp_path / "stopped"))
    await sup.start(spec("engine", tmp_path / "stopped", "dies"))

    died = await asyncio.wait_for(sup.wait_any_exit(), 10)

    assert died.name == "engine"
    assert died.returncode == 3
    assert describe_exit(died.returncode) == "exit code 3"
    await sup.stop_all()
    assert "fatal: cannot load the model" in died.log_tail()
    assert sup.children["scheduler"].returncode == 0


async def test_a_retired_child_is_no_death_and_a_child_watched_later_is(tmp_path: Path):
    record = tmp_path / "stopped"
    sup = Supervisor(tmp_path / "logs", console=None, report=lambda m: None)
    await sup.start(spec("engine", record))
    await wait_until_ready(sup, "engine")
    waiting = asyncio.ensure_future(sup.wait_any_exit())  # as ./cy up waits while it serves
    # A replacement on probation: its death would not be reported until it is watched.
    await sup.start(spec("engine-llamacpp", record), watched=False)
    await wait_until_ready(sup, "engine-llamacpp")
    sup.watch("engine-llamacpp")

    assert await sup.retire("engine") == 0

    assert "engine" not in sup.children and not waiting.done()
    sup.children["engine-llamacpp"].proc.kill()
    died = await asyncio.wait_for(waiting, 10)
    assert died.name == "engine-llamacpp" and died.returncode == -9
    await sup.stop_all()


async def test_an_unwatched_child_dying_is_not_reported(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", console=None, report=lambda m: None)
    await sup.start(spec("scheduler", tmp_path / "stopped"))
    await wait_until_ready(sup, "scheduler")
    probation = await sup.start(spec("engine-llamacpp", tmp_path / "stopped", "dies"), watched=False)
    waiting = asyncio.ensure_future(sup.wait_any_exit())

    assert await asyncio.wait_for(probation.proc.wait(), 10) == 3
    await asyncio.sleep(0)  # let the waiter see the exit, were it watching
    assert not waiting.done()
    sup.children["scheduler"].proc.terminate()
    assert (await asyncio.wait_for(waiting, 10)).name == "scheduler"
    await sup.stop_all()


async def test_output_goes_to_the_log_and_prefixed_to_the_console(tmp_path: Path):
    console = io.StringIO()
    sup = Supervisor(tmp_path / "logs", console=console, report=lambda m: None)
    await sup.start(spec("edge", tmp_path / "stopped"))
    await wait_until_ready(sup, "edge")
    await sup.stop_all()

    assert re.search(r"^\[edge\] +edge ready$", console.getvalue(), re.MULTILINE)
    log = (tmp_path / "logs" / "edge.log").read_text()
    assert log.startswith("--- ") and "started pid" in log
    assert "edge ready\nedge stopping\n" in log


def test_describe_exit_names_the_signal():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(0) == "exit code 0"
