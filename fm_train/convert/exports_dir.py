"""``RUN/hf_steps/``: the Hugging Face exports ``convert.every`` writes during training, one per step.

Layout (``RUN/hf`` stays the final export of ``convert.at_end``, untouched by this folder)::

    RUN/hf_steps/step_00000100/   a verified Hugging Face directory (published by rename: complete or absent)
    RUN/hf_steps/latest           the newest one's name, replaced atomically (as ``checkpoints/latest``)

A reader (``fm-train eval``) holds a shared ``flock`` on the export's record file while it reads;
pruning (:func:`prune`) takes the lock exclusively without waiting and leaves an export it cannot lock
for the next round, so an evaluation in progress never loses its model. Pruned exports are renamed to
a hidden name first, so a half-deleted directory never looks like an export. Torch-free: the
command line imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from fm_train.convert.out_dir import RECORD

log = logging.getLogger("fm_train.convert")

HF_STEPS = "hf_steps"
"""The folder of the exports during training, in ``run.dir`` and in ``run.storage``."""
LATEST = "latest"
_STEP = re.compile(r"^step_(\d{8,})$")


def exports_root(run_dir: Path) -> Path:
    """``RUN/hf_steps``."""
    return Path(run_dir) / HF_STEPS


def export_name(step: int) -> str:
    """``step_00000100``: the same name as the checkpoint it comes from."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step of an export's folder name, or None for anything else (staging, ``latest``, hidden)."""
    found = _STEP.match(name)
    return int(found.group(1)) if found else None


def list_exports(root: Path) -> list[tuple[int, Path]]:
    """The published exports under ``root``, oldest first (a folder with its record: complete)."""
    try:
        entries = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(step_of(p.name), p) for p in entries]
    return sorted((s, p) for s, p in found if s is not None and (p / RECORD).is_file() and not p.is_symlink())


def read_latest(root: Path) -> Path | None:
    """The export ``root/latest`` names, when it exists and is published; else None."""
    try:
        name = (Path(root) / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = Path(root) / name
    return path if step_of(name) is not None and (path / RECORD).is_file() else None


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` (write, fsync, rename: a reader sees the old or the new name)."""
    tmp = Path(root) / f".{LATEST}.tmp-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, Path(root) / LATEST)


@contextlib.contextmanager
def reading(export: Path) -> Iterator[None]:
    """Hold ``export`` against pruning while the body reads it (a shared lock on its record file).

    Raises ``FileNotFoundError`` when it was pruned before the lock was taken."""
    with (Path(export) / RECORD).open("rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _try_delete(export: Path) -> bool:
    """Delete ``export`` unless a reader holds it; True when it is gone."""
    try:
        fh = (export / RECORD).open("rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        doomed = export.with_name(f".deleting-{export.name}-{os.getpid()}")
        export.rename(doomed)  # under the lock: no reader can start on it now
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def prune(root: Path, keep: int) -> tuple[list[str], list[str]]:
    """Delete the exports beyond the newest ``keep`` (never the one ``latest`` names); returns (deleted,
    kept because an ``fm-train eval`` is reading them: deleted at a later round)."""
    exports = list_exports(root)
    latest = read_latest(root)
    deleted, busy = [], []
    for _, path in exports[:-keep] if len(exports) > keep else []:
        if latest is not None and path.name == latest.name:
            continue
        if _try_delete(path):
            log.info("convert.keep: deleted %s", path)
            deleted.append(path.name)
        else:
            busy.append(path.name)
    for leftover in Path(root).glob(".deleting-*"):  # a prune stopped midway (the process was killed)
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted, busy
