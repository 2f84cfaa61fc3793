"""Records a worker adds to ``RUN/failures.jsonl`` when a checkpoint could not be used as expected.

The launcher appends one JSON line per attempt that did not succeed (``launcher/outcomes.py``); a
resume that skipped a damaged checkpoint, or started from scratch over damaged ones, is as much a
part of that history, so rank 0 appends its own kinds to the same file, in the same format: ``time``,
``attempt`` (the launcher's ``FM_TRAIN_ATTEMPT``, else None), ``kind``, ``summary``, then details.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fm_train.checkpoint")

FAILURES = "failures.jsonl"
FALLBACK = "checkpoint_fallback"
"""Resume skipped one or more damaged checkpoints and continued from an older, intact one."""
FRESH_START = "checkpoint_fresh_start"
"""No checkpoint was intact and ``checkpoint.allow_fresh_start`` let the run start from scratch."""


def record_event(run_dir: Path, kind: str, summary: str, **details: Any) -> Path | None:
    """Append one record to ``RUN/failures.jsonl``; returns its path, or None when the disk refused
    (logged: the printed line still tells the user)."""
    attempt = os.environ.get("FM_TRAIN_ATTEMPT")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": int(attempt) if attempt else None,
              "kind": kind, "summary": summary, "rank": 0, **details}
    path = Path(run_dir) / FAILURES
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:  # one write of one line: appends do not interleave
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        log.warning("cannot append to %s (%s); the record was: %s", path, exc, summary)
        return None
    return path
