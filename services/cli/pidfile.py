"""The pid file of a running ``./cy up`` (``<state dir>/cy-up.pid``), ``./cy down``, and what a
crashed run leaves behind.

The file holds one line, the launcher's pid, so ``kill $(cat .cy/cy-up.pid)`` works too.
A pid is only trusted if that process still looks like the launcher (pids get reused), so the
pid file of a run that was killed (SIGKILL, power loss) does not stop the next ``./cy up``. The
scratch directories of its dead trainers (downloads, checkpoints already uploaded) are removed
at the next start: the job resumes from the checkpoint in the object store, not from them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from schemas.names import slug
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


def remove_dead_trainer_scratch(state_dir: Path) -> list[Path]:
    """Remove ``<state dir>/trainer/<id>`` of every default-named trainer of this host whose process is
    gone (``trainer-<host>-<pid>``, as ``./cy up`` starts them); the directories removed.

    A directory whose pid is alive (the trainer, or a process that reused its pid) or whose name
    is not a default trainer id of this host (``--trainer-id``) is left alone.
    """
    root = state_dir / "trainer"
    removed = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        pid = _default_trainer_pid(entry.name)
        if pid is not None and entry.is_dir() and not psutil.pid_exists(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _default_trainer_pid(trainer_id: str) -> int | None:
    """The pid in a trainer's default id (``slug("trainer-<host>-<pid>")``), if ``trainer_id`` is one."""
    host = socket.gethostname()
    for part in trainer_id.split("-"):
        if part.isdigit() and slug(f"trainer-{host}-{part}") == trainer_id:
            return int(part)
    return None


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
