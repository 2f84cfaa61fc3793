"""Where a conversion may write, and how ``--overwrite`` replaces an earlier export without losing anything.

An output never overlaps an input: ``--out`` that is, contains or lies inside the step directory, the
run's ``checkpoints/`` or the tokenizer it reads, or that is or contains the run directory, is refused
naming both (``RUN/hf`` itself is the default and fine). The export is built in a sibling staging
folder that records its owner (:mod:`data_shards.staging`: the next conversion into the same place
removes those of dead owners) and renamed into place; ``--overwrite`` swaps the old one out by rename
first (and back if the swap fails), then deletes only the files the earlier export recorded writing,
with the size and sha256 it wrote (:data:`RECORD`, names checked by :mod:`data_shards.safe_paths`): a
file the user changed since, or added, is kept in a ``*.kept-*`` sibling that the progress output names,
and a directory without the record is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from data_shards.safe_paths import UnsafePathError, resolve_under
from fm_train.checkpoint.integrity import file_digest
from fm_train.convert.errors import ConvertError

RECORD = ".fm-train-export.json"
_TOOL = "fm-train convert"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def run_dir_of(step_dir: Path) -> Path | None:
    """The run directory of ``RUN/checkpoints/step_X``; None for a step directory outside a run."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None


def staging_prefix(out: Path) -> str:
    """The name prefix of the staging folders of exports into ``out`` (siblings of it)."""
    return f".{out.name}.tmp-"


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
    """Record every file of the finished export in ``tmp`` with its size and sha256: what a later
    ``--overwrite`` may delete, and only while it is still those bytes."""
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != RECORD}
    (tmp / RECORD).write_text(json.dumps({"tool": _TOOL, "files": files}, indent=1) + "\n", encoding="utf-8")


def _recorded(old: Path) -> dict[str, Any]:
    """``{name: {"size", "sha256"}}`` of ``old``'s record; refused when there is none or it is not fm-train's."""
    path = old / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"] if record.get("tool") == _TOOL else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise ConvertError(f"{old} exists and holds no valid {RECORD}: it was not written by {_TOOL} (or by an "
                           "older version), so --overwrite will not delete anything in it; move it away or choose "
                           "another --out")
    return files


def _unchanged(path: Path, facts: Any) -> bool:
    """Whether ``path`` still holds the bytes the old export recorded (else it is the user's now: kept)."""
    return (isinstance(facts, dict) and facts.get("size") == path.stat().st_size
            and facts.get("sha256") == file_digest(path))


def publish(tmp: Path, out: Path, overwrite: bool, progress: Callable[[str], None]) -> None:
    """Rename the finished export ``tmp`` to ``out``; with ``overwrite``, the old ``out`` is swapped out by
    rename first and then only the files it recorded are deleted."""
    honour_umask(tmp)
    if out.is_symlink():
        raise ConvertError(f"--out {out} is a symlink; give the directory it points to, or another --out")
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    written = _recorded(out)
    old = out.with_name(f"{out.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # the old export back in its place: nothing lost
        raise
    for name, facts in written.items():
        try:
            path = resolve_under(old, name, what=f"{old / RECORD}: files")
        except UnsafePathError as exc:
            progress(f"not deleting {exc}")
            continue
        if path.is_file() and not path.is_symlink() and _unchanged(path, facts):
            path.unlink()
    (old / RECORD).unlink(missing_ok=True)
    for current, _dirs, _files in sorted(os.walk(old), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(current)  # empty folders only: anything the old export did not write stays
        except OSError:
            pass
    if old.exists():
        progress(f"kept files the old export did not write in {old}")
