"""The DeepSpeed training engine: initialize, the step loop, LR schedule, eval and metrics."""

from fm_train.engine.activation_checkpointing import apply_activation_checkpointing
from fm_train.engine.build import build_engine
from fm_train.engine.evaluate import evaluate
from fm_train.engine.flops import flops_per_token, mfu, peak_flops
from fm_train.engine.loop import Batch, StepHook, StepOutput, train, train_step
from fm_train.engine.metrics import MetricsSink, format_line, peak_memory_gib
from fm_train.engine.param_groups import weight_decay_groups
from fm_train.engine.schedule import build_lr_scheduler, lr_at
from fm_train.engine.state import TrainState

__all__ = [
    "Batch", "MetricsSink", "StepHook", "StepOutput", "TrainState", "apply_activation_checkpointing",
    "build_engine", "build_lr_scheduler", "evaluate", "flops_per_token", "format_line", "lr_at",
    "mfu", "peak_flops", "peak_memory_gib", "train", "train_step", "weight_decay_groups",
]
