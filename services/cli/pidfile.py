"""The pid file of a running ``./cy up`` (``<state dir>/cy-up.pid``) and ``./cy down``.

The file holds one line, the launcher's pid, so ``kill $(cat .cy/cy-up.pid)`` works too.
A pid is only trusted if that process still looks like the launcher (pids get reused).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from services.cli.errors import CliError

PID_FILE_NAME = "cy-up.pid"


def pid_file(state_dir: Path) -> Path:
    """Where ``./cy up`` with this state directory writes its pid."""
    return state_dir / PID_FILE_NAME


def read_pid(path: Path) -> int | None:
    """The pid in ``path``, or None if the file is missing or garbled."""
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def running_launcher(pid: int) -> psutil.Process | None:
    """The process ``pid`` if it is alive and is a ``cy up`` launcher, else None."""
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # someone else's process: certainly not our launcher
        return None
    is_cli = "services.cli" in argv or any(Path(a).name == "cy-llm" for a in argv[:2])
    return proc if is_cli and "up" in argv else None


@contextmanager
def claim(state_dir: Path) -> Iterator[Path]:
    """Write this process's pid for the duration of the block; refuse if a launcher already runs."""
    path = pid_file(state_dir)
    other = read_pid(path)
    if other is not None and other != os.getpid() and running_launcher(other):
        raise CliError(f"./cy up is already running with state dir {state_dir} (pid {other}); "
                       "stop it with ./cy down first")
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield path
    finally:
        if read_pid(path) == os.getpid():
            path.unlink()


def stop_launcher(state_dir: Path, timeout: float) -> str:
    """SIGTERM the launcher named in the pid file and wait for it to exit; what happened, as text."""
    path = pid_file(state_dir)
    pid = read_pid(path)
    if pid is None:
        return f"nothing is running (no pid file at {path})"
    proc = running_launcher(pid)
    if proc is None:
        path.unlink(missing_ok=True)
        return f"nothing is running (pid {pid} in {path} is gone; removed the stale pid file)"
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        raise CliError(f"./cy up (pid {pid}) is still stopping after {timeout:g} s; "
                       f"see the logs in {state_dir / 'logs'}") from None
    return f"stopped ./cy up (pid {pid})"
