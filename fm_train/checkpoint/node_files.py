"""Which files of a step directory the ranks of one node read, and the record of what a node holds.

Without a shared ``run.dir`` each node resumes from its own disk, fetching from ``run.storage`` what
it lacks (:mod:`fm_train.checkpoint.fetch`). On the layout that saved the step (same world, tp, pp, ep
and ZeRO stage) a rank reads only part of it, so a node fetches only that part:

- every file the rank itself wrote (its RNG state, its ZeRO partition ``[bf16_]zero_pp_rank_D_...``);
- every file that is not one rank's own (neither ``zero_pp_rank_D_*`` nor ``rng/rank_R.pt``) written
  by a rank of the same pipeline stage: the ``mp_rank_XX_model_states.pt`` (module weights, LR
  scheduler, counters) and ``layer_LL-model_TT-model_states.pt`` files that the stage's dp rank 0
  wrote for all of them. All tp ranks' files of the stage, not just its own: DeepSpeed's pipeline
  loader globs a layer's files and merges or splits them when it finds fewer than its tp size;
- every rank's ``mp_rank_XX_model_states.pt``: DeepSpeed's loader globs them too and refuses to load
  when it finds fewer than the saved model-parallel size (a pipeline's are small: its weights are in
  the layer files).

That is the module weights once per stage plus the node's own optimizer partitions, not every
rank's; any other layout needs every file (resharding reads them all), and so
does a manifest without ``writers`` (written by an older fm-train).

A node's step directory then holds part of the files; ``.held.json`` next to the manifest says which
and for which ranks, so the integrity checks split exactly those files among exactly those ranks
(:func:`checking_share`), and a converter pointed at the directory is told where the rest is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from fm_train.checkpoint.layout import CheckpointError, atomic_write_text
from fm_train.dist import Topology

T = TypeVar("T")
HELD = ".held.json"
# A file that belongs to one rank alone: its ZeRO partition (weights/optimizer) or its RNG state.
_ONE_RANKS = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_\d+_|^rng/rank_\d+\.pt$")
_MODEL_STATES = re.compile(r"^mp_rank_\d+_model_states\.pt$")


def same_layout(manifest: Mapping[str, Any], topology: Topology, zero_stage: int) -> bool:
    """Whether ``topology`` and ``zero_stage`` are the ones that saved ``manifest``'s step."""
    saved = manifest["topology"]
    return ((saved["world"], saved["tp"], saved["pp"], saved.get("ep", 1), saved["zero_stage"])
            == (topology.world, topology.tp, topology.pp, topology.ep, zero_stage))


def files_for_ranks(manifest: Mapping[str, Any], ranks: Iterable[int], topology: Topology,
                    zero_stage: int) -> list[str] | None:
    """The files ``ranks`` read to resume on ``topology`` (sorted); None when they need every file."""
    writers: Sequence[Sequence[str]] | None = manifest.get("writers")
    if writers is None or len(writers) != topology.world or not same_layout(manifest, topology, zero_stage):
        return None
    needed: set[str] = set()
    for rank in ranks:
        stage = topology.coord(rank).pp
        needed.update(writers[rank])
        for peer, files in enumerate(writers):
            if peer != rank and topology.coord(peer).pp == stage:
                needed.update(f for f in files if not _ONE_RANKS.search(f))
            needed.update(f for f in files if _MODEL_STATES.match(f))
    return sorted(needed)


def write_held(step_dir: Path, ranks: Sequence[int], files: Sequence[str]) -> None:
    """Record that ``step_dir`` holds ``files`` only, for ``ranks`` (the ranks sharing this disk)."""
    atomic_write_text(Path(step_dir) / HELD, json.dumps({"ranks": sorted(ranks), "files": sorted(files)}) + "\n")


def read_held(step_dir: Path) -> dict[str, list] | None:
    """``{"ranks": [...], "files": [...]}`` of a step directory holding part of its files; None: all of them.

    The record excuses files from the checks, so it is checked as data: a list of ranks and a list of
    plain file names, or a :class:`CheckpointError` (:func:`held_problem` checks it against the manifest)."""
    path = Path(step_dir) / HELD
    try:
        held = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); delete the step directory and fetch it again")
    ranks, files = (held.get("ranks"), held.get("files")) if isinstance(held, dict) else (None, None)
    if not (isinstance(ranks, list) and all(type(r) is int and r >= 0 for r in ranks) and ranks
            and isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise CheckpointError(f"{path} is not a record fm-train wrote (ranks and files lists); delete the step "
                              "directory and fetch it again")
    return held


def held_problem(held: Mapping[str, Any], manifest: Mapping[str, Any]) -> str | None:
    """Why ``held`` cannot be what the fetch wrote for ``manifest``'s step: its files must be exactly those its
    ranks read on the layout that saved the step (:func:`files_for_ranks`); a planted record listing fewer
    files would exempt the rest from every check."""
    saved = manifest["topology"]
    topology = Topology(world=saved["world"], tp=saved["tp"], pp=saved["pp"])
    if any(r >= topology.world for r in held["ranks"]):
        return f"{HELD} (ranks {held['ranks']} outside the step's world of {topology.world})"
    want = files_for_ranks(manifest, held["ranks"], topology, saved["zero_stage"])
    if want is None or sorted(held["files"]) != want:
        return f"{HELD} (it does not list the files ranks {held['ranks']} read: not written by fm-train's fetch)"
    return None


def checking_share(step_dir: Path, items: list[T], rank: int, world: int, *, key=str) -> list[T] | None:
    """The part of ``items`` (files of ``step_dir``) that ``rank`` checks; None when this rank's node does
    not hold ``step_dir`` for it.

    A whole directory (shared, or complete on every node) is split among all ranks; one that holds part
    of the files is split among the ranks sharing that disk, over the files it holds (``key`` maps an
    item to its path relative to ``step_dir``).
    """
    held = read_held(step_dir)
    if held is None:
        return items[rank::world]
    if rank not in held["ranks"]:
        return None
    mine = set(held["files"])
    kept = [item for item in items if key(item) in mine]
    position = held["ranks"].index(rank)
    return kept[position::len(held["ranks"])]
