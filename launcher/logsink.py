"""Per-rank log files under RUN/logs and the prefixed echo of worker output on the driver.

The files keep every line. The console leaves out what third-party libraries print on every start that is
known and harmless (:data:`KNOWN_NOISE`), so that what a rank says there is fm-train's own. The driver's
own Ray messages (logged by ``ray.init`` in the launching process, where no rank file exists) are held
back the same way by :func:`quiet_ray_driver` (:data:`DRIVER_NOISE`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from pathlib import Path
from typing import IO

from launcher.placement import Placement

# Lines kept per rank for failure reports ("the last thing it did").
LAST_LINES = 20

#: Worker lines the console does not echo (the rank's file keeps them), each known and harmless.
KNOWN_NOISE: tuple[re.Pattern[str], ...] = (
    # DeepSpeed on a CPU worker: the accelerator choice fm-train made on purpose (gloo, no GPU slot).
    re.compile(r"\[WARNING\] \[real_accelerator\.py:\d+:get_accelerator\] Setting accelerator to CPU"),
    # DeepSpeed's shared-memory comm op, built once into the extension cache and loaded from it after.
    re.compile(r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$"),
    # torch deprecating the collective names DeepSpeed still calls, and the source line the warning quotes.
    re.compile(r"FutureWarning: `torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    re.compile(r"^\s+return func\(\*args, \*\*kwargs\)$"),
)


#: Ray's driver-side log records (logger name, message pattern) left off the console, each known and harmless.
DRIVER_NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    # ray.init starting a local instance turns token authentication on by default and says so on every start;
    # the safe default stays on. The warning that authentication is *disabled* is not matched and still shows.
    ("ray._private.authentication.authentication_token_setup",
     re.compile(r"^Token authentication is enabled for this Ray cluster\.")),
)


class _DriverNoise(logging.Filter):
    """Drops the records of one Ray logger whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_ray_driver() -> None:
    """Keep :data:`DRIVER_NOISE` off the driver's console (call before ``ray.init``; calling again adds nothing).

    A filter on the logger that emits each record, so Ray's own handlers and every other message are untouched.
    """
    for name, pattern in DRIVER_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DriverNoise) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DriverNoise(pattern))


def known_noise(line: str) -> bool:
    """Whether ``line`` is one of :data:`KNOWN_NOISE`."""
    return any(pattern.search(line) for pattern in KNOWN_NOISE)


class LogSink:
    """Writes every rank's output to RUN/logs/rank_NNN.log and echoes rank 0 (or all ranks) with a prefix,
    known third-party noise left out of the echo."""

    def __init__(self, run_dir: Path, *, echo_all: bool, out: IO[str] | None = None) -> None:
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.echo_all = echo_all
        self.out = out if out is not None else sys.stdout
        self._files: dict[int, IO[str]] = {}
        self._last: dict[int, deque[str]] = {}
        self._prefix: dict[int, str] = {}
        self._broken: set[int] = set()  # ranks whose file could not be written this attempt (disk full)

    def begin_attempt(self, placement: Placement, attempt: int) -> None:
        """Open (append) each rank's file and mark where this attempt begins."""
        self.close()
        self._broken.clear()
        for r in placement.ranks:
            self._last[r.rank] = deque(maxlen=LAST_LINES)
            self._prefix[r.rank] = f"[rank {r.rank} node {r.node_ip}]"
            try:
                self._files[r.rank] = (self.log_dir / f"rank_{r.rank:03d}.log").open("a", buffering=1)
            except OSError as exc:
                self._give_up_file(r.rank, exc)
                continue
            self._file_write(r.rank, f"===== attempt {attempt}: rank {r.rank} on node {r.node_ip} ({r.node_id[:8]}) =====\n")

    def write(self, rank: int, stream: str, line: str) -> None:
        """Record one output line of ``rank`` (stderr lines are marked in the file, not on the console)."""
        self._file_write(rank, line + "\n" if stream == "out" else f"[stderr] {line}\n")
        self._last.setdefault(rank, deque(maxlen=LAST_LINES)).append(line)
        if (rank == 0 or self.echo_all) and not known_noise(line):
            print(f"{self._prefix.get(rank, f'[rank {rank}]')} {line}", file=self.out, flush=True)

    def note(self, rank: int, text: str) -> None:
        """A launcher remark in one rank's file (e.g. 'dropped 12 lines')."""
        self._file_write(rank, f"[launcher] {text}\n")

    def _file_write(self, rank: int, text: str) -> None:
        fh = self._files.get(rank)
        if fh is None:
            return
        try:
            fh.write(text)
        except OSError as exc:
            self._give_up_file(rank, exc)

    def _give_up_file(self, rank: int, exc: OSError) -> None:
        """Stop writing one rank's file (a full disk must not kill the driver that supervises the run)."""
        fh = self._files.pop(rank, None)
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass  # the buffered tail is lost with the disk space; the console and last_lines keep it
        if rank not in self._broken:
            self._broken.add(rank)
            print(f"[launcher] warning: cannot write {self.path(rank)} ({exc.strerror or exc}); rank {rank}'s"
                  " output is not logged to a file for the rest of this attempt", file=self.out, flush=True)

    def last_lines(self, rank: int) -> tuple[str, ...]:
        """The most recent lines of ``rank`` in this attempt."""
        return tuple(self._last.get(rank, ()))

    def path(self, rank: int) -> Path:
        """The log file of ``rank``."""
        return self.log_dir / f"rank_{rank:03d}.log"

    def close(self) -> None:
        """Close the files of the current attempt."""
        for fh in self._files.values():
            try:
                fh.close()
            except OSError:
                pass  # the flush of the last lines failed (disk full); they were echoed or are in last_lines
        self._files.clear()
