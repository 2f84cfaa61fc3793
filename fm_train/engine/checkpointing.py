"""The engine's side of checkpoints: where to resume from, restoring a TrainState, saving when due.

Files, manifests, ``latest``, retention and dp-size changes are :mod:`fm_train.checkpoint`'s job;
this module only decides *when* and passes the train state (step, tokens seen, data position) in.
The LR scheduler travels inside DeepSpeed's own files (``load_lr_scheduler_states=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepspeed.runtime.engine import DeepSpeedEngine

from fm_train.config import FmConfig
from fm_train.dist.topology import Topology
from fm_train.engine.loop import StepHook
from fm_train.engine.state import TrainState


def resume_point(cfg: FmConfig, topology: Topology) -> tuple[Path | None, bool]:
    """``(path to load or None, needs_universal)`` for ``checkpoint.resume``; every rank calls it.

    ``needs_universal`` must reach the engine's config (``load_universal``) before it is built.
    """
    from fm_train.checkpoint import find_resume_point, prepare_resume

    step_dir = find_resume_point(Path(cfg.run.dir), cfg.checkpoint.resume)
    if step_dir is None:
        return None, False
    return prepare_resume(step_dir, topology)


def restore(engine: DeepSpeedEngine, path: Path, cfg: FmConfig, state: TrainState,
            tokenizer_hash: str | None) -> None:
    """Load ``path`` into ``engine`` and set ``state`` to the saved step, tokens and data position."""
    from fm_train.checkpoint import load_checkpoint

    manifest = load_checkpoint(engine, path, config=cfg, tokenizer_hash=tokenizer_hash)
    state.step = int(manifest["step"])
    state.tokens_seen = int(manifest["tokens_seen"])
    state.data_state = manifest["data"]["state"]


def _layers(cfg: FmConfig) -> list[dict[str, Any]] | None:
    if cfg.parallel.tp == 1:
        return None  # the dense table is the default
    from fm_train.checkpoint import dense_layers
    from fm_train.model import args_from_config
    from fm_train.parallel.tensor_parallel import tp_split_dims

    return dense_layers(cfg.model.n_layers, tp_split_dims(args_from_config(cfg.model)))


def checkpoint_hook(cfg: FmConfig, topology: Topology, *, is_rank0: bool, tokenizer_hash: str | None) -> StepHook:
    """A loop hook that saves every ``checkpoint.every`` steps (0: never in between) and at the last step."""
    from fm_train.checkpoint import build_manifest, save_checkpoint

    every, last, layers = cfg.checkpoint.every, cfg.train.steps, _layers(cfg)

    def maybe_save(engine: DeepSpeedEngine, state: TrainState) -> None:
        if state.step != last and not (every and state.step % every == 0):
            return
        manifest = build_manifest(cfg, topology, data_state=state.data_state, tokens_seen=state.tokens_seen,
                                  tokenizer_hash=tokenizer_hash, layers=layers)
        save_checkpoint(engine, Path(cfg.run.dir), state.step, manifest=manifest, keep=cfg.checkpoint.keep,
                        is_rank0=is_rank0)

    return maybe_save
