"""Progress of a long operator command: a redrawn bar on a terminal, plain lines otherwise.

Plain lines (one per finished step) keep logs and CI output readable, where a bar's carriage
returns would be noise.
"""

from __future__ import annotations

import sys
from typing import TextIO

BAR_WIDTH = 28


def human_bytes(n: float) -> str:
    """``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class TransferProgress:
    """Bytes done out of ``total_bytes`` (0: unknown) over ``steps`` named steps."""

    def __init__(self, verb: str, steps: int, total_bytes: int = 0, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.verb, self.steps, self.total = verb, steps, total_bytes
        self.step, self.done_bytes, self.name = 0, 0, ""

    def begin(self, name: str) -> None:
        """A step starts (one stream)."""
        self.step += 1
        self.name = name
        self._draw()

    def advance(self, n: int) -> None:
        """``n`` more bytes moved."""
        self.done_bytes += n
        if self.tty:
            self._draw()

    def end(self, detail: str = "") -> None:
        """The current step finished; ``detail`` says what it held."""
        if self.tty:
            self._draw()
        else:
            print(f"cy: {self.verb} {self.step}/{self.steps} {self.name}: {detail}", file=self.out, flush=True)

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            print(file=self.out, flush=True)

    def _draw(self) -> None:
        if not self.tty:
            return
        if self.total:
            frac = min(1.0, self.done_bytes / self.total)
            bar = "#" * int(frac * BAR_WIDTH)
            amount = f"{frac:4.0%} {human_bytes(self.done_bytes)}/{human_bytes(self.total)}"
        else:
            bar = "#" * int(BAR_WIDTH * max(0, self.step - 1) / max(1, self.steps))
            amount = human_bytes(self.done_bytes)
        line = f"\r{self.verb} [{bar:<{BAR_WIDTH}}] {amount} {self.step}/{self.steps} {self.name}"
        print(f"{line:<100}", end="", file=self.out, flush=True)
