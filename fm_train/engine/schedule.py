"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to ``min_lr``.

The rate is a plain function of the optimizer step (:func:`lr_at`), so a resumed run only needs the
step count to be back on the curve. :func:`build_lr_scheduler` wraps it in a ``LambdaLR`` whose
``state_dict`` holds just ``last_epoch`` (the lambda is a closure, which ``LambdaLR`` does not save),
so a resume picks up a changed schedule from the new config instead of the old checkpoint.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fm_train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate used by optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    Warmup ramps linearly from ``lr / warmup_steps`` at step 0 to ``lr`` at step ``warmup_steps - 1``
    (never 0: a zero-rate first step would waste a batch). Decay then runs from ``lr`` at step
    ``warmup_steps`` to ``min_lr`` at the last step, ``total_steps - 1``, and stays there beyond it.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - 1 - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.schedule == "linear":
        scale = 1.0 - progress
    else:  # cosine
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * scale


def build_lr_scheduler(optimizer: Optimizer, optim: OptimConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` (whose groups start at the peak ``optim.lr``) following :func:`lr_at`.

    DeepSpeed steps it once per optimizer step (skipped on an fp16 overflow step) and saves its
    state in its checkpoints; :class:`fm_train.engine.state.TrainState` carries it too.
    """

    def factor(step: int) -> float:
        return lr_at(step, optim, total_steps) / optim.lr

    return LambdaLR(optimizer, factor)
