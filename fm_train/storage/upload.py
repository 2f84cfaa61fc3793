"""Checkpoints copied to object storage (``run.storage``) in the background, committed there last.

Training waits only for the local save (``RUN/checkpoints/step_X`` on the node's own disk, as
without storage). Then each rank uploads the files it wrote while training goes on (a background
thread directs it; the copies to an object store run in a low-priority child process,
:mod:`fm_train.storage.upload_process`, so they never hold the training process's interpreter lock), and
marks its part done with ``step_X/.uploaded/rank_R``. Rank 0, once every rank's
marker is there, uploads ``manifest.json`` (the commit marker in storage, as on disk), then replaces
``checkpoints/latest``, then applies ``checkpoint.keep`` to storage; a step whose manifest is not in
storage is not a checkpoint there. Only one upload per rank is ever in flight: a save waits for the
previous upload first. Each file is retried with exponential backoff; a rank that gives up writes
``step_X/.failed/rank_R``, so rank 0 never commits that step, ``latest`` keeps naming the previous
one, and the log says so.

Why not Ray Train's ``storage_path`` or DeepSpeed's checkpoint engines: Ray Train uploads after the
save returns on the training thread (the step waits for the whole upload), and DeepSpeed's engines
write in place, with no commit marker in the remote store. fsspec (through universal-pathlib) is
the one interface to every store, and to a plain directory: ``run.storage`` may be a mounted path too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fm_train.config.storage_uri import uri_scheme
from fm_train.storage.errors import CheckpointError
from fm_train.storage.names import CHECKPOINTS, LATEST, MANIFEST, parse_step
from fm_train.storage.upload_process import NICENESS, UploadProcess

log = logging.getLogger("fm_train.checkpoint")

UPLOADED, FAILED = ".uploaded", ".failed"


def storage_location(storage: str) -> Any:
    """``run.storage`` as a ``pathlib.Path`` (a mounted directory) or a ``UPath`` (an object-store URI;
    the config checked its scheme and backend at load time)."""
    if uri_scheme(storage) is None:
        return Path(storage.removeprefix("file://"))
    from upath import UPath

    return UPath(storage)


def storage_root(storage: str) -> Any:
    """``run.storage``'s ``checkpoints/`` (:func:`storage_location`)."""
    return storage_location(storage) / CHECKPOINTS


def retrying(what: str, fn: Callable[[], Any], retries: int, backoff_s: float) -> Any:
    """``fn()``, retried ``retries`` times with doubling waits (network blips, throttling)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # the backends raise their own types (botocore, aiohttp, OSError)
            if attempt == retries:
                raise
            wait = backoff_s * 2 ** attempt
            log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, wait)
            time.sleep(wait)


class CheckpointUploader:
    """One rank's background uploads of its checkpoint files to ``run.storage``."""

    def __init__(self, storage: str, *, rank: int, keep: int, retries: int = 5, backoff_s: float = 1.0,
                 commit_timeout_s: float = 3600.0, after_commit: Callable[[], Any] | None = None) -> None:
        """``after_commit`` (rank 0): called on the upload thread after each step is committed in storage."""
        self.root = storage_root(storage)
        self.after_commit = after_commit
        self.rank, self.keep = rank, keep
        self.retries, self.backoff_s, self.commit_timeout_s = retries, backoff_s, commit_timeout_s
        self._thread: threading.Thread | None = None
        self._process = UploadProcess()
        if not isinstance(self.root, Path):
            self._process.start()  # at the run's start: the first checkpoint's upload must not wait for it
        self.failed: list[str] = []  # step names whose upload this rank could not complete
        self.committed: list[str] = []  # rank 0: step names committed in storage

    def submit(self, step_dir: Path, files: Sequence[str], *, own: Mapping[str, str],
               expected: Sequence[Mapping[str, str]] | None = None) -> None:
        """Upload ``files`` (relative to ``step_dir``) in the background; rank 0 commits the step after.

        ``own``: this rank's file digests of this save (its markers name them, so that markers left by
        an earlier attempt at the same step are never mistaken for this one's). ``expected`` (rank 0):
        every rank's ``own``, in rank order.
        """
        self.wait()
        self._thread = threading.Thread(target=self._upload,
                                        args=(Path(step_dir), list(files), save_id(own),
                                              [save_id(d) for d in expected] if expected is not None else None),
                                        name=f"fm-train-upload-{step_dir.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) has finished or failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Wait for the upload in flight, then end the upload process."""
        self.wait()
        self._process.close()

    @property
    def busy(self) -> bool:
        """Whether an upload is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def _put(self, local: Path, remote: Any) -> None:
        retrying(f"uploading {local.name} to {remote}", lambda: _put_file(local, remote, self._process),
                 self.retries, self.backoff_s)

    def _write(self, remote: Any, text: str) -> None:
        retrying(f"writing {remote}", lambda: _write_text(remote, text), self.retries, self.backoff_s)

    def _upload(self, step_dir: Path, files: list[str], mine: str, expected: list[str] | None) -> None:
        _lower_priority()
        remote = self.root / step_dir.name
        start, size = time.perf_counter(), 0
        try:
            for rel in files:
                self._put(step_dir / rel, remote / rel)
                size += (step_dir / rel).stat().st_size
            self._write(remote / UPLOADED / f"rank_{self.rank:05d}", mine)
            log.info("rank %d: uploaded %d file(s), %.1f MiB of %s to %s in %.1f s", self.rank, len(files),
                     size / 2**20, step_dir.name, remote, time.perf_counter() - start)
            if expected is not None:
                self._commit(step_dir, remote, expected)
        except Exception as exc:
            self.failed.append(step_dir.name)
            try:
                self._write(remote / FAILED / f"rank_{self.rank:05d}", mine)
            except Exception:
                pass  # the store is gone altogether; rank 0 then times out waiting for this rank
            log.error("rank %d: uploading %s to %s failed (%s: %s); %s there still names the previous checkpoint,"
                      " and %s stays on local disk", self.rank, step_dir.name, remote, type(exc).__name__, exc,
                      LATEST, step_dir)

    def _commit(self, step_dir: Path, remote: Any, expected: list[str]) -> None:
        """Rank 0: once every rank's marker names this save, the manifest goes up, then ``latest``, then
        retention. Markers of an earlier attempt at the same step name other digests and do not count."""
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            failed = _markers(remote / FAILED, expected)
            if failed:
                raise CheckpointError(f"rank(s) {', '.join(map(str, failed))} could not upload their files of"
                                      f" {step_dir.name}")
            done = _markers(remote / UPLOADED, expected)
            if len(done) == len(expected):
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"only {len(done)} of {len(expected)} ranks uploaded {step_dir.name} within"
                                      f" {self.commit_timeout_s:.0f} s")
            time.sleep(0.2)
        self._put(step_dir / MANIFEST, remote / MANIFEST)
        self._write(self.root / LATEST, step_dir.name + "\n")
        self.committed.append(step_dir.name)
        log.info("committed %s in %s (manifest, then %s)", step_dir.name, self.root, LATEST)
        self._retention(step_dir.name)
        if self.after_commit is not None:
            self.after_commit()

    def _retention(self, newest: str) -> None:
        """Delete committed steps in storage beyond the newest ``keep`` (never the one ``latest`` names)."""
        steps = sorted((parse_step(p.name), p) for p in _children(self.root) if parse_step(p.name) is not None)
        complete = [(s, p) for s, p in steps if (p / MANIFEST).exists()]
        for _, p in complete[:-self.keep] if len(complete) > self.keep else []:
            if p.name != newest:
                log.info("retention: deleting %s", p)
                _remove_tree(p)


def _lower_priority() -> None:
    """Run this (upload) thread at a lower CPU priority: the step's compute threads come first.

    Linux schedules threads as tasks, so ``setpriority`` on the thread's id affects it alone.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: uploads at normal priority
        pass


def _put_file(local: Path, remote: Any, process: UploadProcess) -> None:
    """Copy one file: a single PUT (or multipart upload) to a store, by ``process``; a copy and rename
    to a directory, on this thread."""
    if not isinstance(remote, Path):
        process.put(local, remote)
        return
    remote.parent.mkdir(parents=True, exist_ok=True)
    tmp = remote.with_name(f".{remote.name}.part")
    shutil.copyfile(local, tmp)
    tmp.replace(remote)


def _write_text(remote: Any, text: str) -> None:
    """A small object (a marker, ``latest``): one PUT, or a write and rename in a directory."""
    write_bytes(remote, text.encode())


def write_bytes(remote: Any, data: bytes) -> None:
    """One object: a single PUT to a store, a write and rename in a directory (never a torn file)."""
    if not isinstance(remote, Path):
        remote.write_bytes(data)
        return
    remote.parent.mkdir(parents=True, exist_ok=True)
    tmp = remote.with_name(f".{remote.name}.part")
    tmp.write_bytes(data)
    tmp.replace(remote)


def _remove_tree(path: Any) -> None:
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.fs.rm(path.path, recursive=True)


def _children(folder: Any) -> list[Any]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def save_id(digests: Mapping[str, str]) -> str:
    """What one rank's markers say: the sha256 of its file digests in this save."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def _markers(folder: Any, expected: Sequence[str]) -> list[int]:
    """The ranks whose marker in ``folder`` names this save (``expected[rank]``)."""
    if not isinstance(folder, Path):
        folder.fs.invalidate_cache(folder.path)  # listings are cached by the client; markers arrive meanwhile
    found = []
    for p in _children(folder):
        rank = int(p.name.rpartition("_")[2]) if p.name.startswith("rank_") else -1
        if 0 <= rank < len(expected):
            try:
                if p.read_text().strip() == expected[rank]:
                    found.append(rank)
            except FileNotFoundError:
                pass
    return sorted(found)
