"""What DeepSpeed 0.19's checkpoint pickles may hold besides tensors, containers, numbers and strings.

fm-train opens every DeepSpeed file with ``torch.load(weights_only=True)``
(:func:`fm_train.deepspeed_adapter.ckpt_files.safe_torch_load`); these are the plain record classes DeepSpeed
pickles into them, safe to rebuild, allowed by name.
"""

from __future__ import annotations

from typing import Any

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address


def checkpoint_record_classes() -> list[Any]:
    """DeepSpeed classes that its checkpoints pickle: plain records, safe to rebuild."""
    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]
