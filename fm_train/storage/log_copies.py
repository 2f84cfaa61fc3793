"""Copies of the run's results in ``run.storage``: the logs and the final model outlive the node that
wrote them.

Without a shared ``run.dir``, ``metrics.jsonl``, ``failures.jsonl``, ``config.resolved.yaml`` and
the TensorBoard event files exist only on rank 0's node, which may be the node that is lost. With
``run.storage`` rank 0 copies them next to ``checkpoints/`` after every step committed there (on the
upload thread, so training does not wait) and once more when the worker ends. Object stores cannot
append, so a changed file is uploaded whole; a JSONL file only up to its last complete line (the
sink may be writing the next one).

The final Hugging Face directory (``RUN/hf``, written and verified by the convert step on the driver)
goes to ``<run.storage>/hf/`` once verified (:func:`publish_hf_dir`): the previous upload's marker is
removed first, then every file is uploaded, then the marker ``hf/.uploaded.json`` (each file's size
and sha256) last. A directory without the marker is an upload that did not finish; a reader that finds
it downloads the files the marker names and can check them.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from fm_train.storage.digest import ALGORITHM, digest_files
from fm_train.storage.upload import retrying, storage_location, write_bytes

log = logging.getLogger("fm_train.engine")

LOG_FILES = ("metrics.jsonl", "failures.jsonl", "config.resolved.yaml")
TENSORBOARD = "tensorboard"
HF_DIR = "hf"
"""The converted model's folder in ``run.storage``, as in ``run.dir``."""
HF_MARKER = ".uploaded.json"
"""Written last into ``<run.storage>/hf/``: its presence says every file it names was uploaded."""


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


def publish_hf_dir(local: Path, storage: str, *, retries: int = 5, backoff_s: float = 1.0,
                   progress: Callable[[str], None] = lambda _m: None, folder: str = HF_DIR) -> str:
    """Upload the verified Hugging Face directory ``local`` to ``<storage>/<folder>/`` (``hf``: the final
    model; ``hf_steps/step_X``: an export during training); returns its location.

    The previous upload's marker goes first (a re-upload interrupted halfway must not look complete),
    then every file, each retried with backoff, then :data:`HF_MARKER` naming each file with its size
    and digest. Files of an earlier upload that this one lacks are left in place (nothing in storage
    is deleted); the marker names the ones that belong to this model. Raises what the store raised
    once the retries are spent; the marker is then absent.
    """
    root = storage_location(storage) / folder
    rels = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    digests = digest_files(local, rels)
    marker = root / HF_MARKER
    retrying(f"removing {marker}", lambda: _remove_file(marker), retries, backoff_s)
    size = 0
    for rel in rels:
        retrying(f"uploading {rel} to {root / rel}", lambda rel=rel: _put_file(local / rel, root / rel), retries,
                 backoff_s)
        size += (local / rel).stat().st_size
    files = {rel: {"size": (local / rel).stat().st_size, ALGORITHM: digests[rel]} for rel in rels}
    record = json.dumps({"files": files}, indent=1, sort_keys=True).encode()
    retrying(f"writing {marker}", lambda: write_bytes(marker, record), retries, backoff_s)
    progress(f"uploaded {local} to {root}: {len(rels)} files, {size / 2**20:.1f} MiB, then {HF_MARKER}")
    return str(root)


def _put_file(local: Path, remote: Any) -> None:
    """One file, streamed (a model's weights may not fit in memory): a PUT or multipart upload to a
    store, a copy and rename into a directory (never a torn file under the final name)."""
    if not isinstance(remote, Path):
        remote.fs.put_file(str(local), remote.path)
        return
    remote.parent.mkdir(parents=True, exist_ok=True)
    tmp = remote.with_name(f".{remote.name}.part")
    shutil.copyfile(local, tmp)
    tmp.replace(remote)


def _remove_file(remote: Any) -> None:
    """Delete one object or file if it is there."""
    if isinstance(remote, Path):
        remote.unlink(missing_ok=True)
    elif remote.exists():
        remote.fs.rm_file(remote.path)
