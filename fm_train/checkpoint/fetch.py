"""Bring the newest checkpoint committed in ``run.storage`` into ``RUN/checkpoints`` for a resume.

With ``run.storage`` a step is a checkpoint once it is committed there, so every node resumes from
the step storage's ``latest`` names, whatever its own disk holds: a node without a shared ``run.dir``
(a fresh machine, a replacement for a lost one, or one that only holds its own ranks' files)
downloads the files of that step it lacks or holds at another size, the manifest last (the local
commit marker, as for a save), then points the local ``latest`` at it. On the layout that saved
the step, a disk gets only the files its ranks read (:mod:`fm_train.checkpoint.node_files`): the
module weights once per pipeline stage and its own ranks' optimizer partitions, not all of them. Local step directories newer
than it were never committed (their upload was cut short) and may hold only this node's files, so
they are moved aside (``step_X.uncommitted``, which resume ignores): all nodes then agree on the step,
the next save of that step is made anew, and a tampered ``latest`` in storage cannot delete a step.
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
import uuid
from pathlib import Path
from typing import Any, Sequence

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
from data_shards.safe_paths import UnsafePathError, resolve_under
from fm_train.checkpoint.manifest import check_manifest
from fm_train.checkpoint.node_files import HELD, files_for_ranks, write_held
from fm_train.dist import Topology
from fm_train.storage.digest import ALGORITHM
from fm_train.storage.fetch import committed_latest, get_file, read_text
from fm_train.storage.upload import storage_root

log = logging.getLogger("fm_train.checkpoint")


def _local(step_dir: Path, rel: str, manifest_uri: Any) -> Path:
    """Where file ``rel`` of a manifest read from storage lands: inside ``step_dir``, or refused."""
    try:
        return resolve_under(step_dir, rel, what=f"{manifest_uri}: files")
    except UnsafePathError as exc:
        raise CheckpointError(str(exc)) from None


def fetch_latest(storage: str, run_dir: Path, *, ranks: Sequence[int] | None = None,
                 topology: Topology | None = None, zero_stage: int | None = None, say=print,
                 name: str | None = None, node_local: bool = False) -> Path | None:
    """The step directory of storage's newest committed checkpoint, made ready under ``run_dir``.

    None when storage holds no committed checkpoint (the local checkpoints are then used as they
    are). Call it once per disk: ``ranks`` are the ranks whose ``run.dir`` is this one; on the layout
    that saved the step (``topology``, ``zero_stage``) only the files they read are fetched
    (:func:`fm_train.checkpoint.node_files.files_for_ranks`), otherwise every file. ``name``: the
    step ``latest`` held when the caller read it (:func:`committed_latest`; read here when None).
    ``node_local``: the run's ranks write to more than one disk, so a local step that storage does not
    hold committed is only this node's part of one, and goes (a shared ``run.dir`` keeps its steps:
    they are whole, e.g. after uploads that failed).
    """
    root = storage_root(storage)
    if name is None:
        name = committed_latest(storage)
    if not name:
        if node_local:
            for _, path in list_step_dirs(checkpoints_dir(run_dir)):
                say(f"removing {path}: {root} holds no committed step yet, and with a run.dir on each node's own disk"
                    " a step is whole only once committed there")
                shutil.rmtree(path, ignore_errors=True)
        return None
    text = read_text(root / name / MANIFEST) if parse_step(name) is not None else None
    if text is None:
        raise CheckpointError(f"{root / LATEST} names {name!r}, which has no {MANIFEST} in storage; it is not a"
                              " committed checkpoint (delete the latest object or point it at a committed step)")
    try:
        manifest = json.loads(text)
        check_manifest(manifest, where=str(root / name / MANIFEST))
    except (ValueError, CheckpointError) as exc:  # JSONDecodeError; the field and file-name checks
        raise CheckpointError(f"{root / name / MANIFEST}: not a manifest fm-train can read ({exc})") from None
    ckpt_dir = checkpoints_dir(run_dir)
    for step, path in list_step_dirs(ckpt_dir) if ckpt_dir.is_dir() else []:
        if step > parse_step(name):
            # Moved aside, not deleted: storage's latest is data too, and an older one must not cost a step.
            aside = path.with_name(f"{path.name}.uncommitted")
            say(f"moving {path} to {aside.name}: newer than {name}, the newest step committed in {root}, so never "
                "committed")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
    step_dir = ckpt_dir / name
    every = sorted({*manifest["files"], *manifest["rng"]["files"]})
    needed = None
    if ranks is not None and topology is not None and zero_stage is not None:
        needed = files_for_ranks(manifest, ranks, topology, zero_stage)
    wanted = every if needed is None else needed
    sizes = manifest["files"]
    missing = [rel for rel in wanted
               if not (step_dir / rel).is_file() or (rel in sizes and (step_dir / rel).stat().st_size != sizes[rel])]
    if missing or not (step_dir / MANIFEST).is_file():
        start = time.perf_counter()
        total = sum(int(sizes.get(rel) or 0) for rel in missing)
        whose = "" if needed is None else f" (what rank(s) {_ranges(ranks)} read)"
        say(f"fetching {name} from {root}: {len(missing)} of {len(every)} files{whose}, {total / 2**20:.1f} MiB")
        (step_dir / MANIFEST).unlink(missing_ok=True)  # not a checkpoint until every file is here
        done = 0
        checksums = manifest.get("checksums") or {}
        digests, algorithm = checksums.get("files", {}), checksums.get("algorithm", ALGORITHM)
        for i, rel in enumerate(missing, 1):
            get_file(root / name / rel, _local(step_dir, rel, root / name / MANIFEST), digests.get(rel), algorithm)
            done += int(sizes.get(rel) or 0)
            if i % 16 == 0 or i == len(missing):
                say(f"  {i}/{len(missing)} files, {done / 2**20:.1f} of {total / 2**20:.1f} MiB")
        say(f"fetched {name} in {time.perf_counter() - start:.1f} s")
    held = [rel for rel in every if (step_dir / rel).is_file()]
    if len(held) < len(every):
        write_held(step_dir, ranks or [], wanted)  # before the manifest: it is what the checks read
    else:
        (step_dir / HELD).unlink(missing_ok=True)
    if not (step_dir / MANIFEST).is_file():
        # The manifest already read and checked, not a second download that could differ from it.
        tmp = step_dir / f".{MANIFEST}.{os.getpid()}.part"
        tmp.write_text(text)
        tmp.replace(step_dir / MANIFEST)
    write_latest(ckpt_dir, step_dir)
    return step_dir


def _ranges(ranks: Sequence[int] | None) -> str:
    """``0-3, 8`` for the ranks 0, 1, 2, 3 and 8."""
    out: list[str] = []
    for rank in sorted(ranks or []):
        if out and out[-1].split("-")[-1] == str(rank - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{rank}"
        else:
            out.append(str(rank))
    return ", ".join(out)


def _disk_token(run_dir: Path, nonce: str) -> str:
    """The same string on every rank whose ``run_dir`` is this very directory, another on other disks.

    The first rank to link its token into place wins (``link`` fails when the name exists, also on
    NFS); the others read the winner's. ``nonce`` (agreed by all ranks) makes the name new at each
    start, so a run directory copied to another machine does not carry a stale answer along.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f".disk-{nonce}"
    mine = run_dir / f".disk-{nonce}.{os.getpid()}.{uuid.uuid4().hex}"
    mine.write_text(uuid.uuid4().hex)
    try:
        os.link(mine, final)
    except FileExistsError:
        pass
    finally:
        mine.unlink(missing_ok=True)
    return final.read_text()


def fetch_on_each_node(storage: str, run_dir: Path, *, topology: Topology, zero_stage: int) -> None:
    """Every rank calls this: the lowest rank of each disk (the ranks sharing ``run_dir``) fetches for
    all of them (:func:`fetch_latest`), the others wait; a failure anywhere is raised on every rank
    (nobody is left waiting in a collective)."""
    # One reading of storage's latest for every node: read once per node, a commit landing in between
    # (the upload of the attempt before this one finishing) would send the nodes to different steps.
    name, error = "", ""
    if collective.rank() == 0:
        try:
            name = committed_latest(storage)
        except CheckpointError as exc:
            error = str(exc)
    name, error, nonce = collective.all_gather((name, error, uuid.uuid4().hex))[0]
    if error:
        raise CheckpointError(error)
    token = _disk_token(Path(run_dir), nonce)
    tokens = collective.all_gather(token)
    sharing = [r for r, t in enumerate(tokens) if t == token]
    if collective.rank() == sharing[0]:
        try:
            fetch_latest(storage, run_dir, ranks=sharing, topology=topology, zero_stage=zero_stage,
                         say=lambda line: print(line, flush=True), name=name, node_local=len(set(tokens)) > 1)
        except Exception as exc:
            error = f"rank {collective.rank()}: {exc}"
    errors = [e for e in collective.all_gather(error) if e]
    if collective.rank() == sharing[0]:
        (Path(run_dir) / f".disk-{nonce}").unlink(missing_ok=True)
    if errors:
        raise CheckpointError("fetching the checkpoint from run.storage failed: " + "; ".join(errors))
