"""The engine's side of checkpoints: where to resume from, restoring a TrainState, saving when due.

Files, manifests, ``latest``, retention and dp-size changes are :mod:`fm_train.checkpoint`'s job;
this module only decides *when* and passes in the train state (step, tokens seen, data position)
and what only the parallel layout knows: the layer table and tied modules the converter needs to
merge tp shards and rename pipeline layers. The same calls serve a ``PipelineEngine``.
The LR scheduler travels inside DeepSpeed's own files (``load_lr_scheduler_states=True``). On a
resume across tp/pp sizes the same layer table, built for the current layout, tells the resharding
loader which slice of which saved tensor each local parameter is (:func:`current_layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from fm_train.config import FmConfig
from fm_train.deepspeed_adapter.engine import DeepSpeedEngine
from fm_train.dist.topology import Topology
from fm_train.engine.state import TrainState
from fm_train.families.spec import FamilySpec, manifest_experts, manifest_layers, manifest_tied


def resume_point(cfg: FmConfig, topology: Topology) -> Path | None:
    """The step directory to load for ``checkpoint.resume``, or None; every rank calls it.

    Damaged checkpoints are skipped loudly; nothing but damaged ones stops the start unless
    ``checkpoint.allow_fresh_start`` (see :func:`fm_train.checkpoint.find_resume_point`). With
    ``run.storage`` and ``resume: auto``, each node first fetches what its ranks need of the newest
    step committed there that its ``run.dir`` lacks (one rank per disk downloads).
    """
    from fm_train.checkpoint import find_resume_point

    if cfg.run.storage is not None and cfg.checkpoint.resume == "auto":
        from fm_train.checkpoint.fetch import fetch_on_each_node

        fetch_on_each_node(cfg.run.storage, Path(cfg.run.dir), topology=topology, zero_stage=cfg.parallel.zero_stage)

    return find_resume_point(Path(cfg.run.dir), cfg.checkpoint.resume,
                             allow_fresh_start=cfg.checkpoint.allow_fresh_start)


def restore(engine: DeepSpeedEngine, path: Path, cfg: FmConfig, family: FamilySpec, state: TrainState,
            tokenizer_hash: str | None) -> None:
    """Load ``path`` into ``engine`` and set ``state`` to the saved step, tokens and data position."""
    from fm_train.checkpoint import load_checkpoint

    manifest = load_checkpoint(engine, path, config=cfg, tokenizer_hash=tokenizer_hash,
                               layout=current_layout(cfg, family))
    state.step = int(manifest["step"])
    state.tokens_seen = int(manifest["tokens_seen"])
    state.data_state = manifest["data"]["state"]


def current_layout(cfg: FmConfig, family: FamilySpec) -> dict[str, Any]:
    """This run's parameter naming as a manifest records it, plus the model's tied parameters: what a
    resharding load maps local names with (and, with ep > 1, which rows of which parameter are which
    experts)."""
    return {"topology": {"pp": cfg.parallel.pp, "tp": cfg.parallel.tp, "ep": cfg.parallel.ep},
            "layers": manifest_layers(family, cfg), "tied": manifest_tied(family, cfg), "param_prefix": "model.",
            "tied_params": family.tied_params(cfg.model.model_dump()),
            "experts": manifest_experts(family, cfg)}


class StepExports(Protocol):
    """What the saver hands committed steps to for ``convert.every`` (the export process's handle)."""

    def submit(self, step: int, step_dir: Path) -> None: ...

    def close(self) -> list[str]: ...


class CheckpointSaver:
    """A loop hook that saves every ``checkpoint.every`` steps (0: never in between) and at the last step.

    :meth:`save` saves unconditionally: the loop calls it when a stop was requested (SIGTERM from a
    preempting scheduler, Ctrl-C on the driver) so the run can resume exactly where it stopped.
    ``on_save_start(step)`` runs first on every save (the worker's heartbeat says ``save``, so the
    launcher applies ``cluster.save_timeout_s`` instead of the step's limit). ``exports`` (rank 0 with
    ``convert.every``): gets each committed step due for a Hugging Face export
    (:class:`fm_train.convert.background.BackgroundExports`, built by the worker: convert is a higher layer).
    """

    def __init__(self, cfg: FmConfig, family: FamilySpec, topology: Topology, *, is_rank0: bool,
                 tokenizer_hash: str | None, rank: int = 0,
                 on_save_start: Callable[[int], None] | None = None, exports: StepExports | None = None) -> None:
        self.cfg, self.topology, self.is_rank0, self.tokenizer_hash = cfg, topology, is_rank0, tokenizer_hash
        self.on_save_start = on_save_start
        self.layers, self.tied = manifest_layers(family, cfg), manifest_tied(family, cfg)
        self.experts = manifest_experts(family, cfg)
        self.uploader = None
        self.log_copies = None  # rank 0 with run.storage: the run's logs, copied after each commit
        if cfg.run.storage is not None:
            from fm_train.storage.upload import CheckpointUploader
            from fm_train.storage.log_copies import RunLogCopies

            if is_rank0:
                self.log_copies = RunLogCopies(Path(cfg.run.dir), cfg.run.storage,
                                               retries=cfg.checkpoint.upload_retries)
            self.uploader = CheckpointUploader(cfg.run.storage, rank=rank, keep=cfg.checkpoint.keep,
                                               retries=cfg.checkpoint.upload_retries,
                                               after_commit=self.log_copies.copy if self.log_copies else None)
        self.exports = exports if cfg.convert.every else None
        self._exported_step: int | None = None

    def __call__(self, engine: DeepSpeedEngine, state: TrainState) -> None:
        every, last = self.cfg.checkpoint.every, self.cfg.train.steps
        if state.step == last or (every and state.step % every == 0):
            self.save(engine, state)

    def save(self, engine: DeepSpeedEngine, state: TrainState) -> Path:
        """Save ``state.step`` now (every rank calls it); returns the step directory."""
        from fm_train.checkpoint import build_manifest, save_checkpoint

        if self.on_save_start is not None:
            self.on_save_start(state.step)
        manifest = build_manifest(self.cfg, self.topology, data_state=state.data_state, tokens_seen=state.tokens_seen,
                                  tokenizer_hash=self.tokenizer_hash, layers=self.layers, tied=self.tied,
                                  experts=self.experts)
        step_dir = save_checkpoint(engine, Path(self.cfg.run.dir), state.step, manifest=manifest,
                                   keep=self.cfg.checkpoint.keep, is_rank0=self.is_rank0, uploader=self.uploader)
        if self.exports is not None and state.step % self.cfg.convert.every == 0:
            self.exports.submit(state.step, step_dir)  # committed: every rank passed the save's last collective
            self._exported_step = state.step
        return step_dir

    def close(self) -> list[str]:
        """Wait for the upload in flight (the run's last checkpoint must reach storage before the worker
        exits) and copy the logs a last time; returns the steps this rank could not upload (empty without
        ``run.storage``). With ``convert.every``, rank 0 then waits (``convert.end_wait_s`` at most) for the
        export in progress, its heartbeat saying ``save`` meanwhile, and prints what was exported: the
        checkpoint's upload comes first (a preempted node may be gone before the export is done)."""
        if self.uploader is not None:
            self.uploader.close()
        if self.exports is not None:
            if self.on_save_start is not None and self._exported_step is not None:
                # The launcher judges this wait by cluster.save_timeout_s, not by the step's limit.
                self.on_save_start(self._exported_step)
            for line in self.exports.close():
                print(line, flush=True)
        if self.uploader is None:
            return []
        if self.log_copies is not None:
            self.log_copies.copy()  # after the exports: their failure records go too
        return self.uploader.failed


def checkpoint_hook(cfg: FmConfig, family: FamilySpec, topology: Topology, *, is_rank0: bool,
                    tokenizer_hash: str | None, rank: int = 0,
                    on_save_start: Callable[[int], None] | None = None,
                    exports: StepExports | None = None) -> CheckpointSaver:
    """The loop's checkpoint hook for ``cfg`` (see :class:`CheckpointSaver`)."""
    return CheckpointSaver(cfg, family, topology, is_rank0=is_rank0, tokenizer_hash=tokenizer_hash, rank=rank,
                           on_save_start=on_save_start, exports=exports)
