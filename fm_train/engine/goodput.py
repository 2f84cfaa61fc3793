"""Goodput: the tokens a run kept per second of wall time, start-ups, evaluations, saves and restarts included.

``tokens_per_s`` counts only the time inside optimizer steps; what a user pays for is the wall time
since the launch began. A restart costs its start-up and the steps done since the last checkpoint
(``tokens_seen`` goes back to the checkpoint's), so both show up here and nowhere else.

The launcher puts the launch's start time in ``FM_TRAIN_LAUNCH_START_S`` (the same for every attempt);
rank 0 records in ``RUN/goodput.json`` the tokens the launch began from, so a later attempt of the same
launch counts from there. A worker started by hand counts from its own start.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from fm_train.dist.env import LAUNCH_START_ENV

RECORD_NAME = "goodput.json"


class Goodput:
    """Tokens gained since ``started_s`` (epoch seconds) over the wall time since then."""

    def __init__(self, started_s: float, tokens_at_start: int, clock: Callable[[], float] = time.time) -> None:
        self.started_s, self.tokens_at_start, self._clock = started_s, tokens_at_start, clock

    @classmethod
    def for_run(cls, run_dir: Path, tokens_seen: int, *, write: bool) -> "Goodput":
        """The launch's goodput for a worker that starts at ``tokens_seen``; ``write``: this rank keeps the record."""
        launch = os.environ.get(LAUNCH_START_ENV)
        try:
            started = float(launch) if launch else None
        except ValueError:
            started = None
        if started is None:
            return cls(time.time(), tokens_seen)
        path = run_dir / RECORD_NAME
        try:
            record = json.loads(path.read_text())
            if float(record["launch_start_s"]) == started:
                return cls(started, int(record["tokens_seen"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or another launch's (or damaged): this attempt is the launch's first
        if write:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps({"launch_start_s": started, "tokens_seen": tokens_seen}))
                os.replace(tmp, path)
            except OSError:
                pass  # a metric must not stop training
        return cls(started, tokens_seen)

    def record(self, tokens_seen: int, tokens_per_s: float) -> dict[str, float]:
        """``goodput_tokens_per_s`` and ``goodput`` (its share of the steps' own ``tokens_per_s``)."""
        wall = max(self._clock() - self.started_s, 1e-9)
        rate = (tokens_seen - self.tokens_at_start) / wall
        return {"goodput_tokens_per_s": rate, "goodput": rate / tokens_per_s if tokens_per_s > 0 else 0.0}
