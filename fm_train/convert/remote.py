"""``fm-train convert`` from and to object storage (``s3://...``, any fsspec URI).

A checkpoint in storage (the committed step: the one ``latest`` names when given a run or its
``checkpoints/``) is converted without a local copy: its DeepSpeed ``.pt`` files are read in place,
the pickle and then only the fp32 weights' byte ranges (:mod:`fm_train.storage.ranged_reads`);
only its small files (manifest, probe) go into a temporary directory, removed afterwards. A
tokenizer that lives next to shards in storage (``data.sources[0].path/tokenizer`` of the manifest)
is fetched there too. An ``--out`` URI gets the finished, verified Hugging Face directory uploaded
into it, ``config.json`` last.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from data_shards.safe_paths import UnsafePathError, key_under, relative_name, resolve_under
from fm_train.checkpoint.layout import CHECKPOINTS, LATEST, MANIFEST, parse_step
from fm_train.config.storage_uri import uri_errors, uri_scheme
from fm_train.convert.errors import ConvertError
from fm_train.convert.out_dir import RECORD

Progress = Callable[[str], None]


def is_uri(value: str | Path) -> bool:
    """Whether ``value`` names object storage (not a local path or ``file://``)."""
    return uri_scheme(str(value)) is not None


def _location(uri: str, what: str) -> Any:
    problems = uri_errors(what, uri)
    if problems:
        raise ConvertError(problems[0])
    from upath import UPath

    return UPath(uri)


def _step_in_storage(root: Any) -> Any:
    """The committed step directory ``root`` names: itself, or what its ``latest`` (or ``checkpoints/latest``) names."""
    for folder in (root, root / CHECKPOINTS):
        if (folder / MANIFEST).exists():
            return folder
        latest = folder / LATEST
        if latest.exists():
            name = latest.read_text().strip()
            if parse_step(name) is None:
                raise ConvertError(f"{latest} names {name[:80]!r}, which is not a step directory name (step_XXXXXXXX)")
            step = folder / name
            if (step / MANIFEST).exists():
                return step
            raise ConvertError(f"{latest} names {step.name}, which has no {MANIFEST}: not a committed checkpoint")
    raise ConvertError(f"{root} holds no {MANIFEST} and no {LATEST}: not a step directory, checkpoints/ or run in storage")


def _download_tree(remote: Any, local: Path, progress: Progress, *, skip_hidden: bool = True,
                   skip_suffix: str | None = None) -> int:
    """Copy every file under ``remote`` into ``local`` (but those ending in ``skip_suffix``); returns the bytes copied."""
    fs, base = remote.fs, remote.path.rstrip("/")
    total = 0
    for path, info in sorted(fs.find(base, detail=True).items()):
        try:
            rel = key_under(base, path, what=str(remote)).as_posix()
        except UnsafePathError as exc:
            raise ConvertError(f"{exc}; fm-train writes no such keys: the bucket was altered, convert another step")\
                from None
        if skip_hidden and any(part.startswith(".") for part in rel.split("/")):
            continue  # upload markers (.uploaded/, .failed/)
        if skip_suffix is not None and rel.endswith(skip_suffix):
            continue
        target = resolve_under(local, rel, what=str(remote))
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
        total += int(info.get("size") or 0)
    return total


@contextlib.contextmanager
def checkpoint_in_storage(uri: str, progress: Progress) -> Iterator[tuple[Path, Any, Path | None]]:
    """``(local directory with the step's small files, the step in storage, local tokenizer dir or None)``
    of checkpoint ``uri``, for the conversion only; its ``.pt`` files stay in storage, read in place."""
    step = _step_in_storage(_location(uri, "CHECKPOINT"))
    with tempfile.TemporaryDirectory(prefix="fm-train-convert-") as tmp:
        local = Path(tmp) / "run" / CHECKPOINTS / step.name
        size = _download_tree(step, local, progress, skip_suffix=".pt")
        progress(f"reading {step} in place (its manifest and probe, {size / 2**20:.1f} MiB, fetched to a temporary"
                 " directory)")
        tokenizer = None
        sources = json.loads((local / MANIFEST).read_text())["config"].get("data", {}).get("sources") or []
        if sources and is_uri(sources[0]["path"]):
            remote_tok = _location(sources[0]["path"].rstrip("/") + "/tokenizer", "data.sources[0].path")
            if remote_tok.exists():
                tokenizer = Path(tmp) / "tokenizer"
                _download_tree(remote_tok, tokenizer, progress)
        yield local, step, tokenizer


def _old_record(remote: Any, uri: str) -> dict[str, Any]:
    """The record of the export at ``uri`` that ``--overwrite`` replaces; refused when it has none."""
    try:
        record = json.loads((remote / RECORD).read_text())
        files = record["files"] if record.get("tool") == "fm-train convert" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise ConvertError(f"{uri} holds a model but no valid {RECORD}: it was not written by fm-train convert, so "
                           "--overwrite will not replace it; choose another --out or clear that prefix yourself")
    return files


def upload_dir(local: Path, uri: str, *, overwrite: bool, progress: Progress) -> str:
    """Upload a finished Hugging Face directory to ``uri`` (``config.json`` last); returns ``uri``.

    With ``overwrite``, files of the old export (its record's names, checked by the path boundary) that the
    new one does not have are deleted afterwards when their size is still the recorded one."""
    remote = _location(uri, "--out")
    old: dict[str, Any] = {}
    if (remote / "config.json").exists():
        if not overwrite:
            raise ConvertError(f"{uri} already holds a model (config.json); pass --overwrite to replace it")
        old = _old_record(remote, uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    last = [p for p in files if p.name == "config.json"]
    for p in [q for q in files if q.name != "config.json"] + last:
        remote.fs.put_file(str(p), (remote / p.relative_to(local).as_posix()).path)
    new = {p.relative_to(local).as_posix() for p in files}
    for name, facts in old.items():
        try:
            rel = relative_name(name, what=f"{uri}/{RECORD}: files").as_posix()
        except UnsafePathError as exc:
            progress(f"not deleting {exc}")
            continue
        target = (remote / rel).path
        if rel not in new and isinstance(facts, dict) and remote.fs.exists(target) \
                and remote.fs.size(target) == facts.get("size"):
            remote.fs.rm_file(target)
    progress(f"uploaded {len(files)} files to {uri}")
    return uri


@contextlib.contextmanager
def remote_output(uri: str, *, overwrite: bool, progress: Progress) -> Iterator[tuple[Path, Callable[[], str]]]:
    """``(a temp dir for the converter to write, publish)``: ``publish()`` uploads it to ``uri``."""
    remote = _location(uri, "--out")
    if (remote / "config.json").exists():  # before hours of converting
        if not overwrite:
            raise ConvertError(f"{uri} already holds a model (config.json); pass --overwrite to replace it")
        _old_record(remote, uri)
    with tempfile.TemporaryDirectory(prefix="fm-train-convert-out-") as tmp:
        local = Path(tmp) / "hf"
        yield local, lambda: upload_dir(local, uri, overwrite=overwrite, progress=progress)
