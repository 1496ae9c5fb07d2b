"""Child processes of ``./cy up``: start them, capture their output, notice deaths, stop in order.

Each child runs in its own session (process group), so a Ctrl-C on the terminal reaches only
the launcher, which then stops the children one by one in a fixed order: SIGTERM, up to
``stop_timeout`` seconds for a graceful exit, then SIGKILL of the child's whole group.
A child's stdout and stderr go to ``<log_dir>/<name>.log`` and, prefixed, to the console.

A child started unwatched (one on probation, such as a replacement engine still loading) is not
reported by ``wait_any_exit`` until ``watch``; a retired child is stopped on purpose, so its exit
is no death either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_READ_CHUNK = 64 * 1024
# After a child has exited, how long its pipe may stay open (held by a stray grandchild).
_PIPE_GRACE_S = 2.0
_PREFIX_WIDTH = len("[scheduler]")


def report_stderr(message: str) -> None:
    """Default reporter: one ``cy:`` line on stderr."""
    print(f"cy: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ChildSpec:
    """What to run: a service name (also its log file name) and its argv."""

    name: str
    argv: tuple[str, ...]


class Child:
    """One started child process and the task copying its output to the log (and console)."""

    def __init__(self, spec: ChildSpec, proc: asyncio.subprocess.Process, log_path: Path,
                 pump: asyncio.Task[None]) -> None:
        self.spec = spec
        self.proc = proc
        self.log_path = log_path
        self.pump = pump

    @property
    def name(self) -> str:
        """The service name."""
        return self.spec.name

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), or None while running."""
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log, to show why it died."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def describe_exit(returncode: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # not a known signal number
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    """Starts named children and stops them in a given order; one instance per ``./cy up``."""

    def __init__(self, log_dir: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 console: TextIO | None = sys.stdout, stop_timeout: float = 15.0,
                 report: Callable[[str], None] = report_stderr) -> None:
        self.log_dir = log_dir
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.console = console
        self.stop_timeout = stop_timeout
        self.report = report
        self.children: dict[str, Child] = {}
        self._watched: set[str] = set()
        self._changed = asyncio.Event()  # the watched set changed: wait_any_exit looks again

    async def start(self, spec: ChildSpec, *, watched: bool = True) -> Child:
        """Start ``spec`` in its own process group, its output piped to its log (and the console).

        ``watched``: whether its exit is a death ``wait_any_exit`` reports (see ``watch``).
        """
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} was already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        proc = await asyncio.create_subprocess_exec(
            *spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True)
        header = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started pid {proc.pid}: {shlex.join(spec.argv)}\n"
        assert proc.stdout is not None  # stdout=PIPE above
        pump = asyncio.create_task(self._pump(spec.name, proc.stdout, log_path, header.encode()),
                                   name=f"pump-{spec.name}")
        child = Child(spec, proc, log_path, pump)
        self.children[spec.name] = child
        self.report(f"started {spec.name} (pid {proc.pid}, log {log_path})")
        if watched:
            self.watch(spec.name)
        return child

    def watch(self, name: str) -> None:
        """From now on, ``name`` exiting is a death ``wait_any_exit`` reports."""
        self._watched.add(name)
        self._changed.set()

    async def retire(self, name: str) -> int:
        """Stop ``name`` on purpose (no death to report) and forget it; its exit status."""
        self._watched.discard(name)
        self._changed.set()
        code = await self.stop(name)
        del self.children[name]
        return code

    async def _pump(self, name: str, stream: asyncio.StreamReader, log_path: Path, header: bytes) -> None:
        prefix = f"[{name}]".ljust(_PREFIX_WIDTH) + " "
        pending = b""
        with log_path.open("ab") as log:
            log.write(header)
            log.flush()
            while True:
                chunk = await stream.read(_READ_CHUNK)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                self._echo(prefix, lines)
            if pending:
                self._echo(prefix, [pending])

    def _echo(self, prefix: str, lines: list[bytes]) -> None:
        if self.console is None or not lines:
            return
        try:
            self.console.write("".join(f"{prefix}{line.decode(errors='replace')}\n" for line in lines))
            self.console.flush()
        except BrokenPipeError:  # e.g. `./cy up | head` ended: keep draining the child into its log
            self.console = None

    async def wait_any_exit(self) -> Child:
        """Return the first watched child that exits (or one that already has)."""
        while True:
            self._changed.clear()
            watched = [c for name, c in self.children.items() if name in self._watched]
            if not watched:
                raise RuntimeError("no children to wait for")
            waits = {asyncio.create_task(c.proc.wait(), name=f"wait-{c.name}"): c for c in watched}
            changed = asyncio.create_task(self._changed.wait())
            try:
                done, _ = await asyncio.wait([*waits, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in [*waits, changed]:
                    task.cancel()
            exited = [waits[task] for task in done if task in waits and waits[task].name in self._watched]
            if exited:
                return exited[0]

    async def stop(self, name: str) -> int:
        """Stop one child (SIGTERM, then SIGKILL of its group after ``stop_timeout``); its exit status."""
        child = self.children[name]
        if child.returncode is None:
            self.report(f"stopping {name} (pid {child.proc.pid})")
            _signal_process(child.proc.pid, signal.SIGTERM)
            try:
                code = await asyncio.wait_for(child.proc.wait(), self.stop_timeout)
            except TimeoutError:
                self.report(f"{name} did not exit within {self.stop_timeout:g} s: killing it")
                _signal_group(child.proc.pid, signal.SIGKILL)
                code = await child.proc.wait()
            self.report(f"{name} stopped ({describe_exit(code)})")
        await self._finish_pump(child)
        return await child.proc.wait()  # already exited: returns its status at once

    async def _finish_pump(self, child: Child) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(child.pump), _PIPE_GRACE_S)
        except TimeoutError:
            # A grandchild still holds the pipe open: it belongs to the stopped service, end it.
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.pump.cancel()

    async def stop_all(self, order: Iterable[str] = ()) -> dict[str, int]:
        """Stop the children named in ``order`` one after another, then any others; exit statuses."""
        names = [n for n in order if n in self.children]
        names += [n for n in self.children if n not in names]
        return {name: await self.stop(name) for name in names}


def _signal_process(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited between the check and the signal
        os.kill(pid, sig)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
        os.killpg(pid, sig)
