"""Activation checkpointing applied from outside the pure model, one block at a time.

Each instance of the model family's block types (``Modules.block_types``) gets its ``forward`` replaced by a ``torch.utils.checkpoint`` call of
the original. The module tree and parameter names stay untouched (a wrapper module would add a
``_checkpoint_wrapped_module`` level to every key), so checkpoints and the HF export do not notice.
The non-reentrant variant is used: it works with inputs that do not require grad, with ZeRO-3's
parameter-fetch hooks (they fire again in the recomputation) and with ``torch.no_grad`` evaluation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args)
    return checkpoint(forward, *args, use_reentrant=False)


def apply_activation_checkpointing(module: nn.Module, blocks: tuple[type, ...], limit: int | None = None) -> int:
    """Recompute the blocks of ``module`` in backward (the first ``limit`` only, None: all); returns how
    many blocks were wrapped.

    Blocks are instances of ``blocks`` (the family's block types) found anywhere in
    the tree, in module order, so the same call serves the dense model, a tensor-parallel one and the
    blocks of a pipeline stage (its first ``limit``). Applying it twice is a no-op.
    """
    count, seen = 0, 0
    for block in module.modules():
        if not isinstance(block, blocks):
            continue
        seen += 1
        if limit is not None and seen > limit:
            break
        if "forward" not in vars(block):
            # An instance attribute shadows the class method; nn.Module.__call__ still runs hooks.
            block.forward = functools.partial(_checkpointed, block.forward)  # type: ignore[method-assign]
            count += 1
    return count
