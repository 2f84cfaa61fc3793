"""Copies of the run's logs in ``run.storage``: the history outlives the node that wrote it.

Without a shared ``run.dir``, ``metrics.jsonl``, ``failures.jsonl``, ``config.resolved.yaml`` and
the TensorBoard event files exist only on rank 0's node, which may be the node that is lost. With
``run.storage`` rank 0 copies them next to ``checkpoints/`` after every step committed there (on the
upload thread, so training does not wait) and once more when the worker ends. Object stores cannot
append, so a changed file is uploaded whole; a JSONL file only up to its last complete line (the
sink may be writing the next one).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from fm_train.checkpoint.upload import retrying, storage_location, write_bytes

log = logging.getLogger("fm_train.engine")

LOG_FILES = ("metrics.jsonl", "failures.jsonl", "config.resolved.yaml")
TENSORBOARD = "tensorboard"


class RunLogCopies:
    """Rank 0's logs under ``run_dir``, copied to ``storage`` when they changed since the last copy."""

    def __init__(self, run_dir: Path, storage: str, *, retries: int = 5, backoff_s: float = 1.0) -> None:
        self.run_dir, self.root = Path(run_dir), storage_location(storage)
        self.retries, self.backoff_s = retries, backoff_s
        self._copied: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) at its last copy
        self._lock = threading.Lock()  # the upload thread and the worker's last copy may overlap

    def _files(self) -> list[Path]:
        found = [self.run_dir / name for name in LOG_FILES if (self.run_dir / name).is_file()]
        tensorboard = self.run_dir / TENSORBOARD
        if tensorboard.is_dir():
            found += sorted(p for p in tensorboard.rglob("*") if p.is_file())
        return found

    def copy(self) -> list[str]:
        """Upload every log file that changed since its last copy; returns their paths relative to the run.

        Never raises: a copy that fails is logged and tried again at the next call; training goes on.
        """
        with self._lock:
            copied = []
            for path in self._files():
                rel = path.relative_to(self.run_dir).as_posix()
                try:
                    stat = path.stat()
                    key = (stat.st_size, stat.st_mtime_ns)
                    if self._copied.get(rel) == key:
                        continue
                    data = path.read_bytes()
                    if path.suffix == ".jsonl":
                        data = data[: data.rfind(b"\n") + 1]
                    remote: Any = self.root / rel
                    retrying(f"copying {rel} to {remote}", lambda: write_bytes(remote, data), self.retries,
                             self.backoff_s)
                except Exception as exc:  # the backends raise their own types; the run must not stop for logs
                    log.warning("copying %s to %s failed (%s: %s); trying again after the next checkpoint",
                                path, self.root, type(exc).__name__, exc)
                    continue
                self._copied[rel] = key
                copied.append(rel)
            return copied
