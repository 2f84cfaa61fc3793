"""The names of a run's checkpoint files, the same on local disk and in storage: ``checkpoints/``,
``latest``, ``manifest.json`` and ``step_XXXXXXXX`` directories (:mod:`fm_train.checkpoint.layout`
says what they mean)."""

from __future__ import annotations

import re

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"step_([0-9]{8,})")  # fullmatch: ASCII digits only, no trailing newline


def parse_step(name: str) -> int | None:
    """The step of a step-directory name, or None for any other name."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None
