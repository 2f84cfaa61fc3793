"""A rank's own progress record, so a supervisor can tell which rank stopped moving.

Log lines are no heartbeat: one rank that keeps printing (a warning in a loop, a chatty library) hides
another that hangs in a collective. Each rank instead records the last step it finished in a small
file that the launcher names in ``FM_TRAIN_HEARTBEAT`` (on the rank's own node, never on a shared
filesystem); the launcher's actor reads it on every poll. Outside a launcher the variable is unset
and beating does nothing.

Format: one line ``<step> <phase>``, replaced atomically, e.g. ``120 step`` or ``0 ready``.
Standard library only: the launcher reads it without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HEARTBEAT_ENV = "FM_TRAIN_HEARTBEAT"


class Heartbeat:
    """Writes this rank's progress record (a no-op when no path is given)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None

    @classmethod
    def from_environ(cls) -> "Heartbeat":
        """The heartbeat the launcher asked for (``FM_TRAIN_HEARTBEAT``), or a no-op one."""
        return cls(os.environ.get(HEARTBEAT_ENV))

    def beat(self, step: int, phase: str = "step") -> None:
        """Record that this rank reached ``step`` (in ``phase``); never raises (progress must not fail training)."""
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(f"{int(step)} {phase}\n")
            os.replace(tmp, self.path)
        except OSError:
            pass

    def __call__(self, engine: Any, state: Any) -> None:
        """A training-loop hook: beat with the step just finished."""
        self.beat(state.step)


def read_heartbeat(path: str | Path) -> tuple[int, str] | None:
    """``(step, phase)`` of a heartbeat file, or None when there is none yet (or it is being replaced)."""
    try:
        step, _, phase = Path(path).read_text().strip().partition(" ")
        return int(step), phase or "step"
    except (OSError, ValueError):
        return None
