"""Where a conversion may write, and how ``--overwrite`` replaces an earlier export without losing anything.

An output never overlaps an input: ``--out`` that is, contains or lies inside the step directory, the
run's ``checkpoints/`` or the tokenizer it reads, or that is or contains the run directory, is refused
naming both (``RUN/hf`` itself is the default and fine). The export is built in a sibling folder and
renamed into place; ``--overwrite`` then deletes only the files the earlier export recorded writing
(:data:`RECORD`, names checked by :mod:`data_shards.safe_paths`), never a file it did not write: a
directory without that record is refused, and any other file found in the old one is kept, moved to a
``*.kept-*`` sibling that the progress output names.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from data_shards.safe_paths import UnsafePathError, resolve_under
from fm_train.convert.errors import ConvertError

RECORD = ".fm-train-export.json"
_TOOL = "fm-train convert"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_disjoint(out: Path, inputs: Mapping[str, Path | None], run_dir: Path | None = None) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs`` (label -> path), or that is or
    contains ``run_dir``; every path compared after resolving symlinks."""
    target = Path(os.path.realpath(out))
    for label, path in inputs.items():
        if path is None:
            continue
        source = Path(os.path.realpath(path))
        if _inside(target, source) or _inside(source, target):
            raise ConvertError(f"--out {out} overlaps the {label} {path} it reads (the same directory, inside it or "
                               "holding it); choose an --out outside it, e.g. RUN/hf")
    if run_dir is not None:
        run = Path(os.path.realpath(run_dir))
        if _inside(run, target):
            raise ConvertError(f"--out {out} is or holds the run directory {run_dir}; replacing it would delete "
                               "the run's checkpoints, metrics and logs: choose an --out such as RUN/hf")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask allows (``mkdtemp`` makes 0700 folders)."""
    mask = _umask()
    for current, dirs, files in os.walk(root):
        os.chmod(current, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(current, name), 0o666 & ~mask)


def write_record(tmp: Path) -> None:
    """Record every file of the finished export in ``tmp`` (the list a later ``--overwrite`` may delete)."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != RECORD)
    (tmp / RECORD).write_text(json.dumps({"tool": _TOOL, "files": files}, indent=1) + "\n", encoding="utf-8")


def _recorded(old: Path) -> list[str]:
    """The file names ``old``'s record lists; refused when there is none or it is not fm-train's."""
    path = old / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"] if record.get("tool") == _TOOL else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, list):
        raise ConvertError(f"{old} exists and holds no valid {RECORD}: it was not written by {_TOOL} (or by an "
                           "older version), so --overwrite will not delete anything in it; move it away or choose "
                           "another --out")
    return files


def publish(tmp: Path, out: Path, overwrite: bool, progress: Callable[[str], None]) -> None:
    """Rename the finished export ``tmp`` to ``out``; with ``overwrite``, the old ``out`` is swapped out by
    rename first and then only the files it recorded are deleted."""
    honour_umask(tmp)
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    names = _recorded(out)
    old = out.with_name(f"{out.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    for name in [*names, RECORD]:
        try:
            path = resolve_under(old, name, what=f"{old / RECORD}: files")
        except UnsafePathError as exc:
            progress(f"not deleting {exc}")
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
    for current, _dirs, _files in sorted(os.walk(old), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(current)  # empty folders only: anything the old export did not write stays
        except OSError:
            pass
    if old.exists():
        progress(f"kept files the old export did not write in {old}")
