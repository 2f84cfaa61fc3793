"""Read where a run stands from its directory: the newest complete checkpoint and the last logged step.

The launcher depends only on the run-directory contract (``checkpoints/latest`` names a
``step_XXXXXXXX`` directory; ``metrics.jsonl`` holds one JSON object per logged step), never on the
training code, to tell a finished run from one that stopped early.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

_STEP_RE = re.compile(r"step_([0-9]+)")
_STEP_NAME = re.compile(r"step_[0-9]{8,}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step directory ``RUN/checkpoints/latest`` names, or None.

    ``latest`` is a file holding a step directory's name (what fm-train writes); anything else (a path,
    a symlink, a name of another form) names no checkpoint: the launcher converts what this returns, so it
    must not be led outside the run's ``checkpoints/``."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_symlink() or not latest.is_file():
        return None
    try:
        with latest.open("rb") as fh:
            name = fh.read(256).decode(errors="replace").strip()  # a step name is ~13 bytes
    except OSError:
        return None
    target = latest.parent / name
    if not _STEP_NAME.fullmatch(name) or target.is_symlink() or not target.is_dir():
        return None
    return target


def step_of(path: Path | None) -> int | None:
    """The step number in a ``step_XXXXXXXX`` directory name."""
    if path is None:
        return None
    match = _STEP_RE.search(path.name)
    return int(match.group(1)) if match else None


def tail_lines(path: Path, max_bytes: int = 65536) -> list[str]:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        data = fh.read().decode("utf-8", errors="replace")
    lines = data.splitlines()
    return lines[1:] if size > max_bytes else lines  # the first line of a partial read is cut


def last_metrics_step(run_dir: Path) -> int | None:
    """The highest ``step`` among the last records of ``RUN/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [rec["step"] for rec in parse_records(tail_lines(path)) if isinstance(rec.get("step"), int)]
    return max(steps) if steps else None


def parse_records(lines: list[str]) -> Iterator[dict]:
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line being written right now, or not a record
        if isinstance(rec, dict):
            yield rec


def run_state(run_dir: Path) -> dict[str, int | None]:
    """``{"latest_step", "metrics_step"}`` of a run directory (either may be None)."""
    return {"latest_step": step_of(latest_checkpoint(run_dir)), "metrics_step": last_metrics_step(run_dir)}


class MetricsTail:
    """Follows ``RUN/metrics.jsonl`` from where it ended when the attempt started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.is_file() else 0
        self._partial = b""

    def read(self) -> list[dict]:
        """New complete records since the last call (a truncated file restarts from its beginning)."""
        if not self.path.is_file():
            return []
        size = self.path.stat().st_size
        if size < self._offset:
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        self._offset = size
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return list(parse_records([c.decode("utf-8", errors="replace") for c in complete]))
