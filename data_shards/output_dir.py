"""The output directory of a shard build: refuse to clobber, stage in a temp dir, commit by renames.

Only files this tool owns are ever removed: ``index.json``, the ``tokenizer/`` folder and the shards
that the old ``index.json`` names. ``index.json`` is moved in last, so a directory without it is
never mistaken for a finished build.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import DataError
from .index import INDEX_NAME, TOKENIZER_DIRNAME
from .storage import Location, remote_error


def _owned_shards(out: Path) -> list[str]:
    """Shard file names the existing index.json lists (empty if there is none or it is unreadable)."""
    try:
        return [s["name"] for s in json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or that already holds shards unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or overwrite:
        return
    held = [p.name for p in (out / INDEX_NAME, out / TOKENIZER_DIRNAME) if p.exists()]
    held += sorted(p.name for p in out.glob("shard-*.tar"))[:3]
    if held:
        raise DataError(f"--out {out} already holds shards ({', '.join(held)}); pass --overwrite to replace them "
                        "(other files there are kept) or choose another --out")


def make_staging(out: Path) -> Path:
    """A fresh hidden folder inside ``out`` (same filesystem, so the commit is a set of renames)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def commit(staging: Path, out: Path) -> None:
    """Replace ``out``'s shards, tokenizer and index with the staged ones; index.json last."""
    old_shards = _owned_shards(out)
    (out / INDEX_NAME).unlink(missing_ok=True)  # from here on the directory reads as unfinished
    for name in old_shards:
        if "/" not in name and name != INDEX_NAME:
            (out / name).unlink(missing_ok=True)
    if (out / TOKENIZER_DIRNAME).exists():
        shutil.rmtree(out / TOKENIZER_DIRNAME)
    for path in sorted(staging.iterdir()):
        if path.name != INDEX_NAME:
            os.replace(path, out / path.name)
    os.replace(staging / INDEX_NAME, out / INDEX_NAME)
    staging.rmdir()
    _fsync_dir(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_remote_output(out: Location, overwrite: bool) -> None:
    """Refuse an object-store --out that already holds a finished build unless ``overwrite``; a
    missing bucket or a refused listing is an error before any tokenizing starts."""
    try:
        held = (out / INDEX_NAME).exists()
    except Exception as exc:
        raise remote_error(out, exc) from exc
    if held and not overwrite:
        raise DataError(f"--out {out} already holds shards ({INDEX_NAME}); pass --overwrite to replace them "
                        "or choose another --out")


def upload(staging: Path, out: Location, *, progress: bool = True) -> None:
    """Copy a finished local build to object storage: ``index.json`` of a previous build removed first
    (the prefix then reads as unfinished), then shards and tokenizer, then ``index.json`` last, so a
    reader never sees an index whose shards are not all there. Old shards the new index does not
    name are deleted after the commit."""
    from tqdm import tqdm

    fs, root = out.fs, out.path.rstrip("/")
    index = f"{root}/{INDEX_NAME}"
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != INDEX_NAME)
    try:
        old_shards: set[str] = set()
        if fs.exists(index):
            old_shards = {s["name"] for s in json.loads(fs.cat_file(index)).get("shards", [])}
            fs.rm_file(index)
        with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
                  desc=f"uploading to {out}", disable=not progress) as bar:
            for path in files:
                fs.put_file(str(path), f"{root}/{path.relative_to(staging).as_posix()}")
                bar.update(path.stat().st_size)
        fs.put_file(str(staging / INDEX_NAME), index)
        for name in sorted(old_shards - {p.name for p in files if p.parent == staging}):
            if "/" not in name:
                fs.rm_file(f"{root}/{name}")
    except Exception as exc:
        raise remote_error(out, exc) from exc
