"""Save a step: DeepSpeed's sharded files, per-rank RNG, the probe's reference logits, their
checksums, then the manifest, then ``latest``, then retention. Every rank calls
:func:`save_checkpoint`; rank 0 alone commits and prunes.

The probe (:mod:`fm_train.checkpoint.probe_engine`) is a fixed batch run through the live engine
before anything is written; rank 0 stores its summary as ``probe.safetensors``, which the manifest
names and checksums like any other file, and the converter checks its export against it.

Each rank hashes the files it wrote itself (known from the checkpoint engine it saved through) right
after writing them, while they are still in the page cache, so the cost is spread over the ranks;
rank 0 gathers the digests and hashes only what no rank reported (DeepSpeed's recovery script).

Ordering is what makes a SIGKILL at any instant harmless: until ``manifest.json`` exists the step
directory is ignored by resume and by the converter, and ``latest`` still names the previous step.

A save that fails is classified by its cause: a local one (full disk, permission, read-only file
system) is a :class:`CheckpointError`, which a restart would only repeat; a peer or the network gone
in one of the save's collectives (a rank or node lost mid-save) is
:class:`~fm_train.dist.peer_loss.PeerLost`, after which the run restarts (or shrinks) from ``latest``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from fm_train.checkpoint import collective
from fm_train.deepspeed_adapter.ckpt_engine import guarded_checkpoint_engine
from fm_train.checkpoint.integrity import checksum_record
from fm_train.checkpoint.layout import (
    CheckpointError,
    checkpoints_dir,
    fsync_dir,
    fsync_file,
    is_complete,
    list_step_dirs,
    read_latest,
    step_dir_name,
    write_latest,
)
from fm_train.checkpoint.manifest import complete_manifest, write_manifest
from fm_train.checkpoint.probe import manifest_entry, write_probe
from fm_train.checkpoint.rng import RNG_DIR, save_rng
from fm_train.dist.peer_loss import PeerLost, first_line, is_peer_failure
from fm_train.storage.digest import digest_files
from fm_train.storage.upload import CheckpointUploader

log = logging.getLogger("fm_train.checkpoint")
_barrier, _rank, _world = collective.barrier, collective.rank, collective.world

HOLD_SAVE_ENV = "FM_TRAIN_TEST_HOLD_SAVE"
"""Test hook (see :func:`_hold_for_test`): a directory through which a test holds a save open."""


def save_checkpoint(engine: Any, run_dir: Path, step: int, *, manifest: Mapping[str, Any], keep: int,
                    is_rank0: bool, probe: bool = True, uploader: CheckpointUploader | None = None,
                    timings: dict[str, float] | None = None) -> Path:
    """Save ``engine`` at ``step`` under ``RUN/checkpoints/step_XXXXXXXX``; all ranks call it.

    ``manifest`` is the caller's part (:func:`fm_train.checkpoint.build_manifest`); this adds step,
    the file list, RNG files and package versions. ``keep`` complete checkpoints survive retention.
    Returns the step directory. A complete checkpoint of the same step is left as it is.
    ``probe``: run the probe batch through ``engine`` and store its logits (False only for engines
    that are not fm-train's; the converter then falls back to comparing with its own model).
    ``uploader``: copy this rank's files to ``run.storage`` in the background once the step is
    committed locally (the previous upload is waited for first; :mod:`fm_train.storage.upload`).
    ``timings``: filled with the seconds each phase took on this rank (rank 0 also logs them), so that
    a slow save says where its time went.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpt_dir = checkpoints_dir(run_dir)
    try:
        return _save(engine, ckpt_dir, step, manifest=manifest, keep=keep, is_rank0=is_rank0, probe=probe,
                     uploader=uploader, phases=_Phases(timings))
    except (CheckpointError, PeerLost):
        raise
    except (OSError, RuntimeError) as exc:
        if not is_peer_failure(exc):
            raise
        raise PeerLost(_peer_lost_message(ckpt_dir, step_dir_name(step), exc)) from exc


def _save(engine: Any, ckpt_dir: Path, step: int, *, manifest: Mapping[str, Any], keep: int, is_rank0: bool,
          probe: bool, uploader: CheckpointUploader | None, phases: _Phases) -> Path:
    """The body of :func:`save_checkpoint` (which classifies what it raises)."""
    if uploader is not None:
        with phases("waiting for the previous upload"):
            uploader.wait()  # never two uploads in flight per rank
    tag = step_dir_name(step)
    step_dir = ckpt_dir / tag
    # Every rank decides alike (a run.dir on each node's own disk may hold the step on one node only).
    if all(collective.all_gather(is_complete(step_dir))):
        # Saving the step one resumed from (e.g. a finished run relaunched): the state is already there.
        log.warning("checkpoint %s already exists and is complete; not overwritten", step_dir)
        return step_dir
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if step_dir.exists():
            # Leftover of a save that died at this step; DeepSpeed would mix its files with the new ones.
            log.warning("removing incomplete step directory %s (no manifest) before saving again", step_dir)
            shutil.rmtree(step_dir)
    _barrier()

    # Before any file is written: a probe that fails leaves nothing behind.
    with phases("probe"):
        record = _run_probe(engine, manifest) if probe else None
    precision = str(manifest["config"]["precision"])
    try:
        with phases("files"):
            _hold_for_test(tag)
            with guarded_checkpoint_engine(engine, trust=False) as guard:
                engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
            written = [*guard.saved, save_rng(step_dir, _rank())]
            if record is not None:  # rank 0 only
                written.append(write_probe(step_dir, record, precision=precision))
        with phases("checksums"):
            own = _own_digests(step_dir, written)
    except (OSError, RuntimeError) as exc:
        if is_peer_failure(exc):  # DeepSpeed's save runs collectives too: a peer gone is not a disk problem
            raise
        # torch.save reports a full disk as "RuntimeError: basic_ios::clear: iostream error": say what it means.
        raise CheckpointError(_save_failed_message(ckpt_dir, step_dir, exc)) from exc
    # A collective, so also the barrier: every rank's files are written (closed) before rank 0 looks.
    # Sizes travel with the digests: without a shared run.dir rank 0 does not see the others' files.
    sizes = {rel: (step_dir / rel).stat().st_size for rel in own}
    with phases("waiting for the other ranks"):
        gathered = collective.all_gather((own, sizes))
    digests = {rel: d for part, _ in gathered for rel, d in part.items()}
    mine = sorted(own)

    if is_rank0:
        files = {rel: size for _, part in gathered for rel, size in part.items() if not rel.startswith(RNG_DIR + "/")}
        present = []
        with phases("fsync"):
            for p in sorted(step_dir.rglob("*")):
                if p.is_file():
                    fsync_file(p)  # DeepSpeed's torch.save does not fsync; the manifest must not outrun data
                    rel = str(p.relative_to(step_dir))
                    present.append(rel)
                    if p.parent.name != RNG_DIR:
                        files[rel] = p.stat().st_size
            fsync_dir(step_dir)
        # Files no rank saved through the checkpoint engine (DeepSpeed copies zero_to_fp32.py).
        unowned = [rel for rel in present if rel not in digests]
        with phases("checksums"):
            digests.update(digest_files(step_dir, unowned))
        mine += unowned
        rng_files = [f"{RNG_DIR}/rank_{r:05d}.pt" for r in range(_world())]
        writers = [sorted(part) for part, _ in gathered]
        writers[0] = sorted({*writers[0], *unowned})
        full = complete_manifest(manifest, step=step, tag=tag, files=files, rng_files=rng_files,
                                 checksums=checksum_record(digests), writers=writers,
                                 probe=manifest_entry(record, precision=precision) if record is not None else None)
        with phases("commit"):
            write_manifest(step_dir, full)
            write_latest(ckpt_dir, step_dir)
        with phases("retention"):
            pruned = [p.name for p in apply_retention(ckpt_dir, keep)]
    # A collective, so also the barrier: nobody goes on (or exits) before the checkpoint is committed.
    # Rank 0's retention holds for every disk: without a shared run.dir, the other nodes' staged copies
    # of the steps it deleted go too (they have no manifest there, so no retention of their own).
    with phases("retention"):
        for name in collective.all_gather(pruned if is_rank0 else [])[0]:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    if uploader is not None:
        with phases("hand-over to the upload"):
            uploader.submit(step_dir, mine, own=own, expected=[part for part, _ in gathered] if is_rank0 else None)
    if is_rank0:
        log.info("saved %s in %.2f s (%s)", tag, phases.total, phases.summary())
    return step_dir


class _Phases:
    """Seconds per phase of one save, summed when a phase comes back (checksums: each rank's, then
    rank 0's of the unowned files); written into the caller's ``timings`` as they end."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.seconds: dict[str, float] = timings if timings is not None else {}
        self.seconds.clear()
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.seconds.items())


def _run_probe(engine: Any, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The probe record on rank 0 (None elsewhere), its cost in the log: it runs at every save."""
    from fm_train.checkpoint.probe_engine import engine_probe

    start = time.perf_counter()
    record = engine_probe(engine, manifest["config"]["model"])
    if record is not None:
        log.info("probe: %s tokens through the engine, %.1f KiB kept, in %.3f s",
                 "x".join(str(n) for n in record["input_ids"].shape),
                 sum(t.numel() * t.element_size() for t in record.values()) / 1024, time.perf_counter() - start)
    return record


def _own_digests(step_dir: Path, written: list[Path]) -> dict[str, str]:
    """Digests of the files this rank wrote inside ``step_dir`` (by path relative to it), timed in the log."""
    root = step_dir.resolve()
    rels = [str(p.resolve().relative_to(root)) for p in written if p.resolve().is_relative_to(root)]
    start = time.perf_counter()
    digests = digest_files(step_dir, rels)
    size = sum((step_dir / rel).stat().st_size for rel in rels)
    log.info("rank %d: sha256 of %d file(s), %.1f MiB, in %.3f s", _rank(), len(rels), size / 2**20,
             time.perf_counter() - start)
    return digests


def _hold_for_test(tag: str) -> None:
    """Test hook: hold this save open, every rank at the same point, so that a test can take a peer or
    a node away while the save is in progress (deterministically, not by racing it).

    With ``FM_TRAIN_TEST_HOLD_SAVE=DIR`` and a file ``DIR/<tag>`` (e.g. ``DIR/step_00000012``), each
    rank about to write that step's files creates ``DIR/<tag>.rank_RRRRR`` and waits until the test
    removes ``DIR/<tag>``. Unset (every real run), this is one environment lookup per save.
    """
    folder = os.environ.get(HOLD_SAVE_ENV)
    if not folder or not (Path(folder) / tag).exists():
        return
    hold = Path(folder) / tag
    (Path(folder) / f"{tag}.rank_{_rank():05d}").touch()
    log.warning("rank %d: %s holds the save of %s until %s is removed", _rank(), HOLD_SAVE_ENV, tag, hold)
    while hold.exists():
        time.sleep(0.05)


def _peer_lost_message(ckpt_dir: Path, tag: str, exc: BaseException) -> str:
    """One line: the save stopped because a peer went away, and what ``latest`` still names."""
    try:
        latest = read_latest(ckpt_dir)
    except CheckpointError:
        latest = None
    kept = (f"{ckpt_dir / 'latest'} still names {latest.name}" if latest is not None
            else "no earlier checkpoint exists")
    return (f"rank {_rank()}: saving {tag} stopped because a peer or the network went away ({first_line(exc)});"
            f" {kept}; the launcher restarts the group from it, with fewer workers if a node is gone")


def _save_failed_message(ckpt_dir: Path, step_dir: Path, exc: BaseException) -> str:
    """One line: what failed, how much room is left, and that the previous checkpoint is still usable.

    The partial step directory is removed here (its manifest can no longer be written, so it would only
    hold disk space); resume ignores it either way.
    """
    shutil.rmtree(step_dir, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    try:
        previous = read_latest(ckpt_dir)
    except CheckpointError:
        previous = None
    first = (str(exc).strip().splitlines() or [""])[0]
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"rank {_rank()}: saving {step_dir.name} in {ckpt_dir} failed ({type(exc).__name__}: {first}; "
            f"{free} on that file system); {kept}; free disk space or lower checkpoint.keep, then launch again")


def apply_retention(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` and incomplete ones older than the newest
    complete one; never the one ``latest`` names. Returns what was deleted."""
    entries = list_step_dirs(ckpt_dir)
    complete = [(s, p) for s, p in entries if is_complete(p)]
    if not complete:
        return []
    latest = read_latest(ckpt_dir)
    newest_step = complete[-1][0]
    doomed = [p for _, p in complete[:-keep]] if len(complete) > keep else []
    # An incomplete dir newer than the newest complete one may be a save in flight elsewhere: keep it.
    doomed += [p for s, p in entries if not is_complete(p) and s < newest_step]
    deleted = []
    for p in doomed:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        log.info("retention: deleting %s", p)
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    return deleted

