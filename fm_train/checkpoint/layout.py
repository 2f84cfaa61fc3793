"""Where checkpoints live and how their files are committed: step-directory names, ``latest``,
atomic writes.

``RUN/checkpoints/step_XXXXXXXX/`` holds DeepSpeed's files and ``manifest.json``. A directory without
the manifest is not a checkpoint (a save that died half way); ``RUN/checkpoints/latest`` is a text
file naming the newest complete step directory. Both marker files are replaced atomically: written to
a temp file in the same directory, fsynced, renamed over the old name, then the directory is fsynced,
so a crash leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from data_shards.safe_paths import symlinks_in
from fm_train.storage.errors import CheckpointError
from fm_train.storage.names import CHECKPOINTS, LATEST, MANIFEST, parse_step


def step_dir_name(step: int) -> str:
    """``step_00000042``: zero-padded so that names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def is_complete(step_dir: Path) -> bool:
    """A step directory counts only once its manifest (the commit marker) exists."""
    return (Path(step_dir) / MANIFEST).is_file()


def list_step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step_*`` directories (complete or not), oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(parse_step(p.name), p) for p in Path(ckpt_dir).iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk (DeepSpeed's ``torch.save`` does not)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: temp file in the same dir, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def symlink_problems(step_dir: Path) -> list[str]:
    """One entry per symlink under ``step_dir``: fm-train writes none, and a link would let a step read (and
    DeepSpeed unpickle) files that no checksum of its manifest covers."""
    links = symlinks_in(step_dir)
    if os.path.islink(step_dir):
        links.insert(0, f"{Path(step_dir).name} itself")
    return [f"{rel} (a symlink; a step directory holds only files, copy the target in its place)" for rel in links]


def refuse_symlinks(step_dir: Path) -> None:
    """Raise a :class:`CheckpointError` naming every symlink under ``step_dir``."""
    problems = symlink_problems(step_dir)
    if problems:
        raise CheckpointError(f"{step_dir} is refused: " + ", ".join(problems))


def read_latest(ckpt_dir: Path) -> Path | None:
    """The step directory ``latest`` names, or None when there is no ``latest`` file."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    name = f.read_text(encoding="utf-8").strip()
    if parse_step(name) is None:
        raise CheckpointError(f"{f} names {name!r}, which is not a step directory name (step_XXXXXXXX)")
    return Path(ckpt_dir) / name


def write_latest(ckpt_dir: Path, step_dir: Path) -> None:
    """Point ``latest`` at ``step_dir`` (atomically; only after its manifest exists)."""
    if not is_complete(step_dir):
        raise CheckpointError(f"refusing to point {LATEST} at {step_dir}: it has no {MANIFEST}")
    atomic_write_text(Path(ckpt_dir) / LATEST, Path(step_dir).name + "\n")
