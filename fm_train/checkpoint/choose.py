"""Which checkpoint a ``checkpoint.resume: auto`` start continues from, when some are damaged.

Candidates are the step ``latest`` names, then every other complete step directory, newest first,
of those every rank holds complete (a ``run.dir`` on each node's own disk may differ between nodes).
Each is checked whole before it is chosen (manifest readable, every file present, of its size and
checksum; :mod:`fm_train.checkpoint.integrity`), the ranks splitting the files between them. A
damaged candidate is never loaded and never left where a later save or resume would trip over it:

- an intact older one exists: the run continues from it, **loudly**: one line on rank 0's output
  (which the launcher streams), a ``checkpoint_fallback`` record in ``RUN/failures.jsonl``, the
  damaged directories renamed to ``step_XXXXXXXX.damaged`` (kept for inspection, ignored by resume,
  retention and the converter) and ``latest`` pointed at the one chosen;
- none is intact: the start is refused with a :class:`CheckpointError` (the worker exits 2, the
  launcher does not retry) unless ``checkpoint.allow_fresh_start`` is set, in which case the damaged
  directories are moved aside the same way and a ``checkpoint_fresh_start`` record says so.

Directories without a manifest (a save that died) are skipped with a log line, as before: they were
never checkpoints. A run directory with no checkpoint at all starts fresh quietly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fm_train.checkpoint import collective
from fm_train.checkpoint.events import FALLBACK, FRESH_START, record_event
from fm_train.checkpoint.integrity import damage_message, find_damage
from fm_train.checkpoint.layout import (
    LATEST,
    MANIFEST,
    CheckpointError,
    atomic_write_text,
    checkpoints_dir,
    fsync_dir,
    is_complete,
    list_step_dirs,
    read_latest,
    symlink_problems,
)
from fm_train.checkpoint.manifest import read_manifest

log = logging.getLogger("fm_train.checkpoint")
DAMAGED_SUFFIX = ".damaged"
_SHOWN = 3  # damaged files named per checkpoint in one line; the record lists them all


@dataclass(frozen=True)
class Rejected:
    """A complete step directory that failed its check, and why (one entry per damaged file)."""

    step_dir: Path
    problems: tuple[str, ...]

    def brief(self) -> str:
        """``step_00000024 (a.pt (…), b.pt (…), +3 more)``."""
        shown = ", ".join(self.problems[:_SHOWN])
        more = f", +{len(self.problems) - _SHOWN} more" if len(self.problems) > _SHOWN else ""
        return f"{self.step_dir.name} ({shown}{more})"


def check_step(step_dir: Path) -> list[str]:
    """Every problem of ``step_dir`` (unreadable manifest, missing, resized or changed files); empty when
    intact. Collective: each rank hashes its share of the files and all ranks get the same answer."""
    try:
        manifest = read_manifest(step_dir)
        local = find_damage(step_dir, manifest, rank=collective.rank(), world=collective.world())
    except CheckpointError as exc:
        local = [f"{MANIFEST} ({exc})"]
    local += symlink_problems(step_dir)  # every rank: with a run.dir per node, each looks at its own disk
    problems: list[str] = []
    for part in collective.all_gather(local):
        problems += [p for p in part if p not in problems]
    return problems


def verify_step(step_dir: Path) -> None:
    """Raise a :class:`CheckpointError` naming each damaged file of ``step_dir`` (collective)."""
    problems = check_step(step_dir)
    if problems:
        raise CheckpointError(damage_message(step_dir, problems) + "; copy the files again from where the run "
                              "wrote them, or resume from another step directory")


def _latest_state(ckpt_dir: Path) -> tuple[Path | None, str | None]:
    """``(complete step dir that latest names, what is wrong with latest)``; both None without latest."""
    try:
        latest = read_latest(ckpt_dir)
    except CheckpointError as exc:
        return None, str(exc)
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{Path(ckpt_dir) / LATEST} cannot be read ({exc})"
    if latest is None:
        return None, None
    if not latest.is_dir():
        return None, f"{LATEST} names {latest.name}, which does not exist"
    if not is_complete(latest):
        return None, f"{LATEST} names {latest.name}, which has no {MANIFEST}"
    return latest, None


def _move_aside(step_dir: Path) -> Path:
    """Rename a damaged step directory out of the ``step_XXXXXXXX`` namespace; returns the new path."""
    target = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}.{n}")
    step_dir.rename(target)
    fsync_dir(step_dir.parent)
    return target


def _tidy(ckpt_dir: Path, rejected: list[Rejected], chosen: Path | None) -> list[str]:
    """Rank 0: move the rejected directories aside and point ``latest`` at ``chosen``; every rank gets
    the new paths, or the same error (a rank left alone in a failure would wait forever)."""
    moved: list[str] = []
    error = None
    if collective.rank() == 0:
        try:
            moved = [str(_move_aside(r.step_dir)) for r in rejected]
            if chosen is not None:
                atomic_write_text(Path(ckpt_dir) / LATEST, chosen.name + "\n")
            else:
                (Path(ckpt_dir) / LATEST).unlink(missing_ok=True)  # it names nothing usable now
        except OSError as exc:
            error = (f"cannot move the damaged checkpoint(s) out of {ckpt_dir} ({exc}); move "
                     + ", ".join(r.step_dir.name for r in rejected) + " aside yourself and launch again")
    moved, error = collective.all_gather((moved, error))[0]
    if error:
        raise CheckpointError(error)
    return moved


def _say(run_dir: Path, kind: str, line: str, **details: object) -> None:
    if collective.rank() == 0:
        print(f"fm-train: {line}", flush=True)
        log.warning("%s", line)
        record_event(run_dir, kind, line, **details)


def _details(rejected: list[Rejected], latest_problem: str | None, moved: list[str]) -> dict[str, object]:
    return {"rejected": [{"step_dir": str(r.step_dir), "problems": list(r.problems)} for r in rejected],
            "latest_problem": latest_problem, "moved_to": moved}


def _agreed_order(ckpt_dir: Path, order: list[Path], latest_problem: str | None) -> tuple[list[Path], str | None]:
    """The candidates every rank holds complete, in rank 0's order, and rank 0's ``latest`` problem.

    Every rank must walk the same candidates, or their collective checks pair up different steps and
    one rank waits forever. With a ``run.dir`` on each node's own disk the lists differ: the node of
    rank 0 holds manifests of steps saved after the last one committed in ``run.storage`` (what the
    other nodes fetched), or, before the first commit there, steps that only its node holds; such a
    step is not whole anywhere (storage is where a step becomes a checkpoint) and is skipped, with a
    line saying so. Run directories shared by all ranks (the preflight requires one without
    ``run.storage``) give every rank the same list.
    """
    views = collective.all_gather(([p.name for p in order], latest_problem))
    everywhere = set.intersection(*(set(names) for names, _ in views))
    skipped = [n for n in views[0][0] if n not in everywhere]
    if skipped and collective.rank() == 0:
        line = (f"not resuming from {', '.join(skipped)}: not complete in every node's {ckpt_dir} (a run.dir on each "
                "node's own disk, and never committed in run.storage)")
        print(f"fm-train: {line}", flush=True)
        log.warning("%s", line)
    return [Path(ckpt_dir) / n for n in views[0][0] if n in everywhere], views[0][1]


def choose_resume_point(run_dir: Path, *, allow_fresh_start: bool = False) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (``latest`` first), or None for a fresh start; every
    rank calls it and gets the same answer. See the module docstring for what happens on damage."""
    ckpt_dir = checkpoints_dir(run_dir)
    entries = list_step_dirs(ckpt_dir)
    for _, p in entries:
        if not is_complete(p):
            log.warning("ignoring incomplete checkpoint %s (no %s: the save did not finish)", p, MANIFEST)
    latest, latest_problem = _latest_state(ckpt_dir)
    complete = [p for _, p in entries if is_complete(p)]
    order, latest_problem = _agreed_order(
        ckpt_dir, ([latest] if latest is not None else []) + [p for p in reversed(complete) if p != latest],
        latest_problem)
    rejected: list[Rejected] = []
    for candidate in order:
        problems = check_step(candidate)
        if not problems:
            if rejected or latest_problem:
                moved = _tidy(ckpt_dir, rejected, candidate)
                why = "; ".join([r.brief() + " is damaged" for r in rejected] + ([latest_problem] if latest_problem else []))
                _say(run_dir, FALLBACK, f"resuming from {candidate}, not from the newest checkpoint: {why}"
                     + (f"; moved aside to {', '.join(Path(m).name for m in moved)}" if moved else "")
                     + f" (recorded in {Path(run_dir) / 'failures.jsonl'})",
                     chosen=str(candidate), **_details(rejected, latest_problem, moved))
            return candidate
        rejected.append(Rejected(candidate, tuple(problems)))
    if not rejected and latest_problem is None:
        return None  # nothing was ever committed here: a first start
    why = "; ".join([r.brief() for r in rejected] + ([latest_problem] if latest_problem else []))
    if not allow_fresh_start:
        raise CheckpointError(
            f"{ckpt_dir} holds checkpoints but none is intact: {why}. Not starting from scratch over them: copy the "
            "damaged files back, set checkpoint.resume to an intact step directory, or set "
            "checkpoint.allow_fresh_start=true to train from step 0 (the damaged directories are then moved aside)")
    moved = _tidy(ckpt_dir, rejected, None)
    _say(run_dir, FRESH_START, f"starting from scratch under checkpoint.allow_fresh_start: no checkpoint in {ckpt_dir} "
         f"is intact: {why}" + (f"; moved aside to {', '.join(Path(m).name for m in moved)}" if moved else ""),
         **_details(rejected, latest_problem, moved))
    return None
