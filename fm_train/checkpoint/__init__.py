"""Checkpoints: step directories with a manifest written last, atomic ``latest``, retention, resume
(on another dp, tp or pp size or ZeRO stage by fm-train's own resharding). See docs/checkpoints.md."""

from fm_train.checkpoint.layout import CheckpointError, step_dir_name
from fm_train.checkpoint.manifest import build_manifest, dense_layers, read_manifest
from fm_train.checkpoint.resume import find_resume_point, load_checkpoint, resolve_checkpoint
from fm_train.checkpoint.save import apply_retention, save_checkpoint

__all__ = [
    "CheckpointError", "apply_retention", "build_manifest", "dense_layers", "find_resume_point",
    "load_checkpoint", "read_manifest", "resolve_checkpoint", "save_checkpoint",
    "step_dir_name",
]
