"""Open one DeepSpeed checkpoint file: memory-mapped, ``weights_only`` unless the caller trusts it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from fm_train.checkpoint.layout import CheckpointError


def _safe_globals() -> list[Any]:
    """DeepSpeed classes that its checkpoints pickle: plain records, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_ds_file(path: Path, *, trust: bool) -> dict[str, Any]:
    """``torch.load`` one DeepSpeed file memory-mapped; ``weights_only=True`` unless ``trust``."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} lacks {path.name}: the checkpoint is incomplete (a rank's shard "
                           "was not written or not copied)")
    try:
        if trust:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not load with weights_only=True ({first}); if you trust where this "
                           "checkpoint came from, pass --trust-checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - torch.load's errors on damaged bytes have no common type
        # Garbage or torn bytes surface as RuntimeError (zip), UnicodeDecodeError, EOFError, ...: all mean
        # the file is damaged, and the user needs its name, not torch's traceback.
        lines = str(exc).strip().splitlines()
        raise CheckpointError(f"{path} is damaged: it does not load as a torch checkpoint ({type(exc).__name__}: "
                           f"{lines[0] if lines else ''}); copy it again from where the run wrote it") from None
