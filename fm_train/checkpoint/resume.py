"""Find what to resume from and load it into an engine, resharding it when the layout changed.

A resume on the same layout loads DeepSpeed's files as they are, through the guarded checkpoint engine
(:mod:`fm_train.deepspeed_adapter.ckpt_engine`: ``weights_only`` unpickling unless the run trusts its pickles).
When the tensor-, pipeline- or expert-parallel size, the ZeRO stage, or the data-parallel size of
partitioned optimizer state changed, :func:`load_checkpoint` reshards the step itself
(:mod:`fm_train.checkpoint.reshard`): one path for every layout change, reading only files the
manifest's checksums cover, each through the same pickle boundary. DeepSpeed's universal checkpoint
(``ds_to_universal``) is not used: its converter and loader unpickle fully, and its output directory
would be files no checksum covers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from fm_train.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    CheckpointError,
    checkpoints_dir,
    is_complete,
    list_step_dirs,
    parse_step,
    read_latest,
    refuse_symlinks,
    step_dir_name,
)
from fm_train.checkpoint.choose import choose_resume_point, verify_step
from fm_train.deepspeed_adapter.ckpt_engine import guarded_checkpoint_engine
from fm_train.checkpoint import collective
from fm_train.deepspeed_adapter.ckpt_files import scan_pickles
from fm_train.checkpoint.integrity import recorded_files
from fm_train.checkpoint.node_files import checking_share
from fm_train.checkpoint.manifest import missing_files, read_manifest, saved_padded_vocab
from fm_train.checkpoint.rng import load_rng, restore_rng
from fm_train.config import FmConfig
from fm_train.dist import Topology

log = logging.getLogger("fm_train.checkpoint")

# Fields whose change makes the saved tensors unusable (max_seq_len and rope_theta may change on purpose).
SHAPE_FIELDS = ("family", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
                "tie_embeddings", "qkv_bias", "moe")
#: What of ``model.moe`` fixes the parameters' shapes (the routing coefficients may change on resume).
MOE_SHAPE_FIELDS = ("experts", "expert_ffn_hidden", "dense_layers")


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
    """``resume``: ``"auto"`` (the newest intact step of ``run_dir``, or None), ``"latest"`` (the same,
    but a run without one is an error), ``"none"``, a step number of ``run_dir`` or a path.

    Every rank calls it (the files' checksums are checked collectively). ``auto`` skips damaged
    checkpoints loudly and refuses a fresh start over nothing but damaged ones unless
    ``allow_fresh_start`` (:func:`fm_train.checkpoint.choose.choose_resume_point`); an explicit step
    or path that is missing or damaged is an error naming it.
    """
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        found = choose_resume_point(Path(run_dir), allow_fresh_start=allow_fresh_start)
        if found is None and resume == "latest":
            raise CheckpointError(f"checkpoint.resume=latest, but {checkpoints_dir(run_dir)} holds no checkpoint;"
                                  " use auto (resume if there is one, else start fresh) or none")
        return found
    if resume.isdigit():
        step_dir = checkpoints_dir(run_dir) / step_dir_name(int(resume))
        if not step_dir.is_dir():
            saved = [str(step) for step, p in list_step_dirs(checkpoints_dir(run_dir)) if is_complete(p)]
            raise CheckpointError(f"checkpoint.resume={resume}: {step_dir} does not exist; the steps saved in"
                                  f" {checkpoints_dir(run_dir)} are {', '.join(saved) or 'none'}")
        verify_step(step_dir)
        return step_dir
    step_dir = resolve_checkpoint(Path(resume))
    verify_step(step_dir)
    return step_dir


def check_compatible(manifest: Mapping[str, Any], config: FmConfig | None, tokenizer_hash: str | None,
                     where: Path) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differ from the current run's."""
    problems = []
    if config is not None:
        saved = manifest["config"]["model"]
        for f in SHAPE_FIELDS:
            now = getattr(config.model, f)
            then = saved.get(f)
            if f == "moe":  # compared by what sets the experts' shapes; None: a dense model
                now = None if now is None else {k: getattr(now, k) for k in MOE_SHAPE_FIELDS}
                then = None if then is None else {k: then.get(k) for k in MOE_SHAPE_FIELDS}
            if then != now:
                problems.append(f"model.{f}: checkpoint {then!r}, config {now!r}")
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


def needs_reshard(manifest: Mapping[str, Any], tp: int, pp: int, zero_stage: int | None,
                  dp: int | None = None, ep: int = 1) -> bool:
    """True when fm-train reshards the step (DeepSpeed's loaders need the saved layout): tp, pp, ep or the
    ZeRO stage changed, or the dp size did while the optimizer state is partitioned over dp.

    ``zero_stage``/``dp`` None: unknown to the caller, compared as unchanged.
    """
    saved = manifest["topology"]
    if (saved["tp"], saved["pp"], saved.get("ep", 1)) != (tp, pp, ep) or (
            zero_stage is not None and saved["zero_stage"] != zero_stage):
        return True
    return dp is not None and saved["dp"] != dp and _dp_partitioned(manifest)


def _dp_partitioned(manifest: Mapping[str, Any]) -> bool:
    """True when the step's optimizer state is partitioned over dp: *zero_pp_rank_<dp>_* files (ZeRO >= 1, and
    the bf16 optimizer of a ZeRO-0 pipeline). Without them every rank holds whole state and any dp loads it."""
    return manifest["topology"]["zero_stage"] > 0 or any("zero_pp_rank_" in name for name in manifest["files"])


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

    ``step_dir`` is a complete step directory (:func:`find_resume_point`).
    ``config``/``tokenizer_hash`` describe the current run; a different model shape or tokenizer is
    refused before DeepSpeed reads anything. When ``config``'s tp, pp, ZeRO stage or (partitioned)
    dp size differ from the step's, the step is resharded into ``engine``; that needs ``layout``, the current engine's names as
    a manifest records them (``topology.pp``, ``layers``, ``tied``, ``param_prefix``) plus ``tied_params``; see
    ``fm_train.engine.checkpointing.current_layout``). Returns the manifest (data state, tokens, step).
    """
    step_dir = Path(step_dir)
    if trust is None:
        trust = bool(config is not None and config.checkpoint.trust_pickles)
    manifest_dir = step_dir
    refuse_symlinks(step_dir)
    manifest = read_manifest(manifest_dir)
    check_compatible(manifest, config, tokenizer_hash, manifest_dir)
    bad = missing_files(manifest_dir, manifest)
    if bad:
        raise CheckpointError(f"{manifest_dir} is damaged: " + ", ".join(bad))
    if config is not None and needs_reshard(manifest, config.parallel.tp, config.parallel.pp,
                                            config.parallel.zero_stage, config.dp, config.parallel.ep):
        if not trust:
            check_pickles(manifest_dir, manifest)  # names the file with the resume's way to trust it
        return _load_resharded(engine, manifest_dir, manifest, config, layout, trust)
    saved_dp = manifest["topology"]["dp"]
    if saved_dp != engine.dp_world_size and _dp_partitioned(manifest):
        raise CheckpointError(f"{manifest_dir} was saved with dp={saved_dp}, the engine has dp="
                              f"{engine.dp_world_size}; pass config= so that the step is resharded")
    if not trust:
        # Before DeepSpeed reads anything, so that every rank refuses alike (the guarded engine below
        # would stop only the rank that loads the file, leaving its peers in a collective).
        check_pickles(step_dir, manifest)
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


def check_pickles(root: Path, manifest: Mapping[str, Any]) -> None:
    """Check every ``.pt`` file the manifest of ``root`` records (the files a resume reads: anything else in
    the directory is never opened) for objects other than tensors and DeepSpeed's plain records;
    collective: the ranks split the files and all raise the same :class:`CheckpointError` naming one."""
    files = [root / rel for rel in recorded_files(manifest) if rel.endswith(".pt")]
    mine = checking_share(root, files, collective.rank(), collective.world(),
                          key=lambda p: p.relative_to(root).as_posix()) or []
    try:
        scan_pickles(mine)
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
        raise CheckpointError(f"{step_dir} was saved with tp={saved['tp']} pp={saved['pp']} dp={saved['dp']} "
                              f"ZeRO-{saved['zero_stage']}, the run has tp={p.tp} pp={p.pp} dp={config.dp} "
                              f"ZeRO-{p.zero_stage}: pass layout= (the current "
                              "engine's layer table) so that it can be resharded")
    world, rank = _world_and_rank()
    topology = Topology(world=world, tp=p.tp, pp=p.pp, ep=p.ep, sp=p.sp)
    log.info("rank %d: resharding %s (tp=%d pp=%d dp=%d ep=%d ZeRO-%d) for tp=%d pp=%d dp=%d ep=%d ZeRO-%d", rank,
             step_dir, saved["tp"], saved["pp"], saved["dp"], saved.get("ep", 1), saved["zero_stage"], p.tp, p.pp,
             world // (p.tp * p.pp), p.ep, p.zero_stage)
    if p.ep > 1 and not (layout.get("experts") or {}).get("params"):
        raise CheckpointError(f"parallel.ep={p.ep}: the current layout names no expert parameters (pass layout="
                              "current_layout(cfg, family)) so that each rank keeps its experts")
    load_resharded(engine, step_dir, manifest, layout, tp_rank=topology.coord(rank).tp, tp_size=p.tp,
                   ep_rank=topology.ep_rank(rank),
                   trust=trust)
    return manifest
