"""Files copied back from ``run.storage`` to local disk: an object read whole, a file fetched through
a temporary name (checked against its digest before it takes its name), storage's ``latest``.

What a resume fetches, and in which order, is :mod:`fm_train.checkpoint.fetch`'s business.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from fm_train.storage.digest import ALGORITHM, file_digest
from fm_train.storage.errors import CheckpointError
from fm_train.storage.names import LATEST
from fm_train.storage.upload import storage_root


def read_text(location: Any) -> str | None:
    """The text of ``location``, or None when there is no such file or object."""
    try:
        return location.read_text()
    except FileNotFoundError:
        return None


def get_file(remote: Any, local: Path, digest: str | None = None, algorithm: str = ALGORITHM) -> None:
    """Copy ``remote`` to ``local`` through a temporary name; with ``digest``, the copy must hash to it
    before it takes the name (a changed object in storage never lands as a step's file)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    try:
        if isinstance(remote, Path):
            shutil.copyfile(remote, tmp)
        else:
            remote.fs.get_file(remote.path, str(tmp))
        if digest is not None and file_digest(tmp, algorithm) != digest:
            raise CheckpointError(f"{remote} does not match the {algorithm} its manifest records: the object changed "
                                  "after the save; the step cannot be resumed from storage (restore the object or "
                                  "point latest at an intact step)")
        tmp.replace(local)
    finally:
        tmp.unlink(missing_ok=True)


def committed_latest(storage: str) -> str:
    """The step name storage's ``latest`` holds ("" when there is none)."""
    root = storage_root(storage)
    try:
        return (read_text(root / LATEST) or "").strip()
    except Exception as exc:  # no credentials, no bucket, endpoint unreachable
        raise CheckpointError(f"run.storage={storage}: cannot read {root / LATEST} ({type(exc).__name__}: {exc})") \
            from exc
