"""Terminal output of the ``ckptd`` inspection commands: tables, sizes, a progress bar.

Kept free of any checkpoint logic so that every command prints the same way. The progress
bar draws on stderr only when stderr is a terminal, so pipes and logs never get carriage
returns, and stdout stays clean for ``--json`` and scripts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# Redraw at most this often: a restore may deliver thousands of chunks per second.
_REDRAW_INTERVAL_S = 0.1
_BAR_CELLS = 28


def format_bytes(count: int) -> str:
    """``1536`` → ``"1.5 KiB"``; exact for bytes."""
    value = float(count)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ratio(raw_bytes: int, stored_bytes: int) -> str:
    return f"{raw_bytes / stored_bytes:.1f}x" if stored_bytes else "-"


def format_world(world_size: int, missing_ranks: Sequence[int]) -> str:
    """A step's completeness: ``4/4``, ``3/4 missing 3``, or ``-`` without a world."""
    if not world_size:
        return "-"
    text = f"{world_size - len(missing_ranks)}/{world_size}"
    if missing_ranks:
        shown = ",".join(str(rank) for rank in missing_ranks[:8])
        text += f" missing {shown}" + ("..." if len(missing_ranks) > 8 else "")
    return text


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns separated by two spaces (numbers included: the columns
    hold units, and left alignment keeps each line greppable)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines)


class Progress:
    """A one-line progress bar: ``advance(n)`` as work completes, ``close()`` at the end.

    Draws nothing unless ``stream`` is a terminal (or ``enabled`` forces it).
    """

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO,
        *,
        unit: str = "bytes",
        enabled: bool | None = None,
    ) -> None:
        self._label = label
        self._total = max(total, 0)
        self._stream = stream
        self._unit = unit
        self._enabled = stream.isatty() if enabled is None else enabled
        self._done = 0
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, count: int = 1) -> None:
        self._done += count
        now = time.monotonic()
        if self._enabled and (now - self._last_draw >= _REDRAW_INTERVAL_S
                              or self._done >= self._total):
            self._last_draw = now
            self._draw()

    def set_label(self, label: str) -> None:
        self._label = label

    def close(self) -> None:
        """Erases the bar so that the next line starts clean."""
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _draw(self) -> None:
        fraction = min(self._done / self._total, 1.0) if self._total else 1.0
        filled = int(fraction * _BAR_CELLS)
        bar = "#" * filled + "." * (_BAR_CELLS - filled)
        if self._unit == "bytes":
            amount = f"{format_bytes(self._done)}/{format_bytes(self._total)}"
        else:
            amount = f"{self._done}/{self._total} {self._unit}"
        self._stream.write(f"\r\033[K{self._label} [{bar}] {fraction:4.0%} {amount}")
        self._stream.flush()
        self._drawn = True
