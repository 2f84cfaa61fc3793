"""One export of ``convert.every`` in the export process (:mod:`fm_train.convert.background`): a committed
step -> ``RUN/hf_steps/step_X`` by :func:`fm_train.convert.export.convert_checkpoint` (checksums, staging,
probe-verified logits, rename), then ``latest``, the copy in ``run.storage`` and ``convert.keep``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fm_train.checkpoint import read_manifest
from fm_train.checkpoint.integrity import recorded_files
from fm_train.convert.errors import ConvertError
from fm_train.convert.export import convert_checkpoint
from fm_train.convert.exports_dir import HF_STEPS, LATEST, export_name, exports_root, prune, step_of, write_latest
from fm_train.convert.hf_files import matching_tokenizer
from fm_train.convert.out_dir import RECORD

Progress = Callable[[str], None]


def export_step(job: Mapping[str, Any], progress: Progress) -> tuple[Path, list[str]]:
    """Export ``job["step_dir"]`` (the snapshot of step ``job["step"]``); returns (the export, notes)."""
    step, run_dir = int(job["step"]), Path(job["run_dir"])
    root, name = exports_root(run_dir), export_name(step)
    out, notes = root / name, []
    storage = job.get("storage")
    if (out / RECORD).is_file():
        notes.append(f"{out} was already there (a resumed run): kept")
    elif out.exists() or out.is_symlink():
        raise ConvertError(f"{out} exists but is not an export fm-train wrote (no {RECORD}); move it away")
    else:
        step_dir = Path(job["step_dir"])
        manifest = read_manifest(step_dir)
        missing = [rel for rel in recorded_files(manifest) if not (step_dir / rel).is_file()]
        if missing and storage:
            # No shared run.dir: this node holds its own ranks' files only; storage holds all once committed.
            notes.append(f"converted from {storage} ({len(missing)} files of the step are on other nodes)")
            try:
                tokenizer: Path | None = matching_tokenizer(manifest, run_dir, None, progress)[0]
            except ConvertError:
                tokenizer = None  # e.g. shards in object storage: the conversion fetches their tokenizer
            _from_storage(storage, name, out, job, tokenizer, progress)
        else:
            if missing:
                raise ConvertError(f"{step_dir} lacks {len(missing)} of the step's files (e.g. {missing[0]}): they "
                                   "are on other nodes' disks; give the nodes a shared run.dir or set run.storage")
            tokenizer, _ = matching_tokenizer(manifest, run_dir, None, progress)
            convert_checkpoint(step_dir, out, dtype=job["dtype"], tokenizer=tokenizer, progress=progress,
                               source_label=str(run_dir / "checkpoints" / name))  # not the snapshot's hidden path
    write_latest(root, name)
    deleted, busy = prune(root, int(job["keep"]))
    if deleted:
        notes.append(f"convert.keep={job['keep']}: deleted {', '.join(deleted)}")
    if busy:
        notes.append(f"kept {', '.join(busy)} while fm-train eval reads it")
    if storage:
        notes.append(_upload(out, storage, name, int(job["keep"]), int(job.get("retries", 5)), progress))
    return out, notes


def _from_storage(storage: str, name: str, out: Path, job: Mapping[str, Any], tokenizer: Path | None,
                  progress: Progress) -> None:
    """Convert step ``name`` from ``run.storage`` once its manifest (the commit marker there) is uploaded;
    ``tokenizer``: the run's, found on this node (None: the one next to the shards in storage)."""
    from fm_train.convert.remote import checkpoint_in_storage
    from fm_train.storage.upload import storage_root

    step = storage_root(storage) / name
    deadline = time.monotonic() + float(job.get("commit_wait_s", 3600.0))
    while not (step / "manifest.json").exists():
        if time.monotonic() > deadline:
            raise ConvertError(f"{step} was not committed within {job.get('commit_wait_s')} s (no manifest.json); "
                               "the checkpoint upload failed or is slow (see the log)")
        time.sleep(2.0)
        if hasattr(step, "fs"):
            step.fs.invalidate_cache()
    with checkpoint_in_storage(str(step), progress) as (local, in_storage, fetched):
        convert_checkpoint(local, out, dtype=job["dtype"], tokenizer=tokenizer or fetched, in_storage=in_storage,
                           progress=progress)


def _upload(out: Path, storage: str, name: str, keep: int, retries: int, progress: Progress) -> str:
    """Copy the export to ``<run.storage>/hf_steps/NAME/`` (marker last), point ``latest`` at it, and keep the
    newest ``keep`` there; returns a note."""
    from fm_train.storage.log_copies import HF_MARKER, publish_hf_dir
    from fm_train.storage.upload import retrying, storage_location, write_bytes

    uri = publish_hf_dir(out, storage, folder=f"{HF_STEPS}/{name}", retries=retries, progress=progress)
    folder = storage_location(storage) / HF_STEPS
    retrying(f"writing {folder / LATEST}", lambda: write_bytes(folder / LATEST, (name + "\n").encode()), retries, 1.0)
    try:
        children = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        children = []
    steps = sorted((step_of(p.name), p) for p in children if step_of(p.name) is not None)
    done = [p for _, p in steps if (p / HF_MARKER).exists()]
    for old in done[:-keep] if len(done) > keep else []:
        if old.name != name:
            _remove(old / HF_MARKER)  # first: a half-deleted copy must not look complete
            _remove(old, tree=True)
    return f"uploaded to {uri}"


def _remove(path: Any, tree: bool = False) -> None:
    """Delete a file (or, with ``tree``, a folder) in a mounted directory or an object store."""
    if not isinstance(path, Path):
        path.fs.rm(path.path, recursive=tree)
    elif tree:
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
