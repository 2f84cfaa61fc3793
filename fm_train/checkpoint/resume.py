"""Find what to resume from, convert it when the layout changed, and load it into an engine.

A resume on the same layout loads DeepSpeed's files as they are. When only the data-parallel size
changed, :func:`prepare_resume` converts the step once into DeepSpeed's universal checkpoint (cached
in ``step_XXXXXXXX/universal``) and the engine must be built with ``"checkpoint": {"load_universal":
true}``. When the tensor- or pipeline-parallel size or the ZeRO stage changed (with or without dp),
which DeepSpeed cannot load for fm_train's modules, :func:`load_checkpoint` reshards the step itself
(:mod:`fm_train.checkpoint.reshard`) into an engine built without ``load_universal``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from fm_train.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    UNIVERSAL,
    CheckpointError,
    checkpoints_dir,
    fsync_dir,
    is_complete,
    list_step_dirs,
    parse_step,
    read_latest,
)
from fm_train.checkpoint.choose import choose_resume_point, verify_step
from fm_train.checkpoint.ds_engine import guarded_checkpoint_engine
from fm_train.checkpoint import collective
from fm_train.checkpoint.ds_files import pickle_files, scan_pickles
from fm_train.checkpoint.node_files import checking_share
from fm_train.checkpoint.manifest import missing_files, read_manifest, saved_padded_vocab
from fm_train.checkpoint.rng import load_rng, restore_rng
from fm_train.config import FmConfig
from fm_train.dist import Topology

log = logging.getLogger("fm_train.checkpoint")

# Fields whose change makes the saved tensors unusable (max_seq_len and rope_theta may change on purpose).
SHAPE_FIELDS = ("family", "n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "tie_embeddings",
                "qkv_bias")


def newest_complete(ckpt_dir: Path) -> Path | None:
    """The complete step directory to resume from: the one ``latest`` names, else the newest complete.

    Incomplete directories (no manifest) are skipped and reported, one log line each.
    """
    entries = list_step_dirs(ckpt_dir)
    for _, p in entries:
        if not is_complete(p):
            log.warning("ignoring incomplete checkpoint %s (no %s: the save did not finish)", p, MANIFEST)
    latest = read_latest(ckpt_dir)
    if latest is not None and is_complete(latest):
        return latest
    complete = [p for _, p in entries if is_complete(p)]
    if latest is not None:
        log.warning("%s names %s, which is not a complete checkpoint; using %s", Path(ckpt_dir) / LATEST,
                    latest.name, complete[-1] if complete else "nothing")
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """A step directory from a run dir, a checkpoints dir (via ``latest``) or a step dir itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if parse_step(path.name) is not None or (path / MANIFEST).exists():
        if not is_complete(path):
            raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete checkpoint "
                                  "(the save did not finish); pick another step directory")
        return path
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not list_step_dirs(ckpt_dir):
        raise CheckpointError(f"{path} holds no step_XXXXXXXX directories and no {MANIFEST}: "
                              "not a run dir, checkpoints dir or step dir")
    found = newest_complete(ckpt_dir)
    if found is None:
        raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint (no step directory has a {MANIFEST})")
    return found


def find_resume_point(run_dir: Path, resume: str, *, allow_fresh_start: bool = False) -> Path | None:
    """``resume``: ``"auto"`` (the newest intact step of ``run_dir``, or None), ``"none"`` or a path.

    Every rank calls it (the files' checksums are checked collectively). ``auto`` skips damaged
    checkpoints loudly and refuses a fresh start over nothing but damaged ones unless
    ``allow_fresh_start`` (:func:`fm_train.checkpoint.choose.choose_resume_point`); an explicit path
    that is damaged is an error naming the files.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return choose_resume_point(Path(run_dir), allow_fresh_start=allow_fresh_start)
    step_dir = resolve_checkpoint(Path(resume))
    verify_step(step_dir)
    return step_dir


def _manifest_dir(path: Path) -> Path:
    """The step directory of ``path`` (which may be its ``universal`` sub-directory)."""
    return path.parent if path.name == UNIVERSAL and is_complete(path.parent) else path


def check_compatible(manifest: Mapping[str, Any], config: FmConfig | None, tokenizer_hash: str | None,
                     where: Path) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differ from the current run's."""
    problems = []
    if config is not None:
        saved = manifest["config"]["model"]
        for f in SHAPE_FIELDS:
            now = getattr(config.model, f)
            if saved.get(f) != now:
                problems.append(f"model.{f}: checkpoint {saved.get(f)!r}, config {now!r}")
        saved_rows = saved_padded_vocab(saved)
        if saved.get("vocab_size") == config.model.vocab_size and saved_rows != config.model.padded_vocab_size:
            problems.append(f"model.vocab_multiple: checkpoint {saved.get('vocab_multiple', 1)!r} ({saved_rows} embedding"
                            f" rows), config {config.model.vocab_multiple!r} ({config.model.padded_vocab_size} rows)")
    saved_hash = manifest["data"].get("tokenizer_hash")
    if tokenizer_hash is not None and saved_hash is not None and saved_hash != tokenizer_hash:
        problems.append(f"tokenizer hash: checkpoint {saved_hash}, data {tokenizer_hash}")
    if problems:
        raise CheckpointError(f"cannot resume from {where}: it was trained with another model or tokenizer ("
                              + "; ".join(problems) + "); set checkpoint.resume=none to start fresh, or fix the config")


def needs_reshard(manifest: Mapping[str, Any], tp: int, pp: int, zero_stage: int | None) -> bool:
    """True when the step must be resharded (tp, pp or ZeRO stage changed): DeepSpeed cannot load it.

    ``zero_stage`` None: unknown to the caller, compared as unchanged.
    """
    saved = manifest["topology"]
    return (saved["tp"], saved["pp"]) != (tp, pp) or (zero_stage is not None and saved["zero_stage"] != zero_stage)


def _world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def load_checkpoint(engine: Any, step_dir: Path, *, config: FmConfig | None = None,
                    tokenizer_hash: str | None = None, layout: Mapping[str, Any] | None = None,
                    trust: bool | None = None) -> dict[str, Any]:
    """Load module, optimizer and LR scheduler (and this rank's RNG) from ``step_dir``; all ranks call it.

    Files load with ``weights_only=True`` and DeepSpeed's plain record classes only (an object of any
    other class is refused naming the file) unless ``trust`` (default: ``config.checkpoint.trust_pickles``).
    Checksums are :func:`find_resume_point`'s business; here only the sizes are checked again.

    ``step_dir`` is what :func:`prepare_resume` returned (the step dir or its ``universal`` cache).
    ``config``/``tokenizer_hash`` describe the current run; a different model shape or tokenizer is
    refused before DeepSpeed reads anything. When ``config``'s tp, pp or ZeRO stage differ from the
    step's, the step is resharded into ``engine``; that needs ``layout``, the current engine's names as
    a manifest records them (``topology.pp``, ``layers``, ``tied``, ``param_prefix``; see
    ``fm_train.engine.checkpointing.current_layout``). Returns the manifest (data state, tokens, step).
    """
    step_dir = Path(step_dir)
    if trust is None:
        trust = bool(config is not None and config.checkpoint.trust_pickles)
    manifest_dir = _manifest_dir(step_dir)
    manifest = read_manifest(manifest_dir)
    check_compatible(manifest, config, tokenizer_hash, manifest_dir)
    bad = missing_files(manifest_dir, manifest)
    if bad:
        raise CheckpointError(f"{manifest_dir} is damaged: " + ", ".join(bad))
    if config is not None and needs_reshard(manifest, config.parallel.tp, config.parallel.pp,
                                            config.parallel.zero_stage):
        if not trust:
            check_pickles(manifest_dir)  # names the file with the resume's way to trust it
        return _load_resharded(engine, manifest_dir, manifest, config, layout, trust)
    universal = step_dir.name == UNIVERSAL
    if universal != bool(engine.load_universal_checkpoint()):
        raise CheckpointError(
            f"{step_dir}: the engine has load_universal={engine.load_universal_checkpoint()} but this path "
            f"{'is' if universal else 'is not'} a universal checkpoint; build the engine with "
            '"checkpoint": {"load_universal": <needs_universal from prepare_resume>}')
    saved_dp = manifest["topology"]["dp"]
    if not universal and saved_dp != engine.dp_world_size and manifest["topology"]["zero_stage"] > 0:
        raise CheckpointError(f"{manifest_dir} was saved with dp={saved_dp}, the engine has dp="
                              f"{engine.dp_world_size}; call prepare_resume first (universal checkpoint)")
    if not trust:
        # Before DeepSpeed reads anything, so that every rank refuses alike (the guarded engine below
        # would stop only the rank that loads the file, leaving its peers in a collective). For a
        # universal checkpoint it is the only guard: DeepSpeed's universal loader calls
        # torch.load(weights_only=False) itself, and the cache travels with the step directory.
        check_pickles(step_dir)
    with guarded_checkpoint_engine(engine, trust=trust):
        load_path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed loaded nothing from {step_dir}")
    world, rank = _world_and_rank()
    same_layout = manifest["topology"]["world"] == world
    rng = load_rng(manifest_dir, rank) if same_layout else None
    if rng is not None:
        restore_rng(rng)
    else:
        log.info("rank %d: RNG not restored (layout changed); generators keep their seeded state", rank)
    return manifest


def check_pickles(root: Path) -> None:
    """Check every ``.pt`` file under ``root`` for objects other than tensors and DeepSpeed's plain records;
    collective: the ranks split the files and all raise the same :class:`CheckpointError` naming one."""
    mine = checking_share(root, pickle_files(root), collective.rank(), collective.world(),
                          key=lambda p: p.relative_to(root).as_posix()) or []
    try:
        scan_pickles(root, files=mine)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    errors = [e for e in collective.all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def _load_resharded(engine: Any, step_dir: Path, manifest: Mapping[str, Any], config: FmConfig,
                    layout: Mapping[str, Any] | None, trust: bool) -> dict[str, Any]:
    from fm_train.checkpoint.reshard import load_resharded

    saved, p = manifest["topology"], config.parallel
    if layout is None:
        raise CheckpointError(f"{step_dir} was saved with tp={saved['tp']} pp={saved['pp']} ZeRO-{saved['zero_stage']}, "
                              f"the run has tp={p.tp} pp={p.pp} ZeRO-{p.zero_stage}: pass layout= (the current "
                              "engine's layer table) so that it can be resharded")
    if engine.load_universal_checkpoint():
        raise CheckpointError(f"{step_dir} is resharded by fm-train, not loaded by DeepSpeed: build the engine "
                              "with load_universal=False (what prepare_resume returns for it)")
    world, rank = _world_and_rank()
    tp_rank = Topology(world=world, tp=p.tp, pp=p.pp).coord(rank).tp
    log.info("rank %d: resharding %s (tp=%d pp=%d dp=%d ZeRO-%d) for tp=%d pp=%d dp=%d ZeRO-%d", rank, step_dir,
             saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], p.tp, p.pp, world // (p.tp * p.pp),
             p.zero_stage)
    load_resharded(engine, step_dir, manifest, layout, tp_rank=tp_rank, tp_size=p.tp, trust=trust)
    return manifest


def needs_conversion(manifest: Mapping[str, Any], current: Topology, zero_stage: int | None = None) -> bool:
    """True when DeepSpeed needs the universal checkpoint to load the step on ``current``: only the dp
    size changed, under ZeRO. A tp/pp/ZeRO-stage change is resharded at load time instead."""
    saved = manifest["topology"]
    if needs_reshard(manifest, current.tp, current.pp, zero_stage):
        return False
    if saved["dp"] == current.dp:
        return False
    # Optimizer state partitioned over dp lives in *zero_pp_rank_<dp>_* files (ZeRO >= 1, and the bf16
    # optimizer of a ZeRO-0 pipeline); without them every rank holds whole state and any dp can load it.
    return saved["zero_stage"] > 0 or any("zero_pp_rank_" in name for name in manifest["files"])


def _convert_to_universal(step_dir: Path, zero_stage: int) -> Path:
    """Run DeepSpeed's ds_to_universal into a temp dir next to the cache, then rename it into place."""
    target = step_dir / UNIVERSAL
    tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL}.", dir=str(step_dir)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage <= 2:
        cmd.append("--inject_missing_state")  # ZeRO-1/2 checkpoints lack the universal info it wants
    log.info("converting %s to a universal checkpoint (dp size changed): %s", step_dir, " ".join(cmd))
    # A subprocess: the conversion forks workers and holds the whole state; keep both out of the trainer.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"ds_to_universal failed on {step_dir} (exit {proc.returncode}):\n{tail}")
    tmp.rename(target)
    fsync_dir(step_dir)
    return target


def prepare_resume(step_dir: Path, current_topology: Topology,
                   zero_stage: int | None = None, *, trust: bool = False) -> tuple[Path, bool]:
    """``(path to load, needs_universal)`` for resuming ``step_dir`` on ``current_topology`` (and
    ``zero_stage``, when the caller knows it).

    On a dp-size change alone the step is converted once to a universal checkpoint, cached atomically
    in ``step_dir/universal``; build the engine with ``load_universal`` set to ``needs_universal``. With
    a process group, rank 0 converts and the others wait; call it on every rank. A tp/pp/ZeRO-stage
    change needs nothing here: :func:`load_checkpoint` reshards the step directory itself. Unless
    ``trust``, every file's pickle is checked before DeepSpeed's converter (which unpickles fully)
    reads it.
    """
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    if not needs_conversion(manifest, current_topology, zero_stage):
        return step_dir, False
    target = step_dir / UNIVERSAL
    distributed = dist.is_available() and dist.is_initialized()
    error: str | None = None
    if not target.is_dir() and (not distributed or dist.get_rank() == 0):
        try:
            if not trust:
                scan_pickles(step_dir)
            _convert_to_universal(step_dir, manifest["topology"]["zero_stage"])
        except CheckpointError as exc:
            error = str(exc)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # every rank fails alike, none waits forever
        error = box[0]
    if error:
        raise CheckpointError(error)
    return target, True
