"""Per-rank log files under RUN/logs and the prefixed echo of worker output on the driver."""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import IO

from launcher.placement import Placement

# Lines kept per rank for failure reports ("the last thing it did").
LAST_LINES = 20


class LogSink:
    """Writes every rank's output to RUN/logs/rank_NNN.log and echoes rank 0 (or all ranks) with a prefix."""

    def __init__(self, run_dir: Path, *, echo_all: bool, out: IO[str] | None = None) -> None:
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.echo_all = echo_all
        self.out = out if out is not None else sys.stdout
        self._files: dict[int, IO[str]] = {}
        self._last: dict[int, deque[str]] = {}
        self._prefix: dict[int, str] = {}

    def begin_attempt(self, placement: Placement, attempt: int) -> None:
        """Open (append) each rank's file and mark where this attempt begins."""
        self.close()
        for r in placement.ranks:
            fh = (self.log_dir / f"rank_{r.rank:03d}.log").open("a", buffering=1)
            fh.write(f"===== attempt {attempt}: rank {r.rank} on node {r.node_ip} ({r.node_id[:8]}) =====\n")
            self._files[r.rank] = fh
            self._last[r.rank] = deque(maxlen=LAST_LINES)
            self._prefix[r.rank] = f"[rank {r.rank} node {r.node_ip}]"

    def write(self, rank: int, stream: str, line: str) -> None:
        """Record one output line of ``rank`` (stderr lines are marked in the file, not on the console)."""
        fh = self._files.get(rank)
        if fh is not None:
            fh.write(line + "\n" if stream == "out" else f"[stderr] {line}\n")
        self._last.setdefault(rank, deque(maxlen=LAST_LINES)).append(line)
        if rank == 0 or self.echo_all:
            print(f"{self._prefix.get(rank, f'[rank {rank}]')} {line}", file=self.out, flush=True)

    def note(self, rank: int, text: str) -> None:
        """A launcher remark in one rank's file (e.g. 'dropped 12 lines')."""
        fh = self._files.get(rank)
        if fh is not None:
            fh.write(f"[launcher] {text}\n")

    def last_lines(self, rank: int) -> tuple[str, ...]:
        """The most recent lines of ``rank`` in this attempt."""
        return tuple(self._last.get(rank, ()))

    def path(self, rank: int) -> Path:
        """The log file of ``rank``."""
        return self.log_dir / f"rank_{rank:03d}.log"

    def close(self) -> None:
        """Close the files of the current attempt."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
