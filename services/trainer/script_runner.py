"""The seed documents' custom training script, run safely: off unless the trainer allows it,
admin scope only (checked by the edge), a subprocess with a wall-clock and memory limit.

The script gets its inputs in the environment and writes its result to ``CY_OUTPUT_DIR``: a
peft adapter (``adapter_config.json``) or a whole model (``config.json``). Each line it prints
becomes a job event; cancel or the time limit kill its whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from services.trainer.pipeline import JobFailed

_MAX_EVENT_LINES = 1000  # lines relayed as events; the rest only count
_POLL = 0.5


@dataclass(frozen=True)
class ScriptLimits:
    """How long and how much memory a script may use."""

    timeout: float
    memory_bytes: int


def script_env(*, job_id: str, base_model: Path, training_file: Path, output_dir: Path, job_json: bytes) -> dict:
    """The environment a script runs with (the parent's, minus nothing, plus its inputs)."""
    return os.environ | {"CY_JOB_ID": job_id, "CY_BASE_MODEL_PATH": str(base_model),
                         "CY_TRAINING_FILE": str(training_file), "CY_OUTPUT_DIR": str(output_dir),
                         "CY_JOB_JSON": job_json.decode(), "PYTHONUNBUFFERED": "1"}


def _limit_memory(limit: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


async def run_script(script: Path, args: list[str], env: dict, limits: ScriptLimits, *,
                     on_line: Callable[[str], Awaitable[None]], should_stop: Callable[[], bool]) -> bool:
    """Run ``script`` to its end; True if it finished, False if stopped (cancel). Raises ``JobFailed``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args, env=env, cwd=env["CY_OUTPUT_DIR"], stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        preexec_fn=_limit_memory(limits.memory_bytes))
    tail: deque[str] = deque(maxlen=20)
    reader = asyncio.create_task(_relay(proc, tail, on_line))
    try:
        async with asyncio.timeout(limits.timeout):
            while proc.returncode is None:
                if should_stop():
                    _kill(proc)
                    await proc.wait()
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL):
                        await proc.wait()
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        raise JobFailed("script_timeout", f"the training script ran longer than {limits.timeout:g} s and was "
                        "stopped", "script") from None
    finally:
        await reader
    if proc.returncode != 0:
        why = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else \
            f"exit status {proc.returncode}"
        raise JobFailed("script_failed", f"the training script failed ({why}); its last output:\n" + "\n".join(tail),
                        "script")
    return True


async def _relay(proc, tail: deque[str], on_line: Callable[[str], Awaitable[None]]) -> None:
    sent = 0
    while line := await proc.stdout.readline():
        text = line.decode(errors="replace").rstrip()
        tail.append(text)
        if text and sent < _MAX_EVENT_LINES:
            sent += 1
            await on_line(text)


def _kill(proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def result_kind(out: Path) -> str:
    """``adapter`` or ``full`` from what the script wrote; ``JobFailed`` when it wrote neither."""
    if (out / "adapter_config.json").exists():
        return "adapter"
    if (out / "config.json").exists():
        return "full"
    raise JobFailed("script_no_result", "the training script finished without writing an adapter "
                    "(adapter_config.json) or a model (config.json) to CY_OUTPUT_DIR", "script")
