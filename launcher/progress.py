"""The driver's progress line (step, loss, tokens/s, ETA) from the workers' metrics records."""

from __future__ import annotations

import time
from typing import Callable, Iterable


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Progress:
    """Turns metrics records into at most one progress line per ``interval_s`` (and always the last step)."""

    def __init__(self, total_steps: int, *, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps = total_steps
        self.interval_s = interval_s
        self.clock = clock
        self.last_step: int | None = None
        self._first: tuple[int, float] | None = None
        self._last_print = float("-inf")
        self._note: str | None = None

    def set_note(self, note: str | None) -> None:
        """A label appended to every line from now on (e.g. a layout smaller than configured); None clears it."""
        self._note = note

    def reset(self) -> None:
        """A new attempt: the step rate is measured afresh (restarts and compile time skew it)."""
        self._first = None
        self._last_print = float("-inf")

    def update(self, records: Iterable[dict]) -> list[str]:
        """Feed new records; return the lines to print (eval results are always printed)."""
        lines: list[str] = []
        newest: dict | None = None
        for rec in records:
            step = rec.get("step")
            if not isinstance(step, int):
                continue
            if "val_loss" in rec and "loss" not in rec:
                lines.append(f"eval: step {step} val_loss {rec['val_loss']:.4f}")
                continue
            newest = rec
            self.last_step = step
        if newest is None:
            return lines
        now, step = self.clock(), newest["step"]
        if self._first is None:
            self._first = (step, now)
        if now - self._last_print >= self.interval_s or step >= self.total_steps:
            self._last_print = now
            lines.append(self._line(newest, now))
        return lines

    def _line(self, rec: dict, now: float) -> str:
        step = rec["step"]
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(1, self.total_steps):.0f}%)"]
        if isinstance(rec.get("loss"), (int, float)):
            parts.append(f"loss {rec['loss']:.4f}")
        if isinstance(rec.get("tokens_per_s"), (int, float)):
            parts.append(f"{_fmt_rate(rec['tokens_per_s'])} tok/s")
        assert self._first is not None
        first_step, first_t = self._first
        if step > first_step and now > first_t:
            rate = (step - first_step) / (now - first_t)
            parts.append(f"ETA {format_duration((self.total_steps - step) / rate)}")
        if self._note:
            parts.append(self._note)
        return "progress: " + " | ".join(parts)
