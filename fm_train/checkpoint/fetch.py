"""Bring the newest checkpoint committed in ``run.storage`` into ``RUN/checkpoints`` for a resume.

With ``run.storage`` a step is a checkpoint once it is committed there, so every node resumes from
the step storage's ``latest`` names, whatever its own disk holds: a node without a shared ``run.dir``
(a fresh machine, a replacement for a lost one, or one that only holds its own ranks' files)
downloads the files of that step it lacks or holds at another size, the manifest last (the local
commit marker, as for a save), then points the local ``latest`` at it. Local step directories newer
than it were never committed (their upload was cut short) and may hold only this node's files, so
they are removed: all nodes then agree on the step, and the next save of that step is made anew.
The local resume path then runs as always: checksums, layout checks, resharding. Files are fetched
through a temporary name and renamed, so a download cut short leaves nothing that passes for a
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fm_train.checkpoint import collective
from fm_train.checkpoint.layout import (
    LATEST,
    MANIFEST,
    CheckpointError,
    checkpoints_dir,
    list_step_dirs,
    parse_step,
    write_latest,
)
from fm_train.checkpoint.upload import storage_root

log = logging.getLogger("fm_train.checkpoint")


def _read_text(location: Any) -> str | None:
    try:
        return location.read_text()
    except FileNotFoundError:
        return None


def _get(remote: Any, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    try:
        if isinstance(remote, Path):
            shutil.copyfile(remote, tmp)
        else:
            remote.fs.get_file(remote.path, str(tmp))
        tmp.replace(local)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_latest(storage: str, run_dir: Path, *, say=print) -> Path | None:
    """The step directory of storage's newest committed checkpoint, made whole under ``run_dir``.

    None when storage holds no committed checkpoint (the local checkpoints are then used as they
    are). Call it once per node (every rank of the node then reads the same files).
    """
    root = storage_root(storage)
    try:
        name = (_read_text(root / LATEST) or "").strip()
    except Exception as exc:  # no credentials, no bucket, endpoint unreachable
        raise CheckpointError(f"run.storage={storage}: cannot read {root / LATEST} ({type(exc).__name__}: {exc})") \
            from exc
    if not name:
        return None
    text = _read_text(root / name / MANIFEST)
    if parse_step(name) is None or text is None:
        raise CheckpointError(f"{root / LATEST} names {name!r}, which has no {MANIFEST} in storage; it is not a"
                              " committed checkpoint (delete the latest object or point it at a committed step)")
    manifest = json.loads(text)
    ckpt_dir = checkpoints_dir(run_dir)
    for step, path in list_step_dirs(ckpt_dir) if ckpt_dir.is_dir() else []:
        if step > parse_step(name):
            say(f"removing {path}: newer than {name}, the newest step committed in {root}, so never committed")
            shutil.rmtree(path, ignore_errors=True)
    step_dir = ckpt_dir / name
    wanted = {**manifest["files"], **{rel: None for rel in manifest["rng"]["files"]}}
    missing = [rel for rel, size in wanted.items()
               if not (step_dir / rel).is_file() or (size is not None and (step_dir / rel).stat().st_size != size)]
    if missing or not (step_dir / MANIFEST).is_file():
        start = time.perf_counter()
        total = sum(int(manifest["files"].get(rel) or 0) for rel in missing)
        say(f"fetching {name} from {root}: {len(missing)} of {len(wanted)} files ({total / 2**20:.1f} MiB)")
        (step_dir / MANIFEST).unlink(missing_ok=True)  # not a checkpoint until every file is here
        for i, rel in enumerate(sorted(missing), 1):
            _get(root / name / rel, step_dir / rel)
            if i % 16 == 0 or i == len(missing):
                say(f"  {i}/{len(missing)} files")
        _get(root / name / MANIFEST, step_dir / MANIFEST)
        say(f"fetched {name} in {time.perf_counter() - start:.1f} s")
    write_latest(ckpt_dir, step_dir)
    return step_dir


def fetch_on_each_node(storage: str, run_dir: Path, *, local_rank: int) -> None:
    """Every rank calls this: local rank 0 of each node fetches (:func:`fetch_latest`), the others wait;
    a failure on any node is raised on every rank (nobody is left waiting in a collective)."""
    error = ""
    if local_rank == 0:
        try:
            fetch_latest(storage, run_dir, say=lambda line: print(line, flush=True))
        except Exception as exc:
            error = f"rank {collective.rank()}: {exc}"
    errors = [e for e in collective.all_gather(error) if e]
    if errors:
        raise CheckpointError("fetching the checkpoint from run.storage failed: " + "; ".join(errors))
