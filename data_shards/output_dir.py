"""The output directory of a shard build: refuse to clobber or to overlap the inputs, stage beside the
old build, commit by renames.

``--overwrite`` removes only what the old build recorded writing: ``tokenizer/`` and the shards its
``index.json`` lists, and only after that index passed :func:`~data_shards.index.read_index` (every
name then is ``shard-NNNNNN.tar``, the writer's own). An ``index.json`` that does not pass is a data
file of unknown origin, so the build is refused before it starts, naming the problem: no name read
from it is ever deleted. The old files are moved into the staging folder and deleted with it after
the new ``index.json`` is in place; ``index.json`` is removed first and moved in last, so a directory
without it is never mistaken for a finished build, and a build killed in between leaves only a
staging folder that the next run removes (:mod:`data_shards.staging`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import DataError
from .index import INDEX_NAME, TOKENIZER_DIRNAME, BadIndexError, ShardIndex, read_index
from .storage import Location, remote_error

_REPLACED = ".replaced"  # inside the staging folder: the old build's files, deleted with the folder


def recorded_files(out: Location) -> list[str]:
    """Names the build already in ``out`` recorded writing (its tokenizer/ and shards); DataError when its
    index.json is not one fm-train wrote, since then nothing in it may decide what is deleted."""
    try:
        has_index = (out / INDEX_NAME).exists()
    except Exception as exc:  # object storage: listing refused, bucket missing
        raise remote_error(out, exc) from exc
    if not has_index:
        return [TOKENIZER_DIRNAME]
    try:
        index = read_index(out)
    except DataError as exc:  # BadIndexError, or an index.json that is not a file
        problem = exc.problem if isinstance(exc, BadIndexError) else str(exc)
        raise DataError(f"--out {out} holds an index.json fm-train cannot take as the record of its own files "
                        f"({problem}); --overwrite deletes only files a valid index lists, so move "
                        f"{out / INDEX_NAME} away yourself (and the shards it names, if they are yours to delete) "
                        "or choose another --out") from None
    return [TOKENIZER_DIRNAME] + [s.name for s in index.shards]


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, that already holds shards unless ``overwrite``, or whose old
    index.json cannot say what --overwrite may delete (checked now, before any tokenizing)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return
    if overwrite:
        recorded_files(out)
        return
    held = [p.name for p in (out / INDEX_NAME, out / TOKENIZER_DIRNAME) if os.path.lexists(p)]
    held += sorted(p.name for p in out.glob("shard-*.tar"))[:3]
    if held:
        raise DataError(f"--out {out} already holds shards ({', '.join(held)}); pass --overwrite to replace them "
                        "(other files there are kept) or choose another --out")


def _overlap(out: str, inp: str) -> str | None:
    """How real path ``out`` overlaps real path ``inp``: "is", "lies inside", "contains", or None."""
    if out == inp:
        return "is"
    if os.path.commonpath([out, inp]) == inp:
        return "lies inside"
    if os.path.commonpath([out, inp]) == out:
        return "contains"
    return None


def check_disjoint(out: Path, inputs: list[str], tokenizer_dir: Path | None = None) -> None:
    """Refuse an --out that is, contains or lies inside an input (file, saved dataset directory), naming
    both: the build would read what it writes, and --overwrite could delete an input. The --tokenizer
    directory may lie inside --out (rebuilding a directory with its own tokenizer: it is read into memory
    before anything is replaced), but --out may not be or lie inside it."""
    real_out = os.path.realpath(out)
    for inp in inputs:
        relation = _overlap(real_out, os.path.realpath(inp))
        if relation is not None:
            raise DataError(f"--out {out} {relation} the input {inp}; choose an --out outside the inputs")
    if tokenizer_dir is not None:
        relation = _overlap(real_out, os.path.realpath(tokenizer_dir))
        if relation in ("is", "lies inside"):
            raise DataError(f"--out {out} {relation} the --tokenizer directory {tokenizer_dir}; choose an --out "
                            "outside it")


def _refuse_blocked(out: Path, names: list[str]) -> None:
    """A real directory where the commit would put or remove a shard file is not ours: refuse before
    anything moves, so the commit cannot fail half-way."""
    for name in names:
        path = out / name
        if name != TOKENIZER_DIRNAME and path.is_dir() and not path.is_symlink():
            raise DataError(f"--out {out}: {path} is a directory where fm-train keeps a shard file; move it away "
                            "and rerun")


def commit(staging: Path, out: Path, index: ShardIndex) -> None:
    """Replace the build in ``out`` with the one staged in ``staging`` (whose shards ``index`` lists).

    The old build's recorded files are moved into the staging folder (never deleted one by one from
    ``out``), the new ones renamed in, index.json last; then the staging folder is deleted with the
    old files in it."""
    old = recorded_files(out)
    new = [TOKENIZER_DIRNAME] + [s.name for s in index.shards]
    _refuse_blocked(out, old + new)
    replaced = staging / _REPLACED
    replaced.mkdir()
    (out / INDEX_NAME).unlink(missing_ok=True)  # from here on the directory reads as unfinished
    for name in old:
        if os.path.lexists(out / name):
            os.replace(out / name, replaced / name)
    for name in new:
        os.replace(staging / name, out / name)
    os.replace(staging / INDEX_NAME, out / INDEX_NAME)
    _fsync_dir(out)
    shutil.rmtree(staging)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_remote_output(out: Location, overwrite: bool) -> None:
    """Refuse an object-store --out that already holds a finished build unless ``overwrite``, or whose
    index.json cannot say what --overwrite may delete; a missing bucket or a refused listing is an
    error before any tokenizing starts."""
    try:
        held = (out / INDEX_NAME).exists()
    except Exception as exc:
        raise remote_error(out, exc) from exc
    if held and not overwrite:
        raise DataError(f"--out {out} already holds shards ({INDEX_NAME}); pass --overwrite to replace them "
                        "or choose another --out")
    if held:
        recorded_files(out)


def upload(staging: Path, out: Location, index: ShardIndex, *, progress: bool = True) -> None:
    """Copy a finished local build to object storage: ``index.json`` of a previous build removed first
    (the prefix then reads as unfinished), then shards and tokenizer, then ``index.json`` last, so a
    reader never sees an index whose shards are not all there. Old shards the new index does not
    name are deleted after the commit: only those a valid old index lists."""
    from tqdm import tqdm

    fs, root = out.fs, out.path.rstrip("/")
    old_shards = set(recorded_files(out)) - {TOKENIZER_DIRNAME}
    files = sorted(p for p in (staging / TOKENIZER_DIRNAME).rglob("*") if p.is_file())
    files += [staging / s.name for s in index.shards]
    try:
        if old_shards:
            fs.rm_file(f"{root}/{INDEX_NAME}")
        with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
                  desc=f"uploading to {out}", disable=not progress) as bar:
            for path in files:
                fs.put_file(str(path), f"{root}/{path.relative_to(staging).as_posix()}")
                bar.update(path.stat().st_size)
        fs.put_file(str(staging / INDEX_NAME), f"{root}/{INDEX_NAME}")
        for name in sorted(old_shards - {s.name for s in index.shards}):
            fs.rm_file(f"{root}/{name}")
    except Exception as exc:
        raise remote_error(out, exc) from exc
