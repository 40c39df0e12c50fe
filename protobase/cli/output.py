"""How commands report to the terminal: progress lines on stderr, byte counts for people.

Runs in the process of the `protobase` command. Invariant: progress goes to
stderr (rewritten in place on a terminal, a line every few seconds
otherwise), so that stdout carries only a command's result.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]


class Progress:
    """A counter line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, what: str, stream: TextIO | None = None, every: float | None = None) -> None:
        self.what = what  # what is counted, the start of the line
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()  # rewrite the line in place
        self.every = every if every is not None else (0.2 if self.tty else 2.0)  # seconds between lines
        self.count = 0
        self.started = time.monotonic()
        self._shown = self.started  # when the line was last written

    def add(self, count: int = 1, detail: str = "") -> None:
        """Count `count` more; show the line if it was not shown for `every` seconds."""
        self.count += count
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            self._show(detail)

    def _show(self, detail: str, final: bool = False) -> None:
        line = f"{self.what}: {self.count:,}{' ' + detail if detail else ''} ({time.monotonic() - self.started:.1f}s)"
        if self.tty:
            print(f"\r{line}\033[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def done(self, detail: str = "") -> None:
        """Show the final count, ending the line."""
        self._show(detail, final=True)


def human_bytes(count: int) -> str:
    """`count` bytes in B, KiB, MiB or GiB with one decimal: 1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
