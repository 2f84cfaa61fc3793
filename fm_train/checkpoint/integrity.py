"""Checksums of a step directory's files: computed after each rank writes its files, recorded in the
manifest, checked before resume and conversion.

The manifest's ``checksums`` field is ``{"algorithm": "sha256", "files": {relative path: hex digest}}``
and covers every file of the step directory (DeepSpeed's files, ``rng/``, the recovery script), not
the manifest itself. sha256 because it is the fastest of hashlib's strong hashes where the CPU has
SHA extensions (about 1 GiB/s per core measured on the CI machines, blake2b about 0.55), and every
tool can check it (``sha256sum``). Manifests written before checksums existed have no such field:
only the sizes in ``files`` are checked then, and :func:`find_damage` says so once in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from fm_train.checkpoint.layout import MANIFEST
from fm_train.checkpoint.node_files import HELD, checking_share, held_problem, read_held
from fm_train.storage.digest import ALGORITHM, file_digest, hash_threads

log = logging.getLogger("fm_train.checkpoint")


def checksum_record(digests: Mapping[str, str], algorithm: str = ALGORITHM) -> dict[str, Any]:
    """The manifest's ``checksums`` value for ``digests``."""
    return {"algorithm": algorithm, "files": dict(sorted(digests.items()))}


def recorded_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every file a manifest vouches for (by size, by checksum or both), sorted."""
    return sorted(set(manifest.get("files", {})) | set(manifest.get("checksums", {}).get("files", {})))


def _problem(step_dir: Path, rel: str, size: int | None, digest: str | None, algorithm: str) -> str | None:
    path = Path(step_dir) / rel
    if not path.is_file():
        return f"{rel} (missing)"
    have = path.stat().st_size
    if size is not None and have != size:
        return f"{rel} ({have} bytes, manifest says {size})"
    if digest is not None and file_digest(path, algorithm) != digest:
        return f"{rel} ({algorithm} differs from the manifest's: its bytes changed after the save)"
    return None


def find_damage(step_dir: Path, manifest: Mapping[str, Any], *, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of the files ``manifest`` records: missing, of another size,
    or with another checksum; one entry per damaged file, naming it. Empty when the share is intact.
    A directory that holds part of the files (:mod:`fm_train.checkpoint.node_files`) is checked for
    those it holds, by the ranks it holds them for."""
    sizes = manifest.get("files", {})
    checksums = manifest.get("checksums") or {}
    digests = checksums.get("files", {})
    algorithm = checksums.get("algorithm", ALGORITHM)
    if not digests and rank == 0:
        log.warning("%s: the manifest has no checksums (written by an older fm-train); only file sizes are "
                    "checked", step_dir)
    if digests and algorithm not in hashlib.algorithms_available:
        return [f"manifest.json (checksum algorithm {algorithm!r} is not available in this Python)"]
    extra = unrecorded_files(step_dir, manifest)  # every rank: with a run.dir per node, its own disk
    held = read_held(step_dir)
    wrong = held_problem(held, manifest) if held is not None else None
    if wrong is not None:
        return [wrong, *extra]
    mine = checking_share(step_dir, recorded_files(manifest), rank, world)
    if mine is None:
        held = read_held(step_dir) or {}
        return [f"{HELD} (this directory holds only the files ranks {held.get('ranks')} read, fetched from "
                f"run.storage; rank {rank} is not among them: resume with run.storage set, or convert from it)"]
    with ThreadPoolExecutor(max_workers=hash_threads(len(mine))) as pool:
        found = pool.map(lambda rel: _problem(step_dir, rel, sizes.get(rel), digests.get(rel), algorithm), mine)
        return [p for p in found if p is not None] + extra


# Names in a step directory that the manifest does not list but fm-train writes or reads: the manifest
# itself, the fetch's record of a partial copy, and the universal/ folder older versions cached (never read).
_UNLISTED_OK = {MANIFEST, HELD}
_IGNORED_DIRS = {"universal"}


def unrecorded_files(step_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """One entry per file of ``step_dir`` the manifest does not record: DeepSpeed finds its files by
    globbing, so an added ``mp_rank_*`` or ``layer_*`` file would be read although no checksum covers it."""
    rng, probe = manifest.get("rng") or {}, manifest.get("probe") or {}
    known = set(recorded_files(manifest)) | _UNLISTED_OK | set(rng.get("files", [])) | {probe.get("file")}
    found = []
    for current, dirs, files in os.walk(step_dir):
        rel_dir = os.path.relpath(current, step_dir)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in _IGNORED_DIRS]
        for name in files:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            if rel not in known:
                found.append(f"{rel} (not recorded in the manifest: fm-train wrote no such file; remove it or copy "
                             "the step again)")
    return sorted(found)


def find_damage_in_storage(remote: Any, local: Path, manifest: Mapping[str, Any]) -> list[str]:
    """What is wrong with a step read in place from object storage (``remote``, a ``UPath``) whose
    other files were copied into ``local``: every recorded file's size, from one listing of ``remote``,
    and the checksums of the files in ``local``; a size the store does not report is not compared.

    The DeepSpeed ``.pt`` files in storage are not hashed: that would read every byte (the Adam
    moments too, two thirds of an optimizer file, which a conversion never needs). A damaged pickle
    fails to load, and the weights read are checked by the probe's logits instead.
    """
    listed = {path[len(remote.path.rstrip("/")) + 1:]: info.get("size")
              for path, info in remote.fs.find(remote.path, detail=True).items()}
    digests = (manifest.get("checksums") or {}).get("files", {})
    algorithm = (manifest.get("checksums") or {}).get("algorithm", ALGORITHM)
    problems = []
    for rel in recorded_files(manifest):
        size = manifest.get("files", {}).get(rel)
        if rel not in listed:
            problems.append(f"{rel} (missing in {remote})")
        elif size is not None and listed[rel] is not None and int(listed[rel]) != size:
            problems.append(f"{rel} ({listed[rel]} bytes in storage, manifest says {size})")
        elif (Path(local) / rel).is_file():
            problems += [p for p in [_problem(local, rel, size, digests.get(rel), algorithm)] if p]
    return problems


def damage_message(step_dir: Path, problems: list[str]) -> str:
    """One line naming the damaged step directory and each damaged file."""
    return f"{step_dir} is damaged: " + ", ".join(problems)
